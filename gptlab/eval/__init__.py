"""Evaluation: execution accuracy on the built-in world, in-context learning, the report."""
