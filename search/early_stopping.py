"""Multi-objective early stopping: asynchronous successive halving on the sweep's objectives.

Rungs are counted in fine-tune epochs, the epochs after the cut (a trial reports ``stage`` and
``finetune_epoch`` every epoch; see ``trainables.trial``): ``grace_epochs``, then ``grace_epochs *
reduction_factor``, ``* reduction_factor**2``, ... up to the trial's budget divided by
``reduction_factor`` (``rung_epochs``), as in ASHA, whose last decision is at ``max_t / eta``: a
rung later than that would stop a trial that has spent most of its budget, saving less than a
``1/reduction_factor`` share of it and losing a finished candidate for the front (with 9 fine-tune
epochs and factor 2 the rungs are 1, 2, 4, no longer 8). When a trial reaches a rung, its objectives
(those every epoch reports: accuracy, MACs, params; the latency ratio is measured only at the end)
are recorded there and compared with every trial recorded at that rung so far, itself included:

1. order them by non-dominated rank (``search.pareto.ranks``), ties broken by exclusive
   hypervolume contribution within the rank's layer, larger first (reference from
   ``search.objectives``: zero accuracy, 1.1 x the largest MACs / params at the rung);
2. the trial is stopped when its place falls in the worst ``floor(n * (1 - 1 / reduction_factor))``
   of the ``n`` (so the first trial at a rung always continues, as in ASHA) and another trial at the
   rung dominates it. A trial on the rung's own front is never stopped, whatever its hypervolume
   contribution: after a heavy cut, accuracy one or two epochs in says little about the end (on the
   quickstart with 9 fine-tune epochs, trials that ended on the front were at 0.10-0.19 after epoch
   1; rank correlation with the final accuracy 0.58-0.76 at epoch 1, 0.91-0.96 at epoch 4), and such
   a trial is the rung's cheapest, so only a cheaper and better one can rule it out. Replayed on
   nine such sweeps' full histories the rule without this guard stopped 19 of the 40 trials that
   ended on a front, with it 6 (``benchmarks/RESULTS.md``, "Early stopping's signal").

Methods that train the pruned network from fresh weights (``from_scratch``: Pruning from Scratch)
are compared only with each other, at rungs of their own: after k epochs such a trial is still
early in training from random weights (with the base + fine-tune budget, see
``trainables.trial``), while a fine-tuned trial starts near its final accuracy, so one set of rungs
would stop every from-scratch trial at the first rung whatever it would become. Within each of the
two cohorts the rule above is unchanged (the first from-scratch trial at a rung always continues).

The rung records (and who was stopped where) are the scheduler's state: ``StoppedTrialRecorder``
hands them to Tune's experiment checkpoint (``get_state``/``set_state``), so ``prunetune resume``
restores them and a resumed sweep decides as the uninterrupted one would have.

A trial's final result (it carries ``test_accuracy``) is never stopped. A stopped trial ends with
Tune's STOP: the searcher tells Optuna PRUNED (its last result has no ``test_accuracy``) and
:class:`StoppedTrialRecorder` marks its MLflow run KILLED with ``prunetune.stopped_at_rung`` (1 for
the first rung) and ``prunetune.stopped_at_epoch`` (fine-tune epochs done), so it never reaches a front.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from ray.tune.callback import Callback
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from methods.errors import ArgumentError

from . import objectives as _obj
from .pareto import contributions, ranks

__all__ = ["MultiObjectiveHalving", "StoppedTrialRecorder", "rung_order", "stopped_at_rung", "milestones",
           "STOPPED_RUNG_TAG", "STOPPED_EPOCH_TAG", "FROM_SCRATCH", "rung_epochs", "all_rung_epochs",
           "trial_budgets"]

log = logging.getLogger(__name__)
STOPPED_RUNG_TAG = "prunetune.stopped_at_rung"
STOPPED_EPOCH_TAG = "prunetune.stopped_at_epoch"
FINAL_KEY = "test_accuracy"
FROM_SCRATCH = "from_scratch"  # the cohort of methods that train the pruned net from fresh weights


def milestones(grace_epochs: int, reduction_factor: float, limit: int = 10_000) -> list[int]:
    """Fine-tune epochs at which the rungs lie: grace, grace * rf, grace * rf^2, ... (rounded up,
    strictly increasing) up to ``limit``."""
    out, value = [], float(grace_epochs)
    while value <= limit:
        rung = math.ceil(value - 1e-9)
        if not out or rung > out[-1]:
            out.append(rung)
        value *= reduction_factor
    return out


def rung_epochs(grace_epochs: int, reduction_factor: float, budget: int | None) -> list[int]:
    """The rungs of trials that train ``budget`` epochs after the cut: the milestones up to
    ``budget / reduction_factor`` (None: no budget known, every milestone)."""
    if budget is None:
        return milestones(grace_epochs, reduction_factor)
    return milestones(grace_epochs, reduction_factor, limit=budget / reduction_factor + 1e-9)


def rung_order(points: Sequence[Sequence[float]], directions: Sequence[str],
               reference: Sequence[float]) -> list[int]:
    """Indices of ``points`` from best to worst: non-dominated rank, then hypervolume contribution
    within the rank (larger first), then arrival (the index). One objective: its value."""
    n = len(points)
    if len(directions) == 1:
        sign = -1.0 if directions[0] == "max" else 1.0
        return sorted(range(n), key=lambda i: (sign * points[i][0], i))
    rank = ranks(points, directions)
    contribution = [0.0] * n
    for r in set(rank):
        layer = [i for i in range(n) if rank[i] == r]
        for i, c in zip(layer, contributions([points[i] for i in layer], reference, directions)):
            contribution[i] = c
    return sorted(range(n), key=lambda i: (rank[i] if rank[i] >= 0 else math.inf, -contribution[i], i))


def stopped_at_rung(points: Sequence[Sequence[float]], index: int, directions: Sequence[str],
                    reference: Sequence[float], reduction_factor: float, keep_rung_front: bool = True) -> bool:
    """Whether ``points[index]`` falls in the worst ``floor(n (1 - 1/rf))`` of the rung's ``n`` points
    and (``keep_rung_front``, module docstring) is dominated there."""
    n = len(points)
    worst = math.floor(n * (1.0 - 1.0 / reduction_factor) + 1e-9)
    if rung_order(points, directions, reference).index(index) < n - worst:
        return False
    return not keep_rung_front or len(directions) == 1 or ranks(points, directions)[index] > 0


@dataclass
class _Rung:
    epoch: int
    results: dict[str, tuple[float, ...]] = field(default_factory=dict)  # trial id -> objectives, in arrival order


class MultiObjectiveHalving(FIFOScheduler):
    """The scheduler (module docstring). ``objectives`` are the sweep's names (``search.objectives``);
    ``budgets``: the epochs after the cut of a fine-tuned trial and of a from-scratch one (None: no
    cap on the rungs). ``keep_rung_front=False``: the rule before the guard (for the benchmarks'
    replays)."""

    def __init__(self, objectives: Sequence[str], grace_epochs: int = 1, reduction_factor: float = 2,
                 budgets: tuple[int | None, int | None] = (None, None), keep_rung_front: bool = True):
        super().__init__()
        self.names = tuple(n for n in objectives if _obj.get(n).every_epoch)
        if not self.names:
            raise ArgumentError(f"early stopping needs an objective every epoch reports, got {list(objectives)}")
        self.grace_epochs = int(grace_epochs)
        self.reduction_factor = float(reduction_factor)
        self.budgets = tuple(budgets)
        self.keep_rung_front = keep_rung_front
        self.rungs = self._new_rungs()                # trials fine-tuned from the dense model
        self.scratch_rungs = self._new_rungs(True)    # trials trained from fresh weights (their own cohort)
        self.stopped: dict[str, tuple[int, int]] = {}  # trial id -> (rung number from 1, fine-tune epochs)
        self._first_finetune: dict[str, int] = {}

    def _new_rungs(self, from_scratch: bool = False) -> list[_Rung]:
        budget = getattr(self, "budgets", (None, None))[1 if from_scratch else 0]
        return [_Rung(m) for m in rung_epochs(self.grace_epochs, self.reduction_factor, budget)]

    def get_state(self) -> dict[str, Any]:
        """The rung records and decisions (plain data), for Tune's experiment checkpoint."""
        return {"rungs": [(r.epoch, list(r.results.items())) for r in self.rungs],
                "scratch_rungs": [(r.epoch, list(r.results.items())) for r in self.scratch_rungs],
                "stopped": dict(self.stopped), "first_finetune": dict(self._first_finetune)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore what ``get_state`` returned (rung epochs must match: same config)."""
        for attr in ("rungs", "scratch_rungs"):
            rungs = self._new_rungs(attr == "scratch_rungs")
            for rung, (epoch, results) in zip(rungs, state.get(attr, ())):
                if rung.epoch == epoch:
                    rung.results = {tid: tuple(v) for tid, v in results}
            setattr(self, attr, rungs)
        self.stopped = {tid: tuple(v) for tid, v in state.get("stopped", {}).items()}
        self._first_finetune = dict(state.get("first_finetune", {}))

    def _finetune_epoch(self, trial_id: str, result: dict[str, Any]) -> int | None:
        if result.get("stage") != "finetune":
            return None
        if isinstance(result.get("finetune_epoch"), (int, float)):
            return int(result["finetune_epoch"])
        epoch = int(result.get("epoch", 0))  # older trainables: count from the first fine-tune epoch seen
        return epoch - self._first_finetune.setdefault(trial_id, epoch) + 1

    def on_trial_result(self, tune_controller, trial, result: dict[str, Any]) -> str:
        return self.decide(trial.trial_id, result, from_scratch=_from_scratch((trial.config or {}).get("method")))

    def decide(self, trial_id: str, result: dict[str, Any], from_scratch: bool = False) -> str:
        """CONTINUE or STOP for one reported result (the scheduler's whole logic, without Tune).
        ``from_scratch``: the trial's method trains from fresh weights (compared only with its like)."""
        ft = self._finetune_epoch(trial_id, result)
        if ft is None or FINAL_KEY in result or result.get("nonfinite"):
            return TrialScheduler.CONTINUE
        rungs = getattr(self, "scratch_rungs", None) if from_scratch else self.rungs
        if rungs is None:  # a scheduler pickled before the cohorts existed
            rungs = self.scratch_rungs = self._new_rungs(True)
        for number, rung in enumerate(rungs, start=1):
            if rung.epoch != ft or trial_id in rung.results:
                continue
            values = tuple(float(result.get(_obj.get(n).metric, math.nan)) for n in self.names)
            if not all(math.isfinite(v) for v in values):
                return TrialScheduler.CONTINUE
            rung.results[trial_id] = values
            ids = list(rung.results)
            points = [rung.results[t] for t in ids]
            directions = _obj.directions(self.names)
            reference = _obj.reference(self.names, {}, points)
            if stopped_at_rung(points, ids.index(trial_id), directions, reference, self.reduction_factor,
                               getattr(self, "keep_rung_front", True)):
                self.stopped[trial_id] = (number, ft)
                log.debug("trial %s stopped at rung %d (fine-tune epoch %d): among the worst %d of %d there%s",
                          trial_id, number, ft, math.floor(len(ids) * (1 - 1 / self.reduction_factor) + 1e-9),
                          len(ids), " (from-scratch cohort)" if from_scratch else "")
                return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        return (f"Multi-objective successive halving on {', '.join(self.names)}: rungs at fine-tune epochs "
                f"{[r.epoch for r in self.rungs[:6]]} (from scratch: {[r.epoch for r in self.scratch_rungs[:6]]}), "
                f"{len(self.stopped)} stopped")


def _from_scratch(method: str | None) -> bool:
    """Whether ``method`` trains the pruned network from fresh weights (unknown names: no)."""
    if not method:
        return False
    from methods.registry import get_method_class

    try:
        return bool(get_method_class(method).from_scratch)
    except Exception:  # noqa: BLE001  (a name the registry does not know: the fine-tuned cohort)
        return False


class StoppedTrialRecorder(Callback):
    """Marks the MLflow runs of trials the scheduler stopped: status KILLED, tags
    ``STOPPED_RUNG_TAG`` and ``STOPPED_EPOCH_TAG``. Listed after the MLflow trial logger (which has
    set the run FINISHED by then). Also carries the scheduler's state through Tune's experiment
    checkpoints (Tune saves callbacks' states, not schedulers'; both are restored from the one
    ``tuner.pkl``, so ``self.scheduler`` is the scheduler Tune restores)."""

    def __init__(self, tracking_uri: str, parent_run_id: str, scheduler: MultiObjectiveHalving):
        self.tracking_uri = tracking_uri
        self.parent_run_id = parent_run_id
        self.scheduler = scheduler

    def get_state(self) -> dict[str, Any] | None:
        return {"scheduler": self.scheduler.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if "scheduler" in state:
            self.scheduler.set_state(state["scheduler"])
            log.info("early stopping: rung records restored (%d trials recorded, %d stopped)",
                     len({t for r in self.scheduler.rungs + self.scheduler.scratch_rungs for t in r.results}),
                     len(self.scheduler.stopped))

    def on_trial_complete(self, iteration, trials, trial, **info):
        stop = self.scheduler.stopped.get(trial.trial_id)
        if stop is None:
            return
        from mlflow.tracking import MlflowClient

        from .tracking import TRIAL_TAG, child_runs

        client = MlflowClient(self.tracking_uri)
        for run in child_runs(client, self.parent_run_id):
            if run.data.tags.get(TRIAL_TAG) == trial.trial_id:
                client.set_tag(run.info.run_id, STOPPED_RUNG_TAG, str(stop[0]))
                client.set_tag(run.info.run_id, STOPPED_EPOCH_TAG, str(stop[1]))
                client.set_terminated(run.info.run_id, status="KILLED")


def trial_budgets(cfg) -> tuple[int, int]:
    """Epochs after the cut of a fine-tuned trial and of a from-scratch one, which trains base +
    fine-tune epochs (``trainables.trial._plan``)."""
    return cfg.finetune.epochs, cfg.base.epochs + cfg.finetune.epochs


def all_rung_epochs(cfg) -> tuple[int, ...]:
    """Every fine-tune epoch at which either cohort may be stopped (none without early stopping):
    a trial waits for the driver's answer to those reports before it trains on."""
    es = cfg.early_stopping
    if not es.enabled:
        return ()
    return tuple(sorted({e for b in trial_budgets(cfg) for e in rung_epochs(es.grace_epochs, es.reduction_factor, b)}))


def scheduler_and_callbacks(cfg, parent_run_id: str) -> tuple[TrialScheduler | None, list[Callback]]:
    """The sweep's scheduler (None: Tune's FIFO) and the callbacks it needs, from ``cfg.early_stopping``."""
    es = cfg.early_stopping
    if not es.enabled:
        return None, []
    scheduler = MultiObjectiveHalving(cfg.objectives, es.grace_epochs, es.reduction_factor, trial_budgets(cfg))
    log.info("early stopping: %s", scheduler.debug_string())
    if not scheduler.rungs:
        log.warning("early stopping stops no fine-tuned trial: its first rung (%d epochs) is past finetune.epochs "
                    "(%d) / reduction_factor (%g)", es.grace_epochs, cfg.finetune.epochs, es.reduction_factor)
    return scheduler, [StoppedTrialRecorder(cfg.tracking_uri, parent_run_id, scheduler)]
