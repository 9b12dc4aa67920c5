"""SIGINT and SIGTERM for the sweep driver: stop Tune cleanly instead of dying mid-write.

While Tune runs, the first signal asks Tune to stop (its SIGUSR1 handler: Tune saves its
experiment state, stops the trial actors and returns from ``fit``); the driver then sees
``signum`` set and ends the sweep as interrupted. Outside Tune (MLflow set-up, the dense base
model, the front) and on a second signal, the handler raises ``KeyboardInterrupt`` at once.
Without this, Ctrl-C made Tune return normally (reported as a finished sweep) and SIGTERM hit
``ray.init``'s handler (``sys.exit`` mid-Tune, then an abort in Ray's C++ shutdown).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

__all__ = ["Interrupts", "SIGNALS"]

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Tune would otherwise put its own SIGINT handler in place for the duration of ``fit``.
_TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"


class Interrupts:
    """Context manager: our handlers for SIGINT/SIGTERM inside, the previous ones restored after.
    A no-op off the main thread (Python allows signal handlers only there)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._tune = False
        self._saved: dict[int, Any] = {}
        self._env: str | None = None
        self._active = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> "Interrupts":
        if self._active:
            self._env = os.environ.get(_TUNE_SIGINT_ENV)
            os.environ[_TUNE_SIGINT_ENV] = "1"
            self.install()
        return self

    def install(self) -> None:
        """(Re)install the handlers: ``ray.init`` replaces the SIGTERM one; started off the main
        thread (``search.sweep``) it leaves Python's record alone but puts its C++ failure handler
        under it, so the handlers are set again even where ``getsignal`` already names ours."""
        if not self._active:
            return
        for sig in SIGNALS:
            current = signal.getsignal(sig)
            if current != self._handle:
                self._saved.setdefault(sig, current)
            signal.signal(sig, self._handle)

    def __exit__(self, *exc) -> None:
        if not self._active:
            return
        for sig, handler in self._saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if self._env is None:
            os.environ.pop(_TUNE_SIGINT_ENV, None)
        else:
            os.environ[_TUNE_SIGINT_ENV] = self._env

    @contextmanager
    def tune_running(self) -> Iterator[None]:
        """Around ``fit``: signals go to Tune's stop handler (SIGUSR1, installed by ``fit``; the one
        there before is put back after, so a stale handler of an earlier ``fit`` is never called)."""
        usr1 = signal.getsignal(signal.SIGUSR1) if self._active and hasattr(signal, "SIGUSR1") else None
        self._tune = True
        try:
            yield
        finally:
            self._tune = False
            if usr1 is not None:
                signal.signal(signal.SIGUSR1, usr1)

    def _handle(self, signum: int, frame) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        stop_tune = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
        if first and self._tune and callable(stop_tune):
            log.warning("%s received: stopping Tune (its state is saved; a second signal stops at once)",
                        signal.Signals(signum).name)
            stop_tune(signum, frame)
            return
        raise KeyboardInterrupt
