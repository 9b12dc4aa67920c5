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

from .base_model import build_model, fetch_base_model
from .device_data import trial_loader
from .model_io import load_model, model_spec, save_model
from .settings import TrainSettings, TrialSettings
from .train import NonFiniteLossError, cosine_lr, evaluate, pick_device, train_epoch, train_steps
from .workspace import load_data

__all__ = ["run_trial", "TrialSettings", "Reporter", "STATE_FILE", "MODEL_DIR"]

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
    method = create_method(method_name, **hparams)
    device = pick_device(settings.use_gpu)
    data = load_data(settings)
    input_shape = tuple(data.input_shape)
    plan = _plan(settings, method)
    # Digits and CIFAR live on the trial's device (no loader processes); ImageFolder gets workers.
    workers = max(0, torch.get_num_threads() - 1)
    train_loader = trial_loader(data.train, plan.finetune.batch_size, shuffle=True, seed=settings.seed, device=device,
                                num_workers=workers)
    val_loader = trial_loader(data.val, EVAL_BATCH, shuffle=False, device=device, num_workers=workers)
    # The unpruned architecture: its MACs now, its latency beside the pruned model's at the end. Built
    # before the streams are seeded below, so drawing its random weights changes nothing.
    reference = _reference_model(settings)
    dense_macs = profile(reference, input_shape).macs
    spec_kwargs = {k: v for k, v in settings.model_kwargs.items() if k != "weights"}
    if method.from_scratch and method.hparams.get("expansion"):
        spec_kwargs["width_mult"] = spec_kwargs.get("width_mult", 1.0) * method.hparams["expansion"]

    def spec(m):
        return model_spec(m, settings.model, data.num_classes, in_channels=input_shape[0], **spec_kwargs)

    state: dict[str, Any] = {"epoch": 0, "history": []}
    if resume_from is not None:
        state = torch.load(Path(resume_from) / STATE_FILE, map_location="cpu", weights_only=True)
        log.info("resuming %s at epoch %d/%d", method_name, state["epoch"], plan.total)

    # The starting model and ``prepare`` (e.g. ManiDP's gate initialisation) draw from a stream fixed
    # by the seed alone; a resumed trial then overwrites what they drew with the checkpoint.
    torch.manual_seed(_stream_seed(settings.seed, 0, "start"))
    pruned = state["epoch"] >= plan.phase_epochs and resume_from is not None
    if pruned:
        model, _ = load_model(Path(resume_from) / MODEL_DIR)
        # The method's state travels on through the fine-tune (a later checkpoint carries it too).
        method.load_state_dict(state.get("method", {}))
    else:
        setup = PruneContext(input_shape, device=device, seed=settings.seed, reference_macs=dense_macs)
        model = method.prepare(_start_model(settings, method), setup)
        if resume_from is not None:
            model.load_state_dict(torch.load(Path(resume_from) / PHASE_WEIGHTS, map_location="cpu", weights_only=True))
            method.load_state_dict(state["method"])
    model.to(device)
    optimizer = (method.make_finetune_optimizer(model, lr=plan.finetune.lr, momentum=plan.finetune.momentum,
                                                weight_decay=plan.finetune.weight_decay) if pruned else
                 method.make_optimizer(model, lr=settings.finetune.lr, momentum=settings.finetune.momentum,
                                       weight_decay=settings.finetune.weight_decay))
    if resume_from is not None and state.get("optimizer"):
        optimizer.load_state_dict(state["optimizer"])

    def prune_now():
        nonlocal model, optimizer, pruned
        t0 = time.perf_counter()
        # Calibration batches, the method's own draws and its fine-tune steps: one stream, fixed by
        # (seed, the epoch the surgery precedes), whether or not the trial was resumed before it.
        _seed_epoch(settings.seed, plan.phase_epochs, train_loader, stream="surgery")
        calibration = [b for _, b in zip(range(settings.calibration_batches), train_loader)]
        context = PruneContext(
            input_shape, device=device, calibration=calibration, seed=settings.seed,
            finetune=lambda m, steps: train_steps(m, train_loader, steps, lr=settings.finetune.lr, device=device),
            reference_macs=dense_macs,
        )
        model = method.prune(model, context).to(device)
        pruned = True
        optimizer = method.make_finetune_optimizer(model, lr=plan.finetune.lr, momentum=plan.finetune.momentum,
                                                   weight_decay=plan.finetune.weight_decay)
        log.info("%s pruned in %.1fs", method_name, time.perf_counter() - t0)

    if not pruned and plan.phase_epochs == 0:
        prune_now()

    metrics: dict[str, Any] = {}
    while state["epoch"] < plan.total:
        epoch = state["epoch"]
        stage = "phase" if epoch < plan.phase_epochs else "finetune"
        _seed_epoch(settings.seed, epoch, train_loader)
        if stage == "finetune":
            ft_epoch = epoch - plan.phase_epochs
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(plan.finetune.lr, ft_epoch, plan.finetune.epochs)
        try:
            stats = train_epoch(model, train_loader, optimizer, device=device,
                                method=method if stage == "phase" else None)
        except NonFiniteLossError as exc:
            # The trial ends here, recorded as failed (searcher: FAIL; MLflow: FAILED with the
            # reason). It returns instead of raising so Tune neither retries a deterministic
            # failure nor throws away the worker. Metrics are NaN: Tune insists they are present.
            log.warning("%s: %s", method_name, exc)
            metrics = {"epoch": epoch + 1, "stage": stage, "nonfinite": 1, "failure_reason": str(exc),
                       "accuracy": math.nan, "macs": math.nan}
            report(metrics, lambda d: None)
            return metrics
        if stage == "phase":
            method.on_epoch_end(model, epoch, stats.loss)
        if stage == "phase" and epoch + 1 == plan.phase_epochs:
            prune_now()
        accuracy, val_loss = evaluate(model, val_loader, device=device)
        state["epoch"] = epoch + 1
        # ``finetune_epoch``: epochs after the cut (0 in the phase), what early-stopping rungs count.
        metrics = {"epoch": epoch + 1, "stage": stage, "finetune_epoch": max(0, epoch + 1 - plan.phase_epochs),
                   "loss": stats.loss, "train_accuracy": stats.accuracy,
                   "accuracy": accuracy, "val_loss": val_loss,
                   **_cost_metrics(method, model, input_shape, val_loader, pruned, dense_macs),
                   "params": count_params(model), "epoch_seconds": stats.seconds}
        if metrics.get("removed_nothing") and state["epoch"] == max(plan.phase_epochs, 1):  # the first pruned epoch
            log.warning("%s removed nothing: the pruned model has the dense model's %d MACs (prune_ratio %s)",
                        method_name, int(dense_macs), method.hparams.get("prune_ratio", "-"))
        if state["epoch"] == plan.total:
            metrics.update(_final_metrics(model, method, data, input_shape, settings, device, dense_macs, reference))
        state["history"].append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        report(metrics, lambda d: _save(d, state, model, optimizer, method, pruned, spec))
    if not metrics:  # nothing left to run (resumed after the last epoch, or a zero-epoch plan)
        metrics = {"epoch": state["epoch"], "stage": "finetune",
                   **_final_metrics(model, method, data, input_shape, settings, device, dense_macs, reference)}
        metrics["accuracy"], _ = evaluate(model, val_loader, device=device)
        metrics.update(_cost_metrics(method, model, input_shape, val_loader, pruned, dense_macs))
        metrics["params"] = count_params(model)
        report(metrics, lambda d: _save(d, state, model, optimizer, method, pruned, spec))
    return metrics


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


