"""search.progress: the per-trial line, and the Tune settings a sweep sets for its run only."""
from __future__ import annotations

import logging
import os

from search.progress import trial_line, tune_environment, tune_verbosity


def test_trial_lines():
    result = {"accuracy": 0.96944, "macs": 677776.0, "macs_reduction": 0.7309, "params": 79554, "latency_ratio": 0.2391}
    assert trial_line("ab12", "l1_norm", result, None) == (
        "trial ab12 (l1_norm) finished: accuracy 0.9694, MACs 677,776 (73.1% removed), params 79,554, "
        "latency ratio 0.239")
    assert trial_line("cd34", "slimming", {"accuracy": 0.9331, "macs": 1721876.0, "params": 170224}, (1, 1)) == (
        "trial cd34 (slimming) stopped at rung 1 (fine-tune epoch 1): accuracy 0.9331, MACs 1,721,876, params 170,224")


def test_tune_environment_is_set_for_the_block_only(monkeypatch):
    monkeypatch.delenv("TUNE_GLOBAL_CHECKPOINT_S", raising=False)
    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    with tune_environment(10, verbose=0):
        assert (os.environ["TUNE_GLOBAL_CHECKPOINT_S"], os.environ["RAY_AIR_NEW_OUTPUT"]) == ("10", "0")
    assert "TUNE_GLOBAL_CHECKPOINT_S" not in os.environ and "RAY_AIR_NEW_OUTPUT" not in os.environ
    with tune_environment(0, verbose=1):  # Tune's auto period, its own reporter
        assert "TUNE_GLOBAL_CHECKPOINT_S" not in os.environ and "RAY_AIR_NEW_OUTPUT" not in os.environ
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "1")  # the user's own setting wins and stays
    with tune_environment(10, verbose=0):
        assert os.environ["TUNE_GLOBAL_CHECKPOINT_S"] == "1"
    assert os.environ["TUNE_GLOBAL_CHECKPOINT_S"] == "1"


def test_tune_reporter_only_with_debug_logging():
    logger = logging.getLogger("search")
    old = logger.level
    try:
        logger.setLevel(logging.INFO)
        assert tune_verbosity() == 0
        logger.setLevel(logging.DEBUG)
        assert tune_verbosity() == 1
    finally:
        logger.setLevel(old)
