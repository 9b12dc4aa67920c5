"""Multi-objective successive halving: exactly who is stopped on hand-made rung results, and a real
sweep where the stopped trials are PRUNED in the Optuna study, KILLED in MLflow and off the front."""
from __future__ import annotations

import csv

import pytest
from ray.tune.schedulers import TrialScheduler

from methods.errors import ConfigError
from search.config import load_config
from search.early_stopping import MultiObjectiveHalving, milestones, rung_order

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def _ft(epoch: int, accuracy: float, macs: float, **extra) -> dict:
    return {"stage": "finetune", "finetune_epoch": epoch, "epoch": epoch + 2, "accuracy": accuracy, "macs": macs,
            "params": 1000.0, **extra}


def test_milestones():
    assert milestones(1, 2, 20) == [1, 2, 4, 8, 16]
    assert milestones(2, 3, 50) == [2, 6, 18]
    assert milestones(1, 1.5, 6) == [1, 2, 3, 4, 6]  # 1, 1.5, 2.25, 3.375, 5.06: rounded up


def test_rungs_end_at_the_budget_over_the_reduction_factor():
    """As ASHA's last decision at max_t / eta: no rung where stopping would save less than a
    1/reduction_factor share of the trial (9 epochs, factor 2: a stop at 8 saved 1 epoch of 9)."""
    from search.early_stopping import rung_epochs

    assert rung_epochs(1, 2, 9) == [1, 2, 4]
    assert rung_epochs(1, 2, 8) == [1, 2, 4]
    assert rung_epochs(1, 2, 3) == [1]
    assert rung_epochs(1, 2, 1) == []
    assert rung_epochs(2, 3, 18) == [2, 6]
    assert rung_epochs(1, 2, None) == milestones(1, 2)
    s = MultiObjectiveHalving(["accuracy", "macs"], grace_epochs=1, reduction_factor=2, budgets=(9, 19))
    assert [r.epoch for r in s.rungs] == [1, 2, 4] and [r.epoch for r in s.scratch_rungs] == [1, 2, 4, 8]
    # Past the last rung a trial is never stopped, however bad it is.
    assert s.decide("a", _ft(8, 0.9, 100)) == CONTINUE and s.decide("b", _ft(8, 0.1, 100)) == CONTINUE
    assert s.decide("c", _ft(8, 0.9, 100), from_scratch=True) == CONTINUE
    assert s.decide("d", _ft(8, 0.1, 100), from_scratch=True) == STOP


