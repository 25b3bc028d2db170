"""The training stages, in recipe order, and the pieces they share (loop.py)."""
from gptlab.train.loop import TrainConfig, TrainResult, make_optimizer, lr_at, train

__all__ = ["TrainConfig", "TrainResult", "make_optimizer", "lr_at", "train"]
