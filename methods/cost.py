"""Cost measurement: MACs, parameters and wall-clock latency of a model.

Convention (the one the pruning papers use, see METHODS.md "Reference sizes"):

- **MACs** are multiply-accumulates of one forward pass at **batch size 1**.
- Only ``nn.Conv2d`` and ``nn.Linear`` are counted. A convolution costs
  ``out_h * out_w * out_channels * (in_channels / groups) * kh * kw`` (grouped and depthwise
  convolutions included); a linear layer costs ``in_features * out_features`` times any extra
  leading dimensions of its input. Bias adds, batch norm, activations, pooling and residual adds
  are not counted (they add < 1% on ResNets and VGG, ~6% on MobileNetV2).
- **FLOPs = 2 x MACs** (``Cost.flops``); reduction percentages are the same either way.
- **params** is the number of elements of all parameters (buffers such as BN running statistics
  are not parameters).

A module may declare its own cost by defining ``macs_hook(input, output) -> int`` (duck-typed; the
dynamic-pruning gates use it to report what they compute or skip). What it returns is added to the
total for every call of that module. Its Conv2d/Linear children are still counted by their own
hooks; if the module itself is a Conv2d or Linear, its ``macs_hook`` replaces the default count.

Pure PyTorch: nothing here knows about Ray, Optuna or MLflow.
"""
from __future__ import annotations

import contextlib
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn
from .errors import ArgumentError