def test_who_is_stopped_at_a_rung_by_hand():
    """Rung 1 (fine-tune epoch 1), reduction factor 2: the worst floor(n/2) of the n recorded there.
    Worked by hand: ranks, then exclusive hypervolume contributions (reference: accuracy 0, 1.1 x the
    largest MACs at the rung)."""
    s = MultiObjectiveHalving(["accuracy", "macs"], grace_epochs=1, reduction_factor=2)
    assert [r.epoch for r in s.rungs[:4]] == [1, 2, 4, 8]
    decisions = {}
    for tid, acc, macs in [
        ("t1", 0.80, 100),   # alone: continues
        ("t2", 0.70, 100),   # dominated by t1, n=2, worst 1: stopped
        ("t3", 0.90, 200),   # rank 0 beside t1; t2 is the worst of 3
        ("t4", 0.85, 150),   # n=4, worst 2; contributions (ref MACs 220): t1 40, t4 2.5, t3 1.0 -> t3, t2 worst
        ("t5", 0.95, 210),   # n=5, worst 2; ref 231: t1 40, t4 2.5, t5 1.05, t3 0.5 -> t3, t2 worst
        ("t6", 0.50, 50),    # n=6, worst 3; t6 25, t1 15, t4 2.5, t5 1.05, t3 0.5 -> t5, t3, t2 worst
        ("t7", 0.60, 300),   # dominated by t2 (rank 2), n=7, worst 3: stopped
        # In the worst 3 by order (ref 330: t6 25, t1 15, t5 4.8, t4 2.5, t3 0.25, t8 0.05, then t2,
        # t7), but on the rung's front (rank 0): it continues; only dominated trials are stopped.
        ("t8", 0.91, 205),
        ("t9", 0.88, 205),   # dominated by t8 (rank 1), n=9, worst 4: stopped
    ]:
        decisions[tid] = s.decide(tid, _ft(1, acc, macs))
    assert decisions == {"t1": CONTINUE, "t2": STOP, "t3": CONTINUE, "t4": CONTINUE, "t5": CONTINUE,
                         "t6": CONTINUE, "t7": STOP, "t8": CONTINUE, "t9": STOP}
    assert s.stopped == {"t2": (1, 1), "t7": (1, 1), "t9": (1, 1)}
    # Without the guard (the rule before it; the benchmarks' replays) t8 is stopped on its order alone.
    old = MultiObjectiveHalving(["accuracy", "macs"], grace_epochs=1, reduction_factor=2, keep_rung_front=False)
    old_decisions = {tid: old.decide(tid, _ft(1, *s.rungs[0].results[tid])) for tid in list(s.rungs[0].results)[:8]}
    assert old_decisions == {**{t: d for t, d in decisions.items() if t != "t9"}, "t8": STOP}
    rung = s.rungs[0].results
    assert rung_order(list(rung.values())[:8], ("max", "min"), (0.0, 330.0)) == [5, 0, 4, 3, 2, 7, 1, 6]

    # Rung 2 (fine-tune epoch 2) is a new comparison: the first arrival continues whatever it is.
    assert s.decide("t1", _ft(2, 0.10, 100)) == CONTINUE
    assert s.decide("t3", _ft(2, 0.05, 200)) == STOP  # dominated by t1 there
    # Between rungs, in the phase, a final result, a NaN, or a second report at a rung: never stopped.
    assert s.decide("t4", _ft(3, 0.0, 10**9)) == CONTINUE
    assert s.decide("t9", {"stage": "phase", "epoch": 1, "finetune_epoch": 0, "accuracy": 0.0, "macs": 1e9}) == CONTINUE
    assert s.decide("t9", _ft(1, 0.0, 1e9, test_accuracy=0.0)) == CONTINUE
    assert s.decide("t10", _ft(1, float("nan"), 1e9)) == CONTINUE
    assert s.decide("t1", _ft(1, 0.0, 1e9)) == CONTINUE
    assert set(s.rungs[0].results) == {f"t{i}" for i in range(1, 10)}


def test_three_objectives_and_accuracy_only():
    # Three objectives, rf 3: the worst floor(2n/3). b is dominated by a (same accuracy and MACs,
    # more params); c is on the front with a (fewer params, less accurate).
    s = MultiObjectiveHalving(["accuracy", "macs", "params"], grace_epochs=2, reduction_factor=3)
    assert [r.epoch for r in s.rungs[:3]] == [2, 6, 18]
    assert s.decide("a", _ft(2, 0.8, 100, params=10.0)) == CONTINUE
    assert s.decide("b", _ft(2, 0.8, 100, params=20.0)) == STOP      # n=2, worst 1
    assert s.decide("c", _ft(2, 0.7, 100, params=5.0)) == CONTINUE   # n=3, worst 2: b and ...
    assert s.decide("d", _ft(2, 0.6, 100, params=30.0)) == STOP      # n=4, worst 2: dominated twice
    # With the latency ratio (measured only at the end) the rungs compare accuracy alone.
    lat = MultiObjectiveHalving(["accuracy", "latency_ratio"], grace_epochs=1, reduction_factor=2)
    assert lat.names == ("accuracy",)
    assert [lat.decide(t, _ft(1, a, 1.0)) for t, a in [("x", 0.5), ("y", 0.6), ("z", 0.4)]] == [CONTINUE, CONTINUE, STOP]


