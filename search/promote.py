"""Promote the best model on a sweep's Pareto front to the MLflow Model Registry.

``prunetune promote EXPERIMENT --name NAME [--max-macs N | --max-latency-ratio R | --min-accuracy A]
[--alias champion] [--latest] [--allow-running]``

EXPERIMENT is a sweep directory or an MLflow experiment name; a name means all its sweeps (the best
over their fronts, and the output says which sweep it came from), ``--latest`` its latest only.

0. The sweep must be finished (its parent run FINISHED): a running, interrupted or failed sweep has
   no final front, so it is refused in one line unless ``--allow-running`` (of an experiment's
   several sweeps, the unfinished ones are left out, with a warning naming them).
1. Candidates: each sweep's front of (accuracy, its searched cost: MACs or ``latency_ratio``, per the
   sweep's ``objective``) (trial runs tagged ``pareto=true``; recomputed with ``search.pareto.front``
   when some finished trial has no ``pareto`` tag).
2. Choice: with ``--max-macs`` the most accurate with ``macs <= N``; with ``--max-latency-ratio`` the
   most accurate with ``latency_ratio <= R`` (pruned / dense latency as the trial measured it); with
   ``--min-accuracy`` the cheapest (in the searched cost) with ``accuracy >= A`` (validation
   accuracy, the searched metric); with none the most accurate. Nothing meets the budget:
   ``ConfigError`` listing the front, nothing registered.
3. The run's ``model/`` artifacts are rebuilt with ``trainables.model_io.load_model`` and
   re-evaluated on the TEST split of the sweep's data set (config from the sweep's state file, else
   from the parent run's params).
4. The trial's own MLflow model (every finished trial logs one: pt2, ``search.mlflow_model``) is
   registered as NAME, so the version's source run is the trial, which is tagged
   ``promoted_to=NAME/VERSION``. A new run in the sweep's experiment (tagged with the source run; not
   a child of the parent run, so it never counts as a trial) records the re-evaluation; for a trial
   recorded before trials had an MLflow model, it logs the model itself with
   ``mlflow.pytorch.log_model`` in the pickle-free ``pt2`` format (``torch.export``: no prunetune
   class is needed to load it), with an input example and explicit ``pip_requirements``. The version
   is tagged with its metrics, method, source run and sweep run.
5. The alias (default ``champion``) moves to the new version only if the re-evaluated test accuracy
   matches the recorded one within ``tolerance``; otherwise the version is tagged
   ``validation=failed``, the alias stays where it was and :class:`PromotionError` is raised.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

from methods.errors import ConfigError, MissingFileError, PruneTuneError

from .compare import DEFAULT_TRACKING_URI, SweepRef, resolve_sweeps
from .fronts import FEASIBLE_TAG, TrialPoint, front_of, sweep_points
from .mlflow_model import log_pt2_model, trial_model_id
from .mlflow_model import tracking_uri as _tracking_uri
from .tracking import child_runs

__all__ = ["promote", "PromotionResult", "PromotionError", "select_candidate", "pareto_candidates",
           "add_promote_command", "SOURCE_RUN_TAG", "PROMOTION_TAG"]

log = logging.getLogger(__name__)
SOURCE_RUN_TAG = "prunetune.source_run_id"
SWEEP_RUN_TAG = "prunetune.sweep_run_id"
PROMOTION_TAG = "prunetune.promotion"
PROMOTED_TO_TAG = "promoted_to"  # on the trial run: NAME/VERSION
VALIDATION_FAILED_EXIT = 1
_EXAMPLE_BATCH = 4  # > 1, so the exported program keeps a dynamic batch dimension


class PromotionError(PruneTuneError):
    """The model was registered but failed validation: the alias was NOT moved. ``.result`` says what."""

    def __init__(self, message: str, result: "PromotionResult"):
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class PromotionResult:
    name: str
    version: str
    alias: str
    alias_moved: bool
    validated: bool
    source_run_id: str
    promotion_run_id: str
    sweep_run_id: str
    method: str
    accuracy: float                 # validation accuracy recorded by the trial
    test_accuracy: float            # test accuracy recorded by the trial
    reevaluated_test_accuracy: float
    macs: float
    params: float
    model_uri: str                  # models:/NAME/VERSION
    logged_model_id: str            # MLflow 3 LoggedModel id (the version's source is models:/<id>)
    log_model_seconds: float
    latency_ratio: float = math.nan  # pruned / dense latency recorded by the trial (NaN for old sweeps)
    sweep: str = ""                  # the sweep it came from (label: directory, or experiment@sweep run name)


# ---- choosing ------------------------------------------------------------------------------------------------
def pareto_candidates(ref: SweepRef) -> list[TrialPoint]:
    """The sweep's front in its objectives, cheapest first: runs tagged ``pareto=true``, or the
    front recomputed if tags are missing. Trials outside the sweep's constraints
    (``prunetune.feasible=false``) are never candidates."""
    client = ref.client()
    points = sweep_points(client, ref.parent_run_id, ref.objectives)
    runs = {r.info.run_id: r.data.tags for r in child_runs(client, ref.parent_run_id)}
    points = [p for p in points if runs.get(p.run_id, {}).get(FEASIBLE_TAG) != "false"]
    if not points:
        raise ConfigError(f"sweep {ref.label!r} (run {ref.parent_run_id}) has no finished feasible trial to promote")
    tags = {run_id: t.get("pareto") for run_id, t in runs.items()}
    if all(tags.get(p.run_id) in ("true", "false") for p in points):
        best = [p for p in points if tags[p.run_id] == "true"]
    else:
        log.info("sweep %s: some trials have no pareto tag; recomputing the front", ref.label)
        best = front_of(points, ref.objectives)
    return sorted(best, key=lambda p: (p.cost, -p.accuracy))


def _describe(p: TrialPoint) -> str:
    latency = f" latency_ratio {p.latency_ratio:.3f}" if math.isfinite(p.latency_ratio) else ""
    return f"{p.method} accuracy {p.accuracy:.4f} MACs {p.macs:,.0f}{latency} (run {p.run_id})"


def select_candidate(candidates: Sequence[TrialPoint], max_macs: float | None = None,
                     min_accuracy: float | None = None, max_latency_ratio: float | None = None) -> TrialPoint:
    """Pick from the front under the budget (see the module docstring); ConfigError if none fits.
    "Cheapest" and ties are in each point's searched cost (``TrialPoint.cost``)."""
    budgets = [flag for flag, value in (("--max-macs", max_macs), ("--max-latency-ratio", max_latency_ratio),
                                        ("--min-accuracy", min_accuracy)) if value is not None]
    if len(budgets) > 1:
        raise ConfigError(f"promote: give one budget (--max-macs, --max-latency-ratio or --min-accuracy), "
                          f"not both {budgets[0]} and {budgets[1]}")
    if max_macs is not None:
        fits = [p for p in candidates if p.macs <= max_macs]
        pick = max(fits, key=lambda p: (p.accuracy, -p.cost)) if fits else None
        budget = f"macs <= {max_macs:,.0f}" if float(max_macs).is_integer() else f"macs <= {max_macs:,g}"
    elif max_latency_ratio is not None:
        fits = [p for p in candidates if p.latency_ratio <= max_latency_ratio]  # NaN (old sweeps) never fits
        pick = max(fits, key=lambda p: (p.accuracy, -p.cost)) if fits else None
        budget = f"latency_ratio <= {max_latency_ratio:g}"
    elif min_accuracy is not None:
        fits = [p for p in candidates if p.accuracy >= min_accuracy]
        pick = min(fits, key=lambda p: (p.cost, -p.accuracy)) if fits else None
        budget = f"validation accuracy >= {min_accuracy:g}"
    else:
        pick = max(candidates, key=lambda p: (p.accuracy, -p.cost)) if candidates else None
        budget = "any"
    if pick is None:
        options = "; ".join(_describe(p) for p in sorted(candidates, key=lambda p: p.cost)[:8])
        raise ConfigError(f"promote: no model on the Pareto front has {budget}; the front's options "
                          f"(cheapest first): {options or 'none'}")
    return pick


