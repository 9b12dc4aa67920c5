"""Small helpers shared by the test modules (pytest puts this folder on sys.path)."""
from pathlib import Path

import torch
from torch import nn


def randomise_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every batch norm non-trivial statistics and affine parameters; return it in eval mode,
    so surgery equivalence tests compare more than identity-like layers."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def prunetune_cli() -> list[str]:
    """The command that runs the `prunetune` CLI in a subprocess (the console script if installed)."""
    import shutil
    import sys

    exe = shutil.which("prunetune")
    return [exe] if exe else [sys.executable, "-m", "search.cli"]


def calibrate_bn(model: nn.Module, shape: tuple[int, ...], n: int = 32) -> nn.Module:
    """Give a random network sane BN statistics (one train-mode pass over ``n`` random inputs,
    cumulative average); return it in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(n, *shape))
    for m in bns:
        m.momentum = 0.1
    return model.eval()


def live_processes():
    """``(pid, proc_dir, session_id)`` of every live (not zombie) process, read from /proc; a
    process that exits while we look is skipped."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        except (OSError, ValueError):
            continue
        if fields[0] != "Z":
            yield int(entry.name), entry, int(fields[3])


def small_trial_settings(base_dir, seed: int, finetune_epochs: int):
    """A half-width ResNet-20 digits trial with a one-epoch dense base (trained here, once per
    ``base_dir``): what the trial-level tests run."""
    from trainables.base_model import ensure_base_model
    from trainables.settings import TrainSettings, TrialSettings

    settings = TrialSettings(model="resnet20", dataset="digits", seed=seed, use_gpu=False,
                             model_kwargs={"width_mult": 0.5}, base=TrainSettings(epochs=1, lr=0.1, batch_size=128),
                             finetune=TrainSettings(epochs=finetune_epochs, lr=0.01, batch_size=256),
                             calibration_batches=2, base_dir=str(base_dir))
    ensure_base_model(settings)
    return settings
