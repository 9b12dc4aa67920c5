"""Hands a trial's epoch reports to Ray Tune from a thread of its own, so the trial trains on.

Tune's function API is synchronous: ``tune.report`` returns only after the driver has handled the
result (scheduler, searcher, the MLflow callback) and asked the trial for the next one. A trial of
sub-second epochs then waits for the driver every epoch: 40-60 ms a report on the shared 2-core
machine, 1-2 s of a 6 s trial of 20 epochs (benchmarks/RESULTS.md, issue 12), and longer while the
driver logs another trial's model. :class:`ReportThread` takes each report (its metrics and the
checkpoint directory the trial already wrote, or None) and returns at once; its thread passes the
reports to ``send`` (``tune.report``) one by one, in order, while the trial trains its next epoch.

What does not change:

* every report reaches Tune, in order, each with its checkpoint; :meth:`ReportThread.close` returns
  only after the last one was taken, so the trial function ends as it did;
* a report put with ``wait=True`` (an early-stopping rung, where the scheduler may answer STOP) is
  answered before :meth:`ReportThread.put` returns: a trial stopped at a rung trains no epoch more;
* when Tune stops the trial, ``send`` raises ``SystemExit`` in the reporting thread; the trial
  raises it at its next ``put`` (or at ``close``), as ``tune.report`` raised it in the trial itself;
  an error from ``send`` (say, a checkpoint that cannot be persisted) is raised the same way;
* reports after such an exception are dropped (their checkpoint directories removed).

The trial runs at most ``ahead`` reports (default one) beyond the one Tune holds.
"""
from __future__ import annotations

import queue
import tempfile
import threading
from typing import Any, Callable, Optional

__all__ = ["ReportThread"]

Send = Callable[[dict[str, Any], Optional[str]], None]


class ReportThread:
    """``send(metrics, checkpoint_dir or None)`` is called from the thread, one report at a time."""

    def __init__(self, send: Send, ahead: int = 1):
        self._send = send
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, ahead))
        self._raised: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="prunetune-report", daemon=True)
        self._thread.start()

    def put(self, metrics: dict[str, Any], checkpoint: tempfile.TemporaryDirectory | None = None,
            wait: bool = False) -> None:
        """Queue one report (``checkpoint``: removed once Tune has persisted it); with ``wait``,
        return once Tune has answered it. Raises what an earlier report raised."""
        if self._raised is not None and checkpoint is not None:
            checkpoint.cleanup()  # not taken: the trial ends here
        self._check()
        self._queue.put((dict(metrics), checkpoint))
        if wait:
            self._queue.join()
            self._check()

    def close(self, check: bool = True) -> None:
        """Wait until every queued report was taken, then end the thread; with ``check``, raise
        what reporting raised (``check=False``: the trial is failing already, its error wins)."""
        self._queue.put(None)
        self._thread.join()
        if check:
            self._check()

    def _check(self) -> None:
        if self._raised is not None:
            raise self._raised

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                metrics, checkpoint = item
                if self._raised is None:
                    try:
                        self._send(metrics, checkpoint.name if checkpoint is not None else None)
                    except BaseException as exc:  # SystemExit: Tune stopped the trial
                        self._raised = exc
                if checkpoint is not None:
                    try:
                        checkpoint.cleanup()
                    except OSError:  # a leftover temporary directory must not end the reporting
                        pass
            finally:
                self._queue.task_done()