def _check_finished(ref: SweepRef, allow_running: bool) -> None:
    """A sweep still running (or interrupted, or failed) has no final front: refuse, unless asked."""
    status = ref.client().get_run(ref.parent_run_id).info.status
    if status == "FINISHED":
        return
    if not allow_running:
        raise ConfigError(f"promote: sweep {ref.label!r} is not finished (parent run {ref.parent_run_id} is {status}); "
                          "wait for it or resume it, or pass --allow-running to promote from its front so far")
    log.warning("promoting from sweep %s whose parent run is %s (--allow-running): its front may still change",
                ref.label, status)


# ---- the sweep's data ------------------------------------------------------------------------------------------
def _param(value: str | None) -> Any:
    return None if value in (None, "None", "null", "") else value


def _data_settings(ref: SweepRef) -> dict[str, Any]:
    """dataset, data_dir, image_size, seed of the sweep: from its state file, else its run params."""
    if ref.config:
        cfg = ref.config
        return {"dataset": cfg["dataset"], "data_dir": cfg.get("data_dir"), "image_size": cfg.get("image_size"),
                "seed": int(cfg.get("seed", 0))}
    params = ref.client().get_run(ref.parent_run_id).data.params
    if "dataset" not in params:
        raise ConfigError(f"sweep {ref.label!r}: parent run {ref.parent_run_id} records no dataset param and no "
                          "sweep directory is known; cannot rebuild the test split")
    size = _param(params.get("image_size"))
    return {"dataset": params["dataset"], "data_dir": _param(params.get("data_dir")),
            "image_size": int(size) if size is not None else None, "seed": int(_param(params.get("seed")) or 0)}


