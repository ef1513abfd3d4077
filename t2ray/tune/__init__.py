"""Ray Tune sweeps from a YAML: RL hyperparameters (each trial fits a Ray Train run) and CEM settings.

sweep = load_sweep("experiments/sweeps/rl-smollm2.yaml")   # validates without Ray
outcome = run_sweep(sweep)                                 # runs, or resumes the same name
"""

from t2ray.tune.config import CEM_METRICS, RL_METRICS, Sweep, SweepConfig, SweepError, load_sweep

__all__ = ["CEM_METRICS", "RL_METRICS", "Sweep", "SweepConfig", "SweepError", "load_sweep", "run_sweep"]


def run_sweep(sweep, **kwargs):
    """See t2ray.tune.runner.run_sweep (imported lazily: Ray is only loaded to run)."""
    from t2ray.tune.runner import run_sweep as run

    return run(sweep, **kwargs)
