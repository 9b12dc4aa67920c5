"""search.progress: the per-trial line, the Tune settings a sweep sets for its run only, and a sweep
whose trials checkpoint several times without forcing Tune's experiment-state snapshots."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

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


def test_trials_that_checkpoint_periodically_force_no_snapshot(ray_local, tmp_path, capfd, caplog):
    """Trials running several checkpoint periods (6 fine-tune epochs, a checkpoint due every second):
    each saves >= 3 checkpoints, Tune keeps the newest 3, and no snapshot is forced, so its
    "snapshotting has been triggered multiple times" warning never shows. With ``num_to_keep=2`` a
    trial's periodic checkpoint and its final one force a snapshot whenever no periodic snapshot
    falls between them (a race: 2 warnings in a 4-trial sweep run by hand, none in some runs)."""
    from search.cli import main

    overrides = ["methods=[l1_norm]", "num_trials=2", "max_concurrent_trials=2", "base.epochs=1",
                 "finetune.epochs=6", "checkpoint_period_s=1", "early_stopping.type=none", "name=ckpt",
                 f"tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"storage_path={tmp_path}/ray_results"]
    caplog.set_level(logging.WARNING)
    assert main(["run", "configs/quickstart.yaml", *[a for o in overrides for a in ("--set", o)]]) == 0
    out, err = capfd.readouterr()
    exp_dir = Path(re.search(r"^sweep directory: (.+)$", out, re.M).group(1))
    saved = {}
    for trial_dir in exp_dir.glob("trial_fn_*"):
        kept = sorted(int(p.name.split("_")[-1]) for p in trial_dir.glob("checkpoint_*"))
        assert 1 <= len(kept) <= 3, (trial_dir.name, kept)
        saved[trial_dir.name] = kept[-1] + 1  # checkpoints are numbered from 0
    assert len(saved) == 2 and max(saved.values()) >= 3, saved  # the case that forced snapshots
    assert "snapshotting" not in out + err
    assert not [r for r in caplog.records if "snapshotting" in r.getMessage()]
