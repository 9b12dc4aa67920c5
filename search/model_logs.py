"""The driver's model-logging thread: each finished trial's model goes to MLflow (weights + spec
artifacts, and the pt2 MLflow model: ~0.5 s a digits ResNet-20 on a quiet core, ~1 s loaded,
mostly ``torch.export``; benchmarks/RESULTS.md) in one thread of its own, so Tune's event loop goes
on meanwhile: the trial's actor takes its next trial and the running trials' results are handled.

One thread, jobs in the order they came, and the only one in the driver that exports or logs a
model: ``torch.export`` fails when two threads trace at once ("ProxyTorchDispatchMode slot already
occupied"), and ``log_pt2_model`` points MLflow's process-wide fluent tracking URI at the store for
its call (``tests/test_trial_logging.py`` caught both). :func:`drain` waits for every job submitted
so far; the sweep calls it when Tune's run ends (``MLflowTrialLogger.on_experiment_end``, and after
``tuner.fit`` on every path) so no model is still on its way when the sweep reads its trials,
closes its runs or exits. A job's error is logged by the job itself; :func:`drain` never raises it.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Callable

__all__ = ["submit", "drain"]

log = logging.getLogger(__name__)
_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_pending: list[Future] = []


def submit(job: Callable[..., Any], *args: Any) -> Future:
    """Run ``job(*args)`` in the model-logging thread (started on first use)."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prunetune-model-log")
        future = _executor.submit(job, *args)
        _pending[:] = [f for f in _pending if not f.done()] + [future]
    return future


def drain() -> int:
    """Wait until every job submitted so far has ended; how many were still running or queued."""
    with _lock:
        pending = [f for f in _pending if not f.done()]
        _pending.clear()
    if pending:
        log.debug("waiting for %d trial model(s) to be logged", len(pending))
        wait(pending)
    for future in pending:
        if future.exception() is not None:  # the job logs what it can; this is the last resort
            log.warning("logging a trial's model failed: %s", future.exception())
    return len(pending)
