"""The training progress bar, drawn by the driver: rank 0's report of each iteration travels from the Train
controller (a UserCallback) through a Ray queue to a thread here, so the bar and its times are the driver's own
(workers' bars reach the console late, through the log stream, with their own clocks)."""

from __future__ import annotations

import threading

from tqdm.auto import tqdm

try:  # the Train V2 controller-side callback; t2ray.tune.trials builds on it too
    from ray.train import UserCallback
except ImportError:  # pragma: no cover - Ray < 2.45
    from ray.train.v2.api.callback import UserCallback


class ReportToQueue(UserCallback):
    """Runs on the Train controller: forwards rank 0's metrics of every report."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put(dict(metrics[0]))


def describe(metrics: dict) -> str:
    text = f"reward {metrics['reward']:+.2f} acc {metrics['accuracy']:.2f}"
    if "valid_accuracy" in metrics:
        text += f" valid {metrics['valid_accuracy']:.2f}"
    return text


class DriverProgress:
    """`with DriverProgress(name, iterations, start) as p: trainer = make_trainer(..., callbacks=[p.callback])`."""

    def __init__(self, name: str, iterations: int, start: int = 0):
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self.callback = ReportToQueue(self.queue)
        self.bar = tqdm(total=iterations, initial=start, desc=f"train {name}", unit="it", dynamic_ncols=True)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)

    def _follow(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                metrics = self.queue.get(timeout=0.5)
            except Empty:
                if self.stop.is_set():  # fit() returned and every report is drawn
                    return
                continue
            except Exception:  # the queue actor is gone (Ray shutting down): nothing more to draw
                return
            self.bar.n = metrics.get("iteration", self.bar.n + 1)
            self.bar.set_postfix_str(describe(metrics), refresh=False)
            self.bar.refresh()

    def __enter__(self) -> DriverProgress:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import ray

        self.stop.set()
        self.thread.join(timeout=5)
        self.bar.close()
        ray.kill(self.queue.actor)