def test_from_scratch_trials_are_judged_only_against_each_other():
    """Pruning from Scratch trains from fresh weights: after one epoch it is far below any fine-tuned
    trial. Its trials have rungs of their own (the cohort), so they are compared with each other only."""
    from types import SimpleNamespace

    s = MultiObjectiveHalving(["accuracy", "macs"], grace_epochs=1, reduction_factor=2)
    assert s.decide("f1", _ft(1, 0.90, 100)) == CONTINUE
    assert s.decide("f2", _ft(1, 0.88, 100)) == STOP                      # dominated by f1: worst 1 of 2
    assert s.decide("s1", _ft(1, 0.30, 100), from_scratch=True) == CONTINUE  # first of its cohort at rung 1
    assert s.decide("s2", _ft(1, 0.35, 100), from_scratch=True) == CONTINUE  # best of 2: s1 is the worst
    assert s.decide("s3", _ft(1, 0.20, 100), from_scratch=True) == STOP   # worst 1 of 3: s3 (not s1, not f2)
    assert s.decide("f3", _ft(1, 0.95, 100)) == CONTINUE                  # 3 fine-tuned: f2 stays the worst
    assert s.stopped == {"f2": (1, 1), "s3": (1, 1)}
    assert list(s.rungs[0].results) == ["f1", "f2", "f3"]
    assert list(s.scratch_rungs[0].results) == ["s1", "s2", "s3"]
    # The method decides the cohort (Tune's trial config names it); unknown names are fine-tuned ones.
    trial = SimpleNamespace(trial_id="s4", config={"method": "scratch", "scratch.prune_ratio": 0.5})
    assert s.on_trial_result(None, trial, _ft(1, 0.10, 100)) == STOP       # worst of the 4 from scratch
    trial = SimpleNamespace(trial_id="f4", config={"method": "l1_norm"})
    assert s.on_trial_result(None, trial, _ft(1, 0.10, 100)) == STOP       # worst of the 4 fine-tuned
    assert set(s.scratch_rungs[0].results) == {"s1", "s2", "s3", "s4"}
    # One set of rungs for all (the rule before): s1 would have been stopped against f1 and f2.
    one = MultiObjectiveHalving(["accuracy", "macs"], grace_epochs=1, reduction_factor=2)
    assert [one.decide(t, _ft(1, a, 100)) for t, a in [("f1", 0.90), ("f2", 0.88), ("s1", 0.30)]] == [
        CONTINUE, STOP, STOP]


def test_scheduler_state_round_trip_decides_as_the_original():
    """get_state / set_state (what Tune's experiment checkpoint carries through the recorder): a
    restored scheduler holds the same records and makes the same next decisions."""
    import pickle

    from search.early_stopping import StoppedTrialRecorder

    s = MultiObjectiveHalving(["accuracy", "macs"], grace_epochs=1, reduction_factor=2)
    for tid, acc, macs in [("t1", 0.8, 100), ("t2", 0.7, 100), ("t3", 0.9, 200)]:
        s.decide(tid, _ft(1, acc, macs))
    s.decide("t1", _ft(2, 0.85, 100))
    s.decide("s1", _ft(1, 0.3, 100), from_scratch=True)
    state = pickle.loads(pickle.dumps(StoppedTrialRecorder("sqlite:///x.db", "p", s).get_state()))
    restored = MultiObjectiveHalving(["accuracy", "macs"], grace_epochs=1, reduction_factor=2)
    StoppedTrialRecorder("sqlite:///x.db", "p", restored).set_state(state)
    assert restored.get_state() == s.get_state()
    assert restored.stopped == {"t2": (1, 1)}
    for tid, result, scratch in [("t4", _ft(1, 0.75, 150), False), ("t3", _ft(2, 0.80, 200), False),
                                 ("s2", _ft(1, 0.2, 100), True)]:
        assert restored.decide(tid, result, scratch) == s.decide(tid, result, scratch)
    assert restored.stopped == s.stopped == {"t2": (1, 1), "t4": (1, 1), "t3": (2, 2), "s2": (1, 1)}


