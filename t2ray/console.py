"""What a t2ray command prints: its own stage lines and driver-side progress bars; the frameworks' logs (Ray's
actor and worker output, Train's per-report lines, DeepSpeed, transformers' loading bars) only with --verbose.
Errors are never hidden: they come back to the driver as exceptions and are printed by the CLI."""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "T2RAY_VERBOSE"
FRAMEWORK_LOGGERS = ("ray", "ray.train", "ray.tune", "ray.data", "deepspeed", "DeepSpeed", "torch.distributed", "wandb")


# What every t2ray command assumes unless the user's environment says otherwise (the CLI sets them, once, before
# anything else; Ray's workers inherit them): experiment tracking offline (wandb needs no account), tokenizers without
# fork warnings. Ray's token authentication stays on (t2ray.ray_auth; opt out: RAY_AUTH_MODE=disabled).
ENV_DEFAULTS = {"WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}


def apply_env_defaults() -> dict[str, str]:
    """Set ENV_DEFAULTS where the environment has no value; returns what was set."""
    added = {name: value for name, value in ENV_DEFAULTS.items() if name not in os.environ}
    os.environ.update(added)
    return added


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def set_verbosity(loud: bool) -> None:
    """Called once by the CLI, before anything heavy is imported: the environment carries the choice into
    transformers (read at its import) and into Ray's workers."""
    os.environ[VERBOSE_ENV] = "1" if loud else "0"
    if loud:
        return
    for name, value in (
        ("WANDB_SILENT", "true"),
        ("RAY_DEDUP_LOGS", "1"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
    ):  # the last: transformers' "Loading weights" bar
        os.environ.setdefault(name, value)
    for name in FRAMEWORK_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def ray_log_options() -> dict:
    """ray.init keywords: worker/actor output reaches the console only when verbose."""
    loud = verbose()
    return {"log_to_driver": loud, "logging_level": logging.INFO if loud else logging.WARNING}