def _reevaluate(model, data_settings: dict[str, Any]):
    """(test accuracy, test split) of ``model`` on the sweep's data set."""
    import torch

    from trainables.data import load, make_loader
    from trainables.train import evaluate

    data = load(data_settings["dataset"], data_dir=data_settings["data_dir"], image_size=data_settings["image_size"],
                seed=data_settings["seed"], augment=False)
    accuracy, _ = evaluate(model, make_loader(data.test, 256, shuffle=False), device=torch.device("cpu"))
    return accuracy, data


# ---- MLflow ---------------------------------------------------------------------------------------------------------
@contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables for the block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _metric_tags(p: TrialPoint, reevaluated: float) -> dict[str, str]:
    tags = {"accuracy": f"{p.accuracy:.6g}", "test_accuracy": f"{p.test_accuracy:.6g}",
            "reevaluated_test_accuracy": f"{reevaluated:.6g}", "macs": f"{p.macs:.0f}",
            "params": f"{p.params:.0f}" if math.isfinite(p.params) else "nan", "method": p.method}
    for key in ("latency_ratio", "latency_ms", "dense_latency_ms"):
        if math.isfinite(getattr(p, key)):
            tags[key] = f"{getattr(p, key):.6g}"
    return tags


def _finished_sweeps(refs: list[SweepRef], allow_running: bool) -> list[SweepRef]:
    """The sweeps to promote from: one sweep must be finished (``_check_finished``); of several, the
    unfinished ones are left out (with a warning), unless ``allow_running``."""
    if len(refs) == 1 or allow_running:
        for ref in refs:
            _check_finished(ref, allow_running)
        return refs
    status = {r.parent_run_id: r.client().get_run(r.parent_run_id).info.status for r in refs}
    done = [r for r in refs if status[r.parent_run_id] == "FINISHED"]
    for r in refs:
        if status[r.parent_run_id] != "FINISHED":
            log.warning("sweep %s (parent run %s) is %s: left out (--allow-running to include it)", r.label,
                        r.parent_run_id, status[r.parent_run_id])
    if not done:
        _check_finished(refs[-1], False)  # raises, naming the latest
    return done


def _choose(source, tracking_uri, latest, max_macs, min_accuracy, max_latency_ratio,
            allow_running: bool = False) -> tuple[SweepRef, TrialPoint]:
    """(sweep, trial) to promote: the best under the budget over the fronts of ``source``'s sweeps."""
    refs = _finished_sweeps(resolve_sweeps(source, tracking_uri, latest), allow_running)
    owner: dict[str, SweepRef] = {}
    candidates: list[TrialPoint] = []
    for ref in refs:
        try:
            found = pareto_candidates(ref)
        except ConfigError:  # a sweep without a finished trial: the others may still have one
            if len(refs) == 1:
                raise
            log.info("sweep %s has no finished trial; skipped", ref.label)
            continue
        candidates += found
        owner.update((p.run_id, ref) for p in found)
    if not candidates:
        raise ConfigError(f"promote: no sweep of {str(source)!r} has a finished trial to promote")
    pick = select_candidate(candidates, max_macs, min_accuracy, max_latency_ratio)
    return owner[pick.run_id], pick


def _register(client, uri: str, trial_run_id: str, promotion_run_id: str, name: str, model, data):
    """Register the trial's own pt2 model (source run = the trial); a trial recorded before trials
    had one gets it logged in the promotion run. Returns (version, LoggedModel id, seconds)."""
    import mlflow
    import torch

    model_id = trial_model_id(client, trial_run_id)
    if model_id is not None:
        t0 = time.perf_counter()
        with _tracking_uri(uri):
            mv = mlflow.register_model(f"models:/{model_id}", name)
        log.info("registered the trial's own model %s in %.1fs", model_id, time.perf_counter() - t0)
        return str(mv.version), model_id, time.perf_counter() - t0
    log.info("trial run %s has no MLflow model (recorded before trials had one): logging it now", trial_run_id)
    example = torch.stack([data.test[i][0] for i in range(min(_EXAMPLE_BATCH, len(data.test)))]).numpy()
    info, seconds = log_pt2_model(client, promotion_run_id, model, example, registered_model_name=name)
    log.info("logged and registered the model in %.1fs", seconds)
    return str(info.registered_model_version), info.model_id, seconds


