"""The training and evaluation loop shared by the base model, every method's training phase and
the fine-tune. The method's hooks are called at fixed points; the loop itself knows no method."""
from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import PruningMethod
from methods.errors import PruneTuneError

__all__ = ["EpochStats", "NonFiniteLossError", "train_epoch", "train_step", "evaluate", "train_steps", "pick_device",
           "cosine_lr", "NONFINITE_CHECK_EVERY"]

log = logging.getLogger(__name__)


class NonFiniteLossError(PruneTuneError):
    """The training loss became NaN or infinite; the trial cannot continue."""


@dataclass(frozen=True)
class EpochStats:
    loss: float
    accuracy: float
    seconds: float
    steps: int
    images: int = 0


def pick_device(use_gpu: bool | None = None) -> torch.device:
    """CUDA when asked for (or, with None, when present), else CPU."""
    if use_gpu is None:
        use_gpu = torch.cuda.is_available()
    if use_gpu and not torch.cuda.is_available():
        raise PruneTuneError("a GPU was requested but torch.cuda.is_available() is False")
    if use_gpu:
        # Trials train one fixed architecture for many steps: let cuDNN search for its fastest
        # kernels once per shape (what bench_trial_throughput measures on a GPU).
        torch.backends.cudnn.benchmark = True
    return torch.device("cuda" if use_gpu else "cpu")


def _autocast(device: torch.device):
    # Mixed precision only where it pays: bf16 autocast on CUDA. CPU runs in fp32.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """Cosine decay from ``base_lr`` to 0 over ``epochs`` (value for the start of ``epoch``)."""
    return 0.5 * base_lr * (1 + math.cos(math.pi * epoch / max(1, epochs)))


#: Steps between the checks for a non-finite loss (a check reads one value back from the device).
NONFINITE_CHECK_EVERY = 16


def train_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, *, device: torch.device,
                method: PruningMethod | None = None, max_steps: int | None = None) -> EpochStats:
    """One pass over ``loader`` (or ``max_steps`` batches), calling the method's hooks if given.

    Loss and accuracy accumulate on the device and are read once, at the end: no host sync per
    step. A non-finite loss is detected on the device and raised (NonFiniteLossError) at the next
    check, every ``NONFINITE_CHECK_EVERY`` steps and at the end; the trial ends there anyway."""
    model.train()
    start, steps, seen = time.perf_counter(), 0, 0
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    first_bad = torch.full((), math.nan, device=device)  # the first non-finite loss, once there is one
    bad = torch.zeros((), dtype=torch.bool, device=device)
    for inputs, targets in loader:
        if max_steps is not None and steps >= max_steps:
            break
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if device.type == "cuda":
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        loss, logits = train_step(model, inputs, targets, optimizer, method=method, step=steps)
        steps += 1
        loss = loss.detach()
        now_bad = ~torch.isfinite(loss)
        first_bad = torch.where(now_bad & ~bad, loss, first_bad)
        bad |= now_bad
        total_loss += loss * targets.numel()
        correct += (logits.argmax(1) == targets).sum()
        seen += targets.numel()
        if steps % NONFINITE_CHECK_EVERY == 0:
            _raise_if_nonfinite(bad, first_bad, steps)
    _raise_if_nonfinite(bad, first_bad, steps)
    return EpochStats(float(total_loss) / max(1, seen), int(correct) / max(1, seen), time.perf_counter() - start, steps,
                      seen)


def _raise_if_nonfinite(bad: torch.Tensor, first_bad: torch.Tensor, steps: int) -> None:
    if bool(bad):
        raise NonFiniteLossError(f"training loss became {float(first_bad)} at or before step {steps}")


def train_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer, *,
               method: PruningMethod | None = None, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch already on the model's device: forward (bf16 autocast on
    CUDA), cross-entropy plus the method's extra loss, backward, the method's hooks around the
    optimizer step. Returns ``(loss, logits)``. No host sync: the caller checks the loss
    (``train_epoch`` does, on the device)."""
    with _autocast(inputs.device):
        logits = model(inputs)
        loss = F.cross_entropy(logits.float(), targets)
        if method is not None:
            extra = method.extra_loss(model, inputs, logits.float(), targets)
            if extra is not None:
                loss = loss + extra
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if method is not None:
        method.after_backward(model)
    optimizer.step()
    if method is not None:
        method.after_step(model)
    return loss, logits


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device: torch.device) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over ``loader`` in eval mode."""
    model.eval()
    seen = 0
    correct = torch.zeros((), dtype=torch.long, device=device)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    for inputs, targets in loader:
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with _autocast(device):
            logits = model(inputs).float()
        total_loss += F.cross_entropy(logits, targets, reduction="sum")
        correct += (logits.argmax(1) == targets).sum()
        seen += targets.numel()
    return int(correct) / max(1, seen), float(total_loss) / max(1, seen)


def train_steps(model: nn.Module, loader, steps: int, *, lr: float, device: torch.device,
                momentum: float = 0.9, weight_decay: float = 5e-4) -> None:
    """A short plain-SGD fine-tune of ``steps`` batches (cycling the loader): ThiNet's per-layer
    recovery and similar uses."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    done = 0
    while done < steps:
        stats = train_epoch(model, loader, optimizer, device=device, max_steps=steps - done)
        if stats.steps == 0:
            break
        done += stats.steps