__all__ = ["Cost", "count_macs", "LatencyResult", "profile", "latency", "latencies", "count_params", "module_macs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cost:
    """Cost of one forward pass at batch size 1.

    ``macs``: multiply-accumulates of Conv2d and Linear layers. ``params``: parameter elements.
    """

    macs: int
    params: int

    @property
    def flops(self) -> int:
        """Floating-point operations under the FLOPs = 2 x MACs convention."""
        return 2 * self.macs


@dataclass(frozen=True)
class LatencyResult:
    """Wall-clock latency of a forward pass.

    ``median_s``: median of ``times_s`` (seconds per forward of one batch of ``batch_size``);
    ``threads``: ``torch.get_num_threads()`` while measuring; ``device``: where it ran.
    """

    median_s: float
    times_s: tuple[float, ...]
    batch_size: int
    threads: int
    device: str


def count_params(model: nn.Module) -> int:
    """Number of elements of all parameters of ``model`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def _conv2d_macs(module: nn.Conv2d, output: torch.Tensor) -> int:
    kh, kw = module.kernel_size
    return output.numel() * (module.in_channels // module.groups) * kh * kw


def _linear_macs(module: nn.Linear, output: torch.Tensor) -> int:
    return output.numel() * module.in_features


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for item in x:
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in model.parameters():
        return tensor.device, tensor.dtype
    for tensor in model.buffers():
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ArgumentError(f"input_shape must be a non-empty sequence of positive ints (no batch dim), got {input_shape!r}")
    return shape


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module in eval mode; restore each module's own flag afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def count_macs(model: nn.Module, batches: Iterable[torch.Tensor]) -> tuple[int, int]:
    """Conv2d + Linear MACs summed over forward passes of ``batches`` (modules with a
    ``macs_hook(inputs, output)`` report their own, e.g. gated convs that skip channels).

    Runs in eval mode under ``torch.no_grad`` on the model's device and dtype; each module's
    train/eval flag is restored. Returns ``(total MACs, samples seen)``.
    """
    device, dtype = _device_dtype(model)
    total, seen = 0, 0

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal total
        custom = getattr(module, "macs_hook", None)
        if callable(custom):
            total += int(custom(inputs, output))
            return
        out = _first_tensor(output)
        if out is None:
            return
        if isinstance(module, nn.Conv2d):
            total += _conv2d_macs(module, out)
        elif isinstance(module, nn.Linear):
            total += _linear_macs(module, out)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) or callable(getattr(m, "macs_hook", None))
    ]
    try:
        with _eval_mode(model), torch.no_grad():
            for x in batches:
                model(x.to(device=device, dtype=dtype))
                seen += x.shape[0]
    finally:
        for h in handles:
            h.remove()
    return int(total), seen


def module_macs(model: nn.Module, input_shape: Sequence[int]) -> tuple[dict[str, int], int]:
    """(MACs of each Conv2d and Linear by module name, the model's total MACs) at batch 1."""
    per_module: dict[str, int] = {}
    names = {m: n for n, m in model.named_modules()}

    def hook(mod, args, out):
        macs = _conv2d_macs(mod, out) if isinstance(mod, nn.Conv2d) else _linear_macs(mod, out)
        per_module[names[mod]] = per_module.get(names[mod], 0) + macs

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        total = profile(model, input_shape).macs
    finally:
        for h in handles:
            h.remove()
    return per_module, total


def profile(model: nn.Module, input_shape: Sequence[int]) -> Cost:
    """MACs (batch 1, Conv2d + Linear only) and parameter count of ``model``.

    Runs one forward pass on a zeros input of shape ``(1, *input_shape)`` on the model's device and
    dtype, in eval mode under ``torch.no_grad``; each module's train/eval flag is restored.
    """
    shape = _check_shape(input_shape)
    macs, _ = count_macs(model, [torch.zeros((1, *shape))])
    cost = Cost(macs=macs, params=count_params(model))
    log.debug("profiled %s at %s: %d MACs, %d params", type(model).__name__, shape, cost.macs, cost.params)
    return cost


def latency(model: nn.Module, input_shape: Sequence[int], batch_size: int = 1, *, warmup: int = 3,
            repeats: int = 10, device: str | torch.device | None = None,
            threads: int | None = None, cuda_amp: bool = True) -> LatencyResult:
    """Median wall-clock seconds of a forward pass on a zeros batch ``(batch_size, *input_shape)``.

    ``warmup`` untimed passes precede ``repeats`` timed ones, under ``torch.inference_mode`` in
    eval mode (each module's flag restored afterwards); CUDA is synchronised around each timed pass.
    ``device`` defaults to the model's own; a different device moves the model there for the
    measurement and back afterwards. ``threads`` sets ``torch.set_num_threads`` for the
    measurement only. On CUDA with ``cuda_amp`` (the default) the model runs as the trials run it:
    channels_last input and 4-D weights, bf16 autocast (see :func:`latencies`); on CPU it runs in
    its own dtype and memory format.
    """
    return latencies([model], input_shape, batch_size, warmup=warmup, repeats=repeats, rounds=1, device=device,
                     threads=threads, cuda_amp=cuda_amp)[0]


def _check_counts(*, batch_size: int, warmup: int, repeats: int, rounds: int, threads: int | None) -> None:
    """ArgumentError naming the first count of :func:`latencies` out of range (warmup may be 0)."""
    for name, value, low in (("batch_size", batch_size, 1), ("warmup", warmup, 0), ("repeats", repeats, 1),
                             ("rounds", rounds, 1), ("threads", threads, 1)):
        if value is not None and value < low:
            raise ArgumentError(f"{name} must be >= {low}, got {value}")


def latencies(models: Sequence[nn.Module], input_shape: Sequence[int], batch_size: int = 1, *, warmup: int = 3,
              repeats: int = 10, rounds: int = 1, device: str | torch.device | None = None,
              threads: int | None = None, cuda_amp: bool = True) -> list[LatencyResult]:
    """Latency of several models timed interleaved, so machine noise (other processes, clock and
    thermal changes, a shared GPU) hits them alike and their ratio is trustworthy.

    Every model first runs ``warmup`` untimed passes; then ``rounds`` rounds follow, in each of which
    every model in turn runs ``repeats`` timed passes. Each result's ``times_s`` holds the
    ``rounds * repeats`` timed passes of one model (in order) and ``median_s`` their median. With one
    model and ``rounds=1`` this is :func:`latency`.

    Each model runs on ``device`` (default: its own device), moved there for the measurement and
    back afterwards, in eval mode under ``torch.inference_mode`` (each module's flag restored). On
    CUDA every timed pass is bracketed by ``torch.cuda.synchronize``, and with ``cuda_amp`` the pass
    runs as the trials' training and evaluation run: a channels_last input (4-D inputs), 4-D
    parameters and buffers in channels_last for the measurement (their original tensors are put
    back afterwards), under bf16 ``torch.autocast``. ``cuda_amp=False`` times plain fp32 on CUDA
    too. On CPU nothing of that applies: the model runs in its own dtype and memory format.
    """
    shape = _check_shape(input_shape)
    _check_counts(batch_size=batch_size, warmup=warmup, repeats=repeats, rounds=rounds, threads=threads)
    models = list(models)
    if not models:
        raise ArgumentError("latencies needs at least one model")

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with contextlib.ExitStack() as stack:
            runs = [stack.enter_context(_timed_setup(m, shape, batch_size, device, cuda_amp)) for m in models]
            times: list[list[float]] = [[] for _ in models]
            with torch.inference_mode():
                for run in runs:
                    for _ in range(warmup):
                        with run.autocast():
                            run.model(run.x)
                    run.sync()
                for _ in range(rounds):
                    for run, out in zip(runs, times):
                        for _ in range(repeats):
                            with run.autocast():
                                run.sync()
                                start = time.perf_counter()
                                run.model(run.x)
                                run.sync()
                                out.append(time.perf_counter() - start)
        measured_threads = torch.get_num_threads()
    finally:
        if threads is not None:
            torch.set_num_threads(old_threads)
    results = []
    for model, run, ts in zip(models, runs, times):
        result = LatencyResult(median_s=float(statistics.median(ts)), times_s=tuple(ts), batch_size=batch_size,
                               threads=measured_threads, device=str(run.device))
        log.debug("latency of %s on %s (batch %d, %d threads): %.6f s", type(model).__name__, result.device,
                  batch_size, measured_threads, result.median_s)
        results.append(result)
    return results


@dataclass
class _TimedRun:
    model: nn.Module
    x: torch.Tensor
    device: torch.device
    amp: bool

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()


@contextlib.contextmanager
def _timed_setup(model: nn.Module, shape: tuple[int, ...], batch_size: int, device: str | torch.device | None,
                 cuda_amp: bool) -> Iterator[_TimedRun]:
    """``model`` on the target device in eval mode (and channels_last for CUDA AMP) with its input;
    everything put back as it was on exit."""
    home, dtype = _device_dtype(model)
    target = torch.device(device) if device is not None else home
    moved = target != home
    if moved:
        model.to(target)
    try:
        amp = cuda_amp and target.type == "cuda"
        with _eval_mode(model), (_channels_last(model) if amp else contextlib.nullcontext()):
            x = torch.zeros((batch_size, *shape), device=target, dtype=dtype)
            if amp and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            yield _TimedRun(model, x, target, amp)
    finally:
        if moved:
            model.to(home)


@contextlib.contextmanager
def _channels_last(model: nn.Module) -> Iterator[None]:
    """4-D parameters and buffers in channels_last for the block; the original tensors are put back
    afterwards (so an optimizer's references and the memory format the caller had are kept)."""
    saved = []
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last):
                saved.append((t, t.data))
                t.data = t.data.contiguous(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for t, data in saved:
            t.data = data