def _cost_metrics(method, model, input_shape, val_loader, pruned, dense_macs) -> dict[str, float]:
    """``macs``, ``macs_reduction`` (1 - macs / dense: the axis ``prune_ratio`` targets) and, once
    pruned, ``removed_nothing`` (1 when the cut left the dense MACs)."""
    macs = _macs(method, model, input_shape, val_loader, pruned, dense_macs)
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
    matter for timing). Both run on the trial's own device (CUDA as the trials run there: channels_last,
    bf16 autocast; else CPU), interleaved in this process (``methods.cost.latencies``), at batch
    ``settings.latency_batch_size``. ``latency_ratio`` = pruned / dense median: comparable across
    nodes of different speed, which the raw milliseconds are not."""
    test_accuracy, _ = evaluate(model, trial_loader(data.test, EVAL_BATCH, shuffle=False, device=device), device=device)
    model.eval()
    timed = method.inference_model(model, batch_size=settings.latency_batch_size)
    pruned_lat, dense_lat = latencies([timed, reference], input_shape, batch_size=settings.latency_batch_size,
                                      warmup=LATENCY_WARMUP, rounds=LATENCY_ROUNDS, repeats=LATENCY_REPEATS,
                                      device=device)
    latency_ms, dense_latency_ms = pruned_lat.median_s * 1000.0, dense_lat.median_s * 1000.0
    return {"test_accuracy": test_accuracy, "latency_ms": latency_ms, "dense_latency_ms": dense_latency_ms,
            "latency_ratio": latency_ms / dense_latency_ms, "latency_device": torch.device(device).type,
            "latency_model": type(timed).__name__, "dense_macs": float(dense_macs)}


def _save(directory: Path, state: dict, model, optimizer, method: PruningMethod, pruned: bool, spec) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    full = dict(state, optimizer=optimizer.state_dict(), method=method.state_dict(), pruned=pruned)
    if pruned:
        save_model(model, directory / MODEL_DIR, spec(model))
    else:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, directory / PHASE_WEIGHTS)
    torch.save(full, directory / STATE_FILE)