def promote(source: str | Path, name: str, max_macs: float | None = None, min_accuracy: float | None = None,
            alias: str = "champion", tracking_uri: str | None = None, tolerance: float = 0.005,
            max_latency_ratio: float | None = None, latest: bool = False,
            allow_running: bool = False) -> PromotionResult:
    """Register the best front model of ``source`` under ``name`` and move ``alias`` to it: a sweep
    directory, or an experiment name (the best over all its sweeps; ``latest``: its latest sweep only).

    See the module docstring. Raises ``ConfigError`` (nothing registered) for bad arguments or a
    budget nothing meets, and :class:`PromotionError` (registered, alias not moved) when the
    re-evaluated test accuracy differs from the recorded one by more than ``tolerance``.
    """
    _check_arguments(name, alias, tolerance, max_macs, min_accuracy, max_latency_ratio)
    ref, pick = _choose(source, tracking_uri, latest, max_macs, min_accuracy, max_latency_ratio, allow_running)
    log.info("promoting %s from sweep %s", _describe(pick), ref.label)
    data_settings = _data_settings(ref)
    client = ref.client()
    model = _download_model(client, pick.run_id)
    reevaluated, data = _reevaluate(model, data_settings)
    recorded = pick.test_accuracy
    validated = math.isfinite(recorded) and abs(reevaluated - recorded) <= tolerance
    log.info("re-evaluated test accuracy %.4f (recorded %.4f, tolerance %g): %s", reevaluated, recorded, tolerance,
             "ok" if validated else "MISMATCH")

    run_id, version, model_id, seconds = _record_promotion(client, ref, pick, name, alias, model, data,
                                                           reevaluated, validated)
    result = PromotionResult(name, version, alias, validated, validated, pick.run_id, run_id, ref.parent_run_id,
                             pick.method, pick.accuracy, recorded, reevaluated, pick.macs, pick.params,
                             f"models:/{name}/{version}", model_id, seconds, pick.latency_ratio, ref.label)
    if not validated:
        raise PromotionError(
            f"promote: validation failed for {name} version {version}: re-evaluated test accuracy {reevaluated:.4f} "
            f"differs from the recorded {recorded:.4f} by more than {tolerance:g}; alias {alias!r} NOT moved "
            "(version tagged validation=failed)", result)
    log.info("%s version %s is now @%s", name, version, alias)
    return result


