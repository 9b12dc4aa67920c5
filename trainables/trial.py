"""One trial, as a plain function: dense base (or random init) -> the method's training phase ->
surgery -> fine-tune -> evaluation. It knows nothing of Ray: ``trainables.tune_trainable`` wraps it
for Tune, and the benchmarks call it in a plain loop.

Epochs are numbered across the two stages (``phase`` then ``finetune``); after every epoch the
trial calls ``report(metrics, save)`` where ``save(dir)`` writes a checkpoint into ``dir``.
Resuming from such a checkpoint continues with the next epoch and ends with the same number of
epochs as an uninterrupted run.

Reproducible resumption: every random draw of an epoch comes from streams fixed by
``(settings.seed, epoch)`` alone (``_seed_epoch``): torch's global generator (augmentations,
dropout, anything a method draws) and the train loader's shuffle generator are reseeded before
each epoch, and the surgery reseeds both from its own stream before it draws calibration batches
(and ThiNet's per-layer fine-tune batches). Model, optimizer, method state and the cosine
schedule (a function of the epoch) are in the checkpoint. So a trial resumed from the checkpoint
after epoch ``k`` reports, for the epochs after ``k``, exactly what the uninterrupted trial
reported (bit for bit on CPU with a fixed thread count), and ends with the same model.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from methods import PruneContext, create_method
from methods.base import PruningMethod
from methods.cost import count_params, latencies, profile
from methods.fold import fold_alike

from .base_model import build_model, fetch_base_model
from .device_data import trial_loader
from .model_io import load_model, model_spec, save_model
from .settings import TrainSettings, TrialSettings
from .train import EpochStats, NonFiniteLossError, cosine_lr, evaluate, pick_device, train_epoch, train_steps
from .workspace import load_data

__all__ = ["run_trial", "run_started", "TrialSettings", "Reporter", "STATE_FILE", "MODEL_DIR"]

log = logging.getLogger(__name__)
Reporter = Callable[[dict[str, Any], Callable[[Path], None]], None]
STATE_FILE, MODEL_DIR, PHASE_WEIGHTS = "state.pt", "model", "phase_model.pt"
EVAL_BATCH = 256


@dataclass
class _Plan:
    phase_epochs: int
    finetune: TrainSettings

    @property
    def total(self) -> int:
        return self.phase_epochs + self.finetune.epochs


def _plan(settings: TrialSettings, method: PruningMethod) -> _Plan:
    if method.from_scratch:
        # The pruned architecture trains from fresh weights, with the whole budget the
        # pre-train-then-prune methods get (base epochs + fine-tune epochs) at the base rate.
        ft = TrainSettings(epochs=settings.base.epochs + settings.finetune.epochs, lr=settings.base.lr,
                           momentum=settings.base.momentum, weight_decay=settings.base.weight_decay,
                           batch_size=settings.base.batch_size)
    else:
        ft = settings.finetune
    return _Plan(method.phase_epochs, ft)


def _start_model(settings: TrialSettings, method: PruningMethod) -> torch.nn.Module:
    if method.from_scratch:
        torch.manual_seed(settings.seed)
        return build_model(settings, width_mult=method.hparams.get("expansion"))
    model, _ = load_model(fetch_base_model(settings))  # a node-local copy when base_dir is an object store
    return model


def run_trial(settings: TrialSettings, method_name: str, hparams: dict[str, Any], report: Reporter,
              resume_from: Path | None = None) -> dict[str, Any]:
    """Run one trial to the end and return its final metrics (also passed to ``report``)."""
    return run_started(_Trial.start(settings, method_name, hparams, report, resume_from))


def run_started(trial: "_Trial") -> dict[str, Any]:
    """Run a started trial (fresh or resumed) to the end; its final metrics."""
    try:
        if not trial.pruned and trial.plan.phase_epochs == 0:
            trial.prune()
        metrics: dict[str, Any] = {}
        while trial.state["epoch"] < trial.plan.total:
            metrics = trial.run_epoch()
    except NonFiniteLossError as exc:
        return trial.failed(exc)
    return metrics or trial.report_final()  # nothing left to run: resumed after the last epoch, or no epochs


@dataclass
class _Trial:
    """One trial's moving parts; ``start`` builds them (fresh or from a checkpoint), then the
    stages (``prune``, ``run_epoch``, ``report_final``, ``failed``) change them in place."""

    settings: TrialSettings
    method_name: str
    method: PruningMethod
    report: Reporter
    device: torch.device
    data: Any
    plan: _Plan
    train_loader: Any
    val_loader: Any
    reference: torch.nn.Module  # the unpruned architecture: its MACs, and its latency at the end
    dense_macs: float
    state: dict[str, Any]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    pruned: bool
    _compiled: tuple[torch.nn.Module, torch.nn.Module] | None = None
    _counted: tuple[torch.nn.Module, float] | None = None  # (pruned model, its MACs) when they cannot change

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.data.input_shape)

    @classmethod
    def start(cls, settings: TrialSettings, method_name: str, hparams: dict[str, Any], report: Reporter,
              resume_from: Path | None) -> "_Trial":
        method = create_method(method_name, **hparams)
        device = pick_device(settings.use_gpu)
        data = load_data(settings)
        input_shape = tuple(data.input_shape)
        plan = _plan(settings, method)
        # Digits and CIFAR live on the trial's device (no loader processes); ImageFolder gets workers.
        workers = max(0, torch.get_num_threads() - 1)
        train_loader = trial_loader(data.train, plan.finetune.batch_size, shuffle=True, seed=settings.seed,
                                    device=device, num_workers=workers)
        val_loader = trial_loader(data.val, EVAL_BATCH, shuffle=False, device=device, num_workers=workers)
        # Built before the streams are seeded below, so drawing its random weights changes nothing.
        reference = _reference_model(settings)
        dense_macs = profile(reference, input_shape).macs
        state: dict[str, Any] = {"epoch": 0, "history": []}
        if resume_from is not None:
            state = torch.load(Path(resume_from) / STATE_FILE, map_location="cpu", weights_only=True)
            log.info("resuming %s at epoch %d/%d", method_name, state["epoch"], plan.total)
        model, pruned = _start_or_resume(settings, method, plan, state, resume_from,
                                         PruneContext(input_shape, device=device, seed=settings.seed,
                                                      reference_macs=dense_macs))
        model.to(device)
        optimizer = (_finetune_optimizer(method, model, plan) if pruned else
                     method.make_optimizer(model, lr=settings.finetune.lr, momentum=settings.finetune.momentum,
                                           weight_decay=settings.finetune.weight_decay))
        if resume_from is not None and state.get("optimizer"):
            optimizer.load_state_dict(state["optimizer"])
        return cls(settings, method_name, method, report, device, data, plan, train_loader, val_loader, reference,
                   dense_macs, state, model, optimizer, pruned)

    def prune(self) -> None:
        """The cut: calibration batches, the method's own draws and its fine-tune steps come from one
        stream fixed by (seed, the epoch the surgery precedes), whether or not the trial resumed."""
        t0 = time.perf_counter()
        settings, loader, device = self.settings, self.train_loader, self.device
        _seed_epoch(settings.seed, self.plan.phase_epochs, loader, stream="surgery")
        calibration = [b for _, b in zip(range(settings.calibration_batches), loader)]
        context = PruneContext(
            self.input_shape, device=device, calibration=calibration, seed=settings.seed,
            finetune=lambda m, steps: train_steps(m, loader, steps, lr=settings.finetune.lr, device=device),
            reference_macs=self.dense_macs,
        )
        self.model = self.method.prune(self.model, context).to(device)
        self.pruned = True
        self.optimizer = _finetune_optimizer(self.method, self.model, self.plan)
        log.info("%s pruned in %.1fs", self.method_name, time.perf_counter() - t0)

    def run_epoch(self) -> dict[str, Any]:
        """Train one epoch (phase or fine-tune; the cut after the last phase epoch), evaluate,
        report the metrics with a checkpoint."""
        epoch, plan = self.state["epoch"], self.plan
        stage = _stage(epoch, plan)
        _seed_epoch(self.settings.seed, epoch, self.train_loader)
        if stage == "finetune":
            for group in self.optimizer.param_groups:
                group["lr"] = cosine_lr(plan.finetune.lr, epoch - plan.phase_epochs, plan.finetune.epochs)
        stats = self._train(stage)
        if stage == "phase":
            self.method.on_epoch_end(self.model, epoch, stats.loss)
            if epoch + 1 == plan.phase_epochs:
                self.prune()
        self.state["epoch"] = epoch + 1
        metrics = self._epoch_metrics(epoch, stage, stats)
        self.state["history"].append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        self._report(metrics)
        return metrics

    def _train(self, stage: str) -> EpochStats:
        """One epoch of training (the method's hooks in the phase)."""
        return train_epoch(self._stepping_model(stage), self.train_loader, self.optimizer, device=self.device,
                           method=self.method if stage == "phase" else None)

    def _epoch_metrics(self, epoch: int, stage: str, stats: EpochStats) -> dict[str, Any]:
        """What epoch ``epoch`` reports: evaluation, cost and, after the last epoch, the final metrics."""
        plan = self.plan
        accuracy, val_loss = evaluate(self.model, self.val_loader, device=self.device)
        # ``finetune_epoch``: epochs after the cut (0 in the phase), what early-stopping rungs count.
        metrics = {"epoch": epoch + 1, "stage": stage, "finetune_epoch": max(0, epoch + 1 - plan.phase_epochs),
                   "loss": stats.loss, "train_accuracy": stats.accuracy,
                   "accuracy": accuracy, "val_loss": val_loss, **self._cost_metrics(),
                   "params": count_params(self.model), "epoch_seconds": stats.seconds}
        if metrics.get("removed_nothing") and epoch + 1 == max(plan.phase_epochs, 1):  # the first pruned epoch
            log.warning("%s removed nothing: the pruned model has the dense model's %d MACs (prune_ratio %s)",
                        self.method_name, int(self.dense_macs), self.method.hparams.get("prune_ratio", "-"))
        if epoch + 1 == plan.total:
            metrics.update(self._final_metrics())
        return metrics

    def report_final(self) -> dict[str, Any]:
        metrics = {"epoch": self.state["epoch"], "stage": "finetune", **self._final_metrics()}
        metrics["accuracy"], _ = evaluate(self.model, self.val_loader, device=self.device)
        metrics.update(self._cost_metrics())
        metrics["params"] = count_params(self.model)
        self._report(metrics)
        return metrics

    def failed(self, exc: NonFiniteLossError) -> dict[str, Any]:
        """The trial ends here, recorded as failed (searcher: FAIL; MLflow: FAILED with the reason):
        a non-finite loss in an epoch or in the surgery's own fine-tune steps (ThiNet's per-layer
        recovery). It returns instead of raising so Tune neither retries a deterministic failure nor
        throws away the worker. Metrics are NaN: Tune insists they are present."""
        log.warning("%s: %s", self.method_name, exc)
        epoch = self.state["epoch"]
        out = {"epoch": epoch + 1, "stage": _stage(epoch, self.plan), "nonfinite": 1, "failure_reason": str(exc),
               "accuracy": math.nan, "macs": math.nan, "params": math.nan}  # every per-epoch objective
        self.report(out, lambda d: None)
        return out

    # ---- helpers -----------------------------------------------------------------------------------
    def _stepping_model(self, stage: str) -> torch.nn.Module:
        """The module the epoch trains through: with ``settings.compile`` the fine-tune runs a
        ``torch.compile`` of the pruned model (compiled again after the cut); checkpoints and
        evaluation use the model itself."""
        if stage != "finetune" or not self.settings.compile:
            return self.model
        if self._compiled is None or self._compiled[0] is not self.model:
            self._compiled = (self.model, torch.compile(self.model))
        return self._compiled[1]

    def _cost_metrics(self) -> dict[str, float]:
        """A static method's pruned model is counted once (its MACs are a function of its layer
        shapes, fixed after the cut); a method that measures its own (``measure_macs`` overridden:
        ManiDP's depend on its gates and the data) is counted every epoch."""
        if self._counted is not None and self._counted[0] is self.model:
            return _cost_fields(self._counted[1], self.pruned, self.dense_macs)
        macs = _macs(self.method, self.model, self.input_shape, self.val_loader, self.pruned, self.dense_macs)
        if self.pruned and type(self.method).measure_macs is PruningMethod.measure_macs:
            self._counted = (self.model, macs)
        return _cost_fields(macs, self.pruned, self.dense_macs)

    def _final_metrics(self) -> dict[str, Any]:
        return _final_metrics(self.model, self.method, self.data, self.input_shape, self.settings, self.device,
                              self.dense_macs, self.reference)

    def _report(self, metrics: dict[str, Any]) -> None:
        state, model, optimizer, method, pruned = self.state, self.model, self.optimizer, self.method, self.pruned
        self.report(metrics, lambda d: _save(d, state, model, optimizer, method, pruned, self._spec))

    def _spec(self, model: torch.nn.Module) -> dict[str, Any]:
        kwargs = {k: v for k, v in self.settings.model_kwargs.items() if k != "weights"}
        if self.method.from_scratch and self.method.hparams.get("expansion"):
            kwargs["width_mult"] = kwargs.get("width_mult", 1.0) * self.method.hparams["expansion"]
        return model_spec(model, self.settings.model, self.data.num_classes, in_channels=self.input_shape[0], **kwargs)


def _stage(epoch: int, plan: _Plan) -> str:
    return "phase" if epoch < plan.phase_epochs else "finetune"


def _start_or_resume(settings: TrialSettings, method: PruningMethod, plan: _Plan, state: dict[str, Any],
                     resume_from: Path | None, setup: PruneContext) -> tuple[torch.nn.Module, bool]:
    """(model, pruned): the starting model prepared by the method, or the checkpointed one. The
    starting model and ``prepare`` (e.g. ManiDP's gate initialisation) draw from a stream fixed by
    the seed alone; a resumed trial then overwrites what they drew with the checkpoint."""
    torch.manual_seed(_stream_seed(settings.seed, 0, "start"))
    if resume_from is not None and state["epoch"] >= plan.phase_epochs:
        model, _ = load_model(Path(resume_from) / MODEL_DIR)
        # The method's state travels on through the fine-tune (a later checkpoint carries it too).
        method.load_state_dict(state.get("method", {}))
        return model, True
    model = method.prepare(_start_model(settings, method), setup)
    if resume_from is not None:
        model.load_state_dict(torch.load(Path(resume_from) / PHASE_WEIGHTS, map_location="cpu", weights_only=True))
        method.load_state_dict(state["method"])
    return model, False


def _finetune_optimizer(method: PruningMethod, model: torch.nn.Module, plan: _Plan) -> torch.optim.Optimizer:
    ft = plan.finetune
    return method.make_finetune_optimizer(model, lr=ft.lr, momentum=ft.momentum, weight_decay=ft.weight_decay)


def _stream_seed(seed: int, epoch: int, stream: str) -> int:
    """A 63-bit seed fixed by ``(seed, epoch, stream)``: independent streams for the global
    generator and the loader, and no overlap between (seed, epoch + 1) and (seed + 1, epoch)."""
    digest = hashlib.sha256(f"prunetune:{int(seed)}:{int(epoch)}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _seed_epoch(seed: int, epoch: int, train_loader, stream: str = "epoch") -> None:
    """Reseed every random stream the coming epoch (or surgery) draws from: torch's global
    generator and the train loader's shuffle generator (the loader draws each pass's order, and its
    workers' base seed, from it when iterated)."""
    torch.manual_seed(_stream_seed(seed, epoch, f"{stream}/torch"))
    train_loader.generator.manual_seed(_stream_seed(seed, epoch, f"{stream}/loader"))


def _reference_model(settings: TrialSettings) -> torch.nn.Module:
    """The unpruned, unexpanded architecture every MACs reduction is measured against."""
    return build_model(settings)


def _macs(method, model, input_shape, val_loader, pruned, dense_macs) -> float:
    if not pruned:
        return float(dense_macs)
    return float(method.measure_macs(model, input_shape, val_loader))


def _cost_fields(macs: float, pruned: bool, dense_macs: float) -> dict[str, float]:
    """``macs``, ``macs_reduction`` (1 - macs / dense: the axis ``prune_ratio`` targets) and, once
    pruned, ``removed_nothing`` (1 when the cut left the dense MACs)."""
    out = {"macs": macs, "macs_reduction": 1.0 - macs / float(dense_macs)}
    if pruned:
        out["removed_nothing"] = float(macs >= dense_macs)
    return out


#: The final latency measurement: untimed warm-up passes per model, then interleaved rounds of timed
#: passes (pruned, dense, pruned, ...): 2 x (3 + 5 x 2) forward passes in all.
LATENCY_WARMUP, LATENCY_ROUNDS, LATENCY_REPEATS = 3, 5, 2


def _final_metrics(model, method: PruningMethod, data, input_shape, settings, device, dense_macs,
                   reference: torch.nn.Module) -> dict[str, Any]:
    """Test accuracy and latency of the final model, beside the dense reference's.

    The pruned model timed is ``method.inference_model(model)``, what the method really runs at
    inference (ManiDP: the skipping path, not the masked model; ``latency_model`` names the class of
    the module timed); the dense one is ``reference``, the unpruned architecture (its weights do not
    matter for timing). Both are timed as deployed for inference, with every batch norm folded into
    its conv (``methods.fold``); when either cannot be folded (SkippingView) neither is, and
    ``latency_bn_folded`` (1 / 0) says which. Both run on the trial's own device (CUDA as the trials run there: channels_last,
    bf16 autocast; else CPU), interleaved in this process (``methods.cost.latencies``), at batch
    ``settings.latency_batch_size``. ``latency_ratio`` = pruned / dense median: comparable across
    nodes of different speed, which the raw milliseconds are not."""
    test_accuracy, _ = evaluate(model, trial_loader(data.test, EVAL_BATCH, shuffle=False, device=device), device=device)
    model.eval()
    timed = method.inference_model(model, batch_size=settings.latency_batch_size)
    (timed_folded, reference), folded = fold_alike([timed, reference])
    pruned_lat, dense_lat = latencies([timed_folded, reference], input_shape, batch_size=settings.latency_batch_size,
                                      warmup=LATENCY_WARMUP, rounds=LATENCY_ROUNDS, repeats=LATENCY_REPEATS,
                                      device=device)
    latency_ms, dense_latency_ms = pruned_lat.median_s * 1000.0, dense_lat.median_s * 1000.0
    return {"test_accuracy": test_accuracy, "latency_ms": latency_ms, "dense_latency_ms": dense_latency_ms,
            "latency_ratio": latency_ms / dense_latency_ms, "latency_device": torch.device(device).type,
            "latency_model": type(timed).__name__, "latency_bn_folded": float(folded),
            "dense_macs": float(dense_macs)}


def _save(directory: Path, state: dict, model, optimizer, method: PruningMethod, pruned: bool, spec) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    full = dict(state, optimizer=optimizer.state_dict(), method=method.state_dict(), pruned=pruned)
    if pruned:
        save_model(model, directory / MODEL_DIR, spec(model))
    else:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, directory / PHASE_WEIGHTS)
    torch.save(full, directory / STATE_FILE)
