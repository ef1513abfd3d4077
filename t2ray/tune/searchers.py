"""Searchers that take t2ray's trials as they report: the sweep's metric (valid_accuracy) comes only with
evaluations, while trials report every iteration or CEM generation (ASHA and PBT decide on those)."""

from __future__ import annotations

from ray.tune.search.optuna import OptunaSearch


class OptunaOnEvaluations(OptunaSearch):
    """Optuna records every intermediate result under the metric (`result[metric]`: a KeyError on a result
    without it); here only the results that carry the metric reach it. The final result always does."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)
