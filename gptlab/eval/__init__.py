"""Evaluation: execution accuracy on the built-in world, its statistics, best-of-K headroom,
the pipeline's evaluation and its report."""
