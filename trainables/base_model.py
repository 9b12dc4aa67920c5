"""The shared dense base model: trained once per distinct configuration and cached on disk under
``base_dir/<hash>/`` (weights + spec + metrics), so no trial ever trains its own."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .data import make_loader
from .model_io import model_spec, save_model
from .models import create_model
from .settings import TrialSettings
from .train import cosine_lr, evaluate, pick_device, train_epoch
from .workspace import load_data

__all__ = ["ensure_base_model", "base_model_dir", "build_model"]

log = logging.getLogger(__name__)
METRICS = "metrics.json"


def build_model(settings: TrialSettings, *, width_mult: float | None = None) -> torch.nn.Module:
    data = load_data(settings)
    kwargs = dict(settings.model_kwargs)
    if width_mult is not None:
        kwargs["width_mult"] = kwargs.get("width_mult", 1.0) * width_mult
    return create_model(settings.model, data.num_classes, in_channels=data.input_shape[0], **kwargs)


def base_model_dir(settings: TrialSettings) -> Path:
    return Path(settings.base_dir) / settings.base_key()


def ensure_base_model(settings: TrialSettings) -> tuple[Path, dict]:
    """Return ``(dir, metrics)`` of the cached base model, training it first if it is missing."""
    target = base_model_dir(settings)
    if (target / METRICS).is_file():
        log.info("reusing dense base model %s", target)
        return target, json.loads((target / METRICS).read_text())
    torch.manual_seed(settings.seed)
    device = pick_device(settings.use_gpu)
    data = load_data(settings)
    model = build_model(settings).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    cfg = settings.base
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loader = make_loader(data.train, cfg.batch_size, shuffle=True, seed=settings.seed)
    val_loader = make_loader(data.val, 256, shuffle=False)
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(cfg.lr, epoch, cfg.epochs)
        stats = train_epoch(model, loader, optimizer, device=device)
        acc, _ = evaluate(model, val_loader, device=device)
        log.info("base %s epoch %d/%d loss %.4f val accuracy %.4f", settings.model, epoch + 1, cfg.epochs, stats.loss, acc)
    val_acc, _ = evaluate(model, val_loader, device=device)
    test_acc, _ = evaluate(model, make_loader(data.test, 256, shuffle=False), device=device)
    metrics = {"accuracy": val_acc, "test_accuracy": test_acc, "epochs": cfg.epochs,
               "seconds": time.perf_counter() - start, "key": settings.base_key()}
    # Write into a temporary sibling and rename, so a concurrent reader never sees half a model.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    save_model(model.cpu(), tmp, model_spec(model, settings.model, data.num_classes,
                                            in_channels=data.input_shape[0], **settings.model_kwargs))
    (tmp / METRICS).write_text(json.dumps(metrics, indent=1))
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("trained dense base model in %.1fs: val accuracy %.4f -> %s", metrics["seconds"], val_acc, target)
    return target, json.loads((target / METRICS).read_text())