@pytest.mark.parametrize("override, message", [
    ("early_stopping.type=asha", "early_stopping.type: expected one of none, successive_halving, got 'asha'"),
    ("early_stopping.grace_epochs=0", "early_stopping.grace_epochs: must be an integer >= 1, got 0"),
    ("early_stopping.reduction_factor=1", "early_stopping.reduction_factor: must be a number > 1, got 1"),
    ("early_stopping.rungs=3", "early_stopping: unknown key 'rungs'"),
])
def test_bad_early_stopping_config_is_one_line(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("configs/quickstart.yaml", [override])
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


# ---- a real sweep ----------------------------------------------------------------------------------------------
def test_sweep_stops_trials_prunes_them_in_optuna_and_keeps_them_off_the_front(ray_local, tmp_path, capfd, caplog):
    """`prunetune run`: 4 trials, 2 fine-tune epochs, a rung after the first with reduction factor 4
    (the worst floor(3n/4) stop): later arrivals stop unless they are the best so far. With a MACs
    budget (max_macs_fraction 0.5): prune_ratio is sampled in [0.5, 0.8] only, every trial carries
    its constraint in Optuna, and each finished one is tagged feasible exactly when it is. The
    output: one progress line per trial, no Tune tables, no snapshot warnings."""
    import logging
    import re
    from pathlib import Path

    import optuna
    from mlflow.tracking import MlflowClient
    from ray.tune.search import Searcher

    from search.cli import main
    from search.early_stopping import STOPPED_EPOCH_TAG, STOPPED_RUNG_TAG
    from search.searcher import ParetoOptunaSearch
    from search.tracking import TRIAL_TAG, child_runs

    overrides = [
        "methods=[l1_norm, random]", "num_trials=4", "max_concurrent_trials=2", "base.epochs=2",
        "finetune.epochs=4", "space.prune_ratio=[0.2, 0.8]", "sampler=random", "name=es",
        "early_stopping={type: successive_halving, grace_epochs: 1, reduction_factor: 4}",
        "constraints.max_macs_fraction=0.5",
        f"tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"storage_path={tmp_path}/ray_results"]
    caplog.set_level(logging.INFO, logger="search.progress")
    assert main(["run", "configs/quickstart.yaml", *[a for o in overrides for a in ("--set", o)]]) == 0
    out, err = capfd.readouterr()
    exp_dir = Path(re.search(r"^sweep directory: (.+)$", out, re.M).group(1))
    finished, stopped_count = map(int, re.search(r"trials finished: (\d+), stopped early: (\d+)", out).groups())
    cfg = load_config("configs/quickstart.yaml", overrides)

    searcher = ParetoOptunaSearch.__new__(ParetoOptunaSearch)
    Searcher.restore_from_dir(searcher, str(exp_dir))
    states = {tid: searcher._ot_study.trials[t.number].state for tid, t in searcher._ot_trials.items()}
    assert len(states) == 4
    client = MlflowClient(cfg.tracking_uri)
    parent_run_id = re.search(r"^MLflow parent run: (\w+)$", out, re.M).group(1)
    runs = {r.data.tags[TRIAL_TAG]: r for r in child_runs(client, parent_run_id)}
    assert set(runs) == set(states)
    pruned = {tid for tid, st in states.items() if st == optuna.trial.TrialState.PRUNED}
    complete = {tid for tid, st in states.items() if st == optuna.trial.TrialState.COMPLETE}
    assert pruned and complete and pruned | complete == set(states)
    assert (finished, stopped_count) == (len(complete), len(pruned))
    for tid in pruned:
        run = runs[tid]
        assert run.info.status == "KILLED"
        assert (run.data.tags[STOPPED_RUNG_TAG], run.data.tags[STOPPED_EPOCH_TAG]) == ("1", "1")
        assert run.data.tags.get("pareto") != "true" and "test_accuracy" not in run.data.metrics
    for tid in complete:
        assert runs[tid].info.status == "FINISHED" and STOPPED_RUNG_TAG not in runs[tid].data.tags
    with open(exp_dir / "front" / "pareto_front.csv") as f:
        front_ids = {row["run_id"] for row in csv.DictReader(f)}
    assert front_ids and front_ids <= {runs[t].info.run_id for t in complete}
    assert front_ids == {r.info.run_id for r in runs.values() if r.data.tags.get("pareto") == "true"}

    # The budget: narrowed space, constraint values in the study, feasibility tags from the metrics.
    dense = client.get_run(parent_run_id).data.metrics["dense_macs"]
    for tid, ot in searcher._ot_trials.items():
        frozen = searcher._ot_study.trials[ot.number]
        assert frozen.params["prune_ratio"] >= 0.5  # one parameter for every method (search.space)
        assert set(frozen.constraints) == {"max_macs_fraction"}
        m = runs[tid].data.metrics
        assert frozen.constraints["max_macs_fraction"] == pytest.approx(m["macs"] / dense - 0.5, abs=1e-9)
    for tid in complete:
        m = runs[tid].data.metrics
        assert m["dense_macs"] == dense
        want = "true" if m["macs"] / dense <= 0.5 + 1e-12 else "false"
        assert runs[tid].data.tags["prunetune.feasible"] == want

    # The output: one line per trial, each with the sweep's progress; no Tune tables or snapshot warnings.
    lines = [r.getMessage() for r in caplog.records if r.name == "search.progress"]
    assert len(lines) == 4 and all(re.match(r"\[\d/4 done, [0-2] running\] trial \w+ \((l1_norm|random)\) ", ln)
                                   for ln in lines)
    assert sorted(int(ln[1]) for ln in lines) == [1, 2, 3, 4]
    for tid in pruned:
        assert sum(f"trial {tid} " in ln and "stopped at rung 1 (fine-tune epoch 1)" in ln for ln in lines) == 1
    for tid in complete:
        assert sum(f"trial {tid} " in ln and " finished: " in ln for ln in lines) == 1
    assert "╭" not in out + err and "Trial status" not in out + err and "snapshotting" not in out + err


def _scheduler_state(exp_dir) -> dict:
    """The early-stopping records in Tune's newest callback checkpoint of the sweep (one file per
    driver session, named by the session's start time)."""
    import pickle
    from pathlib import Path

    newest = max(Path(exp_dir).glob("callback-states-*.pkl"), key=lambda p: p.name)
    states = pickle.loads(newest.read_bytes())
    (state,) = [s["scheduler"] for s in states.values() if s and "scheduler" in s]
    return state


def test_rung_records_survive_an_interrupted_and_resumed_sweep(ray_local, tmp_path):
    """SIGINT once the first trial has ended (one trial at a time), then `resume`: the rung records
    of the trials before the interruption are restored (not restarted empty, where the next trial
    would be the first at its rung and always continue), and the stopping decisions of the whole
    sweep are exactly those of one scheduler fed every recorded result in arrival order."""
    import os
    import signal
    import threading
    import time

    from mlflow.tracking import MlflowClient

    from search.early_stopping import STOPPED_EPOCH_TAG, STOPPED_RUNG_TAG
    from search.sweep import SweepInterrupted, resume_sweep, run_sweep
    from search.tracking import TRIAL_TAG, child_runs

    overrides = [
        "methods=[l1_norm, random]", "num_trials=4", "max_concurrent_trials=1", "base.epochs=1",
        "finetune.epochs=3", "space.prune_ratio=[0.2, 0.8]", "sampler=random", "name=esr", "checkpoint_period_s=0",
        "early_stopping={type: successive_halving, grace_epochs: 1, reduction_factor: 2}",
        f"tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"storage_path={tmp_path}/ray_results"]
    cfg = load_config("configs/quickstart.yaml", overrides)
    done = threading.Event()

    def interrupt_after_first_trial():
        client = MlflowClient(cfg.tracking_uri)
        while not done.wait(0.5):
            try:
                (exp,) = [e for e in client.search_experiments() if e.name == "esr"]
                runs = client.search_runs([exp.experiment_id], filter_string="tags.`prunetune.trial_id` != ''")
            except Exception:  # noqa: BLE001  (the database or experiment is not there yet)
                continue
            if any(r.info.status != "RUNNING" for r in runs):
                os.kill(os.getpid(), signal.SIGINT)
                return

    watcher = threading.Thread(target=interrupt_after_first_trial, daemon=True)
    watcher.start()
    try:
        with pytest.raises(SweepInterrupted) as info:
            run_sweep(cfg)
    finally:
        done.set()
        watcher.join()
    exp_dir = info.value.experiment_dir
    before = _scheduler_state(exp_dir)
    recorded_before = {tid for _, results in before["rungs"] for tid, _ in results}
    assert recorded_before and len(recorded_before) < 4

    time.sleep(1.1)  # the resumed session's files are named by a later second
    result = resume_sweep(exp_dir)
    after = _scheduler_state(exp_dir)
    # The records from before the interruption are all there, unchanged.
    for (epoch, results_before), (epoch_after, results_after) in zip(before["rungs"], after["rungs"]):
        assert epoch == epoch_after
        assert [r for r in results_after if r[0] in dict(results_before)] == results_before
    assert {tid for tid, _ in after["rungs"][0][1]} == {r.data.tags[TRIAL_TAG] for r in child_runs(
        MlflowClient(cfg.tracking_uri), result.parent_run_id)}  # all 4 trials reached rung 1

    # Replay: one scheduler, every trial's results in arrival order (one trial at a time).
    replay = MultiObjectiveHalving(["accuracy", "macs"], grace_epochs=1, reduction_factor=2)
    order = [tid for tid, _ in after["rungs"][0][1]]
    for tid in order:
        for epoch, results in after["rungs"]:
            values = dict(results).get(tid)
            if values is not None:
                replay.decide(tid, _ft(epoch, values[0], values[1]))
    assert replay.stopped == {tid: tuple(v) for tid, v in after["stopped"].items()}
    runs = {r.data.tags[TRIAL_TAG]: r for r in child_runs(MlflowClient(cfg.tracking_uri), result.parent_run_id)}
    tagged = {tid: (int(r.data.tags[STOPPED_RUNG_TAG]), int(r.data.tags[STOPPED_EPOCH_TAG]))
              for tid, r in runs.items() if STOPPED_RUNG_TAG in r.data.tags}
    assert tagged == replay.stopped and result.stopped == len(tagged)


def test_a_trial_waits_for_the_schedulers_answer_at_every_rung_and_nowhere_else():
    """Trials report from a thread of their own and train on (trainables.report_thread), except at
    the fine-tune epochs where the scheduler may stop them: every rung a trial can reach (a
    from-scratch trial fine-tunes base + fine-tune epochs), none without early stopping."""
    from search.early_stopping import all_rung_epochs

    es = "early_stopping={type: successive_halving, grace_epochs: 1, reduction_factor: 2}"
    rungs = lambda *overrides: all_rung_epochs(load_config("configs/quickstart.yaml", list(overrides)))  # noqa: E731
    # Fine-tuned trials: up to 3 / 2 epochs -> rung 1; from scratch: up to 13 / 2 -> 1, 2, 4.
    assert rungs(es, "base.epochs=10", "finetune.epochs=3") == (1, 2, 4)
    assert rungs(es, "base.epochs=2", "finetune.epochs=1") == (1,)  # from scratch only (3 / 2)
    assert rungs("early_stopping.type=none") == ()
