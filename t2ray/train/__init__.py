"""Ray Train + DeepSpeed around the plain RL loop (t2ray.rl)."""

from t2ray.train.launcher import TrainError, TrainOutcome, train

__all__ = ["TrainError", "TrainOutcome", "train"]
