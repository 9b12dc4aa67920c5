"""A trial's reports go to Tune from a thread of their own (issue 12: the trial no longer waits for
the driver's round trip every epoch). What must not change: every report arrives, in order, with
its checkpoint holding the state of its own epoch (however long Tune takes to persist it, and a
trial resumed from it ends bit for bit as the uninterrupted one); a rung's report is answered
before the trial trains on; Tune's stop and reporting errors reach the trial; no checkpoint
directory is left behind. The sweep-level guarantees (resume, faults, early stopping) are in
test_resume.py, test_faults.py and test_early_stopping.py, which run through this path."""
from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import small_trial_settings
from trainables.model_io import load_model
from trainables.report_thread import ReportThread
from trainables.trial import MODEL_DIR, STATE_FILE, run_trial
from trainables.tune_trainable import epoch_reporter


def _checkpoint(text: str) -> tempfile.TemporaryDirectory:
    d = tempfile.TemporaryDirectory(prefix="prunetune-test-ckpt-")
    (Path(d.name) / "f").write_text(text)
    return d


def test_reports_arrive_in_order_with_their_checkpoints_while_the_caller_goes_on():
    gate, got = threading.Event(), []

    def send(metrics, directory):
        gate.wait(10)  # the driver is busy: the caller must not wait for it
        got.append((metrics["epoch"], Path(directory).joinpath("f").read_text() if directory else None))

    reporter = ReportThread(send, ahead=8)
    dirs = [_checkpoint(f"state {e}") if e % 2 else None for e in range(1, 6)]
    t0 = time.monotonic()
    for epoch, d in enumerate(dirs, start=1):
        reporter.put({"epoch": epoch}, d)
    assert time.monotonic() - t0 < 1.0 and got == []  # five reports queued, none taken yet
    gate.set()
    reporter.close()
    assert got == [(1, "state 1"), (2, None), (3, "state 3"), (4, None), (5, "state 5")]
    assert not any(Path(d.name).exists() for d in dirs if d is not None)  # removed once persisted


def test_the_caller_runs_at_most_ahead_reports_beyond_the_one_being_sent():
    gate, taken = threading.Event(), []
    reporter = ReportThread(lambda m, d: (gate.wait(10), taken.append(m["epoch"])), ahead=2)
    for epoch in (1, 2, 3):  # 1 is being sent, 2 and 3 are queued
        reporter.put({"epoch": epoch})
    blocked = threading.Thread(target=reporter.put, args=({"epoch": 4},))
    blocked.start()
    blocked.join(0.5)
    assert blocked.is_alive() and taken == []
    gate.set()
    blocked.join(10)
    reporter.close()
    assert taken == [1, 2, 3, 4]


def test_a_waited_report_returns_only_after_it_was_answered():
    answered = []

    def send(metrics, directory):
        time.sleep(0.3)
        answered.append(metrics["epoch"])

    reporter = ReportThread(send, ahead=8)
    reporter.put({"epoch": 1})
    reporter.put({"epoch": 2}, wait=True)
    assert answered == [1, 2]
    reporter.close()


def _stopping_at(epoch: int, sent: list):
    def send(metrics, directory):
        sent.append(metrics["epoch"])
        if metrics["epoch"] == epoch:
            raise SystemExit(0)  # what Tune's session does in report() when the trial is stopped
    return send


def test_a_stop_answered_to_a_waited_report_ends_the_trial_there():
    sent = []
    reporter = ReportThread(_stopping_at(2, sent), ahead=8)
    reporter.put({"epoch": 1})
    with pytest.raises(SystemExit):
        reporter.put({"epoch": 2}, wait=True)  # a rung: the STOP answer ends the trial right here
    reporter.close(check=False)
    assert sent == [1, 2]


def test_a_stop_while_the_trial_trains_ends_it_at_its_next_report_which_is_dropped():
    sent = []
    reporter = ReportThread(_stopping_at(2, sent), ahead=8)
    reporter.put({"epoch": 1})
    reporter.put({"epoch": 2})
    time.sleep(0.3)  # the stop arrives while the trial trains epoch 3 ...
    late = _checkpoint("epoch 3")
    with pytest.raises(SystemExit):
        reporter.put({"epoch": 3}, late)  # ... and ends it at its next report
    with pytest.raises(SystemExit):
        reporter.close()
    assert sent == [1, 2] and not Path(late.name).exists()


def test_a_reporting_error_reaches_the_trial_and_close_waits_for_the_rest():
    def send(metrics, directory):
        if metrics["epoch"] == 2:
            raise OSError("checkpoint storage is full")

    reporter = ReportThread(send, ahead=8)
    reporter.put({"epoch": 1})
    reporter.put({"epoch": 2})
    with pytest.raises(OSError, match="storage is full"):
        reporter.close()


# ---- checkpoints taken while the trial trains on ------------------------------------------------------
@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return small_trial_settings(tmp_path_factory.mktemp("base_models"), seed=5, finetune_epochs=3)


def _slow_copy(root: Path, epochs: list[int]):
    """A Tune stand-in that persists each checkpoint late (the trial is an epoch further by then)."""
    def send(metrics, directory):
        time.sleep(0.2)
        epochs.append(metrics["epoch"])
        if directory:
            shutil.copytree(directory, root / f"epoch{metrics['epoch']}")
    return send


#: Wall-clock measurements, which differ from run to run (test_trial_resume.py excepts them too).
TIMED = ("epoch_seconds", "latency_ms", "dense_latency_ms", "latency_ratio")


def _same_state(a: Path, b: Path) -> None:
    ma, mb = load_model(a / MODEL_DIR)[0], load_model(b / MODEL_DIR)[0]
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), (a, b)
    ta, tb = torch.load(a / STATE_FILE, weights_only=True), torch.load(b / STATE_FILE, weights_only=True)
    timeless = lambda h: [{k: v for k, v in e.items() if k not in TIMED} for e in h]  # noqa: E731
    assert ta["epoch"] == tb["epoch"] and timeless(ta["history"]) == timeless(tb["history"])
    oa, ob = ta["optimizer"]["state"], tb["optimizer"]["state"]
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k]["momentum_buffer"], ob[k]["momentum_buffer"]) for k in oa)


def test_checkpoints_persisted_late_hold_their_own_epoch_and_resume_bit_for_bit(settings, tmp_path):
    hp = {"prune_ratio": 0.5}
    sync_root = tmp_path / "sync"

    def sync_report(metrics, save):  # the old way: the trial waits while its checkpoint is taken
        save(sync_root / f"epoch{metrics['epoch']}")

    run_trial(settings, "l1_norm", hp, sync_report)

    epochs, late_root = [], tmp_path / "late"
    reporter = ReportThread(_slow_copy(late_root, epochs), ahead=8)
    run_trial(settings, "l1_norm", hp, epoch_reporter(reporter, checkpoint_period_s=0))
    reporter.close()
    assert epochs == [1, 2, 3]
    for e in epochs:
        _same_state(sync_root / f"epoch{e}", late_root / f"epoch{e}")

    # Resumed from the checkpoint of epoch 1 (persisted while epoch 2 trained): the same end.
    resumed_root, resumed_epochs = tmp_path / "resumed", []
    reporter = ReportThread(_slow_copy(resumed_root, resumed_epochs), ahead=8)
    run_trial(settings, "l1_norm", hp, epoch_reporter(reporter, checkpoint_period_s=0),
              resume_from=late_root / "epoch1")
    reporter.close()
    assert resumed_epochs == [2, 3]
    _same_state(sync_root / "epoch3", resumed_root / "epoch3")