def _check_arguments(name, alias, tolerance, max_macs, min_accuracy, max_latency_ratio) -> None:
    """One ConfigError line naming the bad option, before anything is read or registered."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"promote: --name must be a non-empty model name, got {name!r}")
    if not isinstance(alias, str) or not alias.strip():
        raise ConfigError(f"promote: --alias must be a non-empty alias, got {alias!r}")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ConfigError(f"promote: --tolerance must be a number >= 0, got {tolerance!r}")
    if max_macs is not None and not (math.isfinite(max_macs) and max_macs > 0):
        raise ConfigError(f"promote: --max-macs must be a positive number, got {max_macs!r}")
    if min_accuracy is not None and not (math.isfinite(min_accuracy) and 0 <= min_accuracy <= 1):
        raise ConfigError(f"promote: --min-accuracy must be in [0, 1], got {min_accuracy!r}")
    if max_latency_ratio is not None and not (math.isfinite(max_latency_ratio) and max_latency_ratio > 0):
        raise ConfigError(f"promote: --max-latency-ratio must be a positive number, got {max_latency_ratio!r}")


def _download_model(client, run_id: str):
    """The trial's pruned model from its MLflow artifacts."""
    from trainables.model_io import load_model

    no_progress_bar = _env(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    with tempfile.TemporaryDirectory(prefix="prunetune-promote-") as tmp, no_progress_bar:
        try:
            local = client.download_artifacts(run_id, "model", tmp)
        except Exception as exc:  # noqa: BLE001  (MlflowException / OSError: no such artifact)
            raise MissingFileError(f"run {run_id} has no model artifacts to promote ({exc})") from None
        model, _spec = load_model(local)
    return model


def _record_promotion(client, ref, pick, name: str, alias: str, model, data, reevaluated: float,
                      validated: bool) -> tuple[str, str, str, float]:
    """Register the model under ``name`` from a promotion run, tag the version and the source run, and
    move ``alias`` only if ``validated``. Returns (promotion run id, version, model id, seconds)."""
    recorded = pick.test_accuracy
    exp_id = client.get_run(ref.parent_run_id).info.experiment_id
    run = client.create_run(exp_id, run_name=f"promote-{name}", tags={
        PROMOTION_TAG: "true", SOURCE_RUN_TAG: pick.run_id, SWEEP_RUN_TAG: ref.parent_run_id, "method": pick.method,
        "registered_model_name": name})
    run_id = run.info.run_id
    try:
        version, model_id, seconds = _register(client, ref.tracking_uri, pick.run_id, run_id, name, model, data)
        client.log_metric(run_id, "reevaluated_test_accuracy", reevaluated)
        client.log_metric(run_id, "recorded_test_accuracy", recorded)
        tags = {**_metric_tags(pick, reevaluated), "source_run_id": pick.run_id, "sweep_run_id": ref.parent_run_id,
                "promotion_run_id": run_id, "validation": "passed" if validated else "failed"}
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        client.set_tag(pick.run_id, PROMOTED_TO_TAG, f"{name}/{version}")
        if validated:
            client.set_registered_model_alias(name, alias, version)
        client.set_terminated(run_id, status="FINISHED")
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    return run_id, version, model_id, seconds


# ---- CLI ----------------------------------------------------------------------------------------------------------
def format_result(r: PromotionResult) -> str:
    where = (f"@{r.alias} -> version {r.version}" if r.alias_moved
             else f"version {r.version} (alias {r.alias!r} not moved)")
    return (f"promoted {r.name} {where}\n"
            f"  method {r.method}, MACs {r.macs:,.0f}, params {r.params:,.0f}"
            f"{f', latency_ratio {r.latency_ratio:.3f}' if math.isfinite(r.latency_ratio) else ''}\n"
            f"  accuracy (val) {r.accuracy:.4f}, test accuracy recorded {r.test_accuracy:.4f}, "
            f"re-evaluated {r.reevaluated_test_accuracy:.4f}\n"
            f"  from sweep {r.sweep or '?'} (sweep run {r.sweep_run_id}): trial run {r.source_run_id} "
            f"(the version's source run), promotion run {r.promotion_run_id}\n"
            f"  load it: mlflow.pytorch.load_model(\"models:/{r.name}@{r.alias}\")\n")


def _cmd_promote(args, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        result = promote(args.experiment, args.name, max_macs=args.max_macs, min_accuracy=args.min_accuracy,
                         alias=args.alias, tracking_uri=args.tracking_uri, tolerance=args.tolerance,
                         max_latency_ratio=args.max_latency_ratio, latest=args.latest,
                         allow_running=args.allow_running)
    except PromotionError as exc:
        print(f"prunetune: error: {exc}", file=sys.stderr)
        return VALIDATION_FAILED_EXIT
    out.write(format_result(result))
    return 0


def add_promote_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("promote", help="register the best front model under a budget and move an alias",
                              description="Pick the best model on a sweep's Pareto front under a budget, re-evaluate "
                                          "it on the test split, log it (pt2) to the MLflow Model Registry and move "
                                          "an alias to it.")
    p.add_argument("experiment", metavar="EXPERIMENT",
                   help="a sweep directory (printed by `prunetune run`) or an MLflow experiment name")
    p.add_argument("--name", required=True, help="registered model name")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--max-macs", type=float, default=None, metavar="N",
                        help="the most accurate front model with at most N MACs")
    budget.add_argument("--max-latency-ratio", type=float, default=None, metavar="R",
                        help="the most accurate front model whose latency is at most R times the dense "
                             "model's (latency_ratio, as the trial measured it on its device)")
    budget.add_argument("--min-accuracy", type=float, default=None, metavar="A",
                        help="the cheapest front model (in the sweep's searched cost) with validation accuracy >= A")
    p.add_argument("--latest", action="store_true",
                   help="an experiment name means its latest sweep only (default: the best over all its sweeps)")
    p.add_argument("--alias", default="champion", help="alias to move to the new version (default: champion)")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help=f"MLflow tracking URI for an experiment name (default: {DEFAULT_TRACKING_URI})")
    p.add_argument("--tolerance", type=float, default=0.005,
                   help="largest allowed |re-evaluated - recorded| test accuracy (default: 0.005)")
    p.add_argument("--allow-running", action="store_true",
                   help="promote even if the sweep's parent run is not FINISHED (running, interrupted, failed)")
    p.set_defaults(func=_cmd_promote)
    return p
