"""The shared dense base model: trained once per distinct configuration and cached on the shared
storage under ``base_dir/<hash>/`` (weights + spec + metrics), so no trial ever trains its own.

``base_dir`` is a local/NFS folder or an object-store URI (``trainables.storage``). ``metrics.json``
is the commit marker: a folder without it is absent. On a local filesystem the model is written into
a temporary sibling and renamed; an object store has no atomic rename, so the weights and spec go up
first and ``metrics.json`` last. Trials load it through :func:`fetch_base_model`, which reads a local
folder in place and copies an object-store one into a node-local cache first.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from methods.errors import MissingFileError

from . import storage
from .device_data import trial_loader
from .model_io import model_spec, save_model
from .models import create_model
from .settings import TrialSettings
from .train import cosine_lr, evaluate, pick_device, train_epoch
from .workspace import load_data

__all__ = ["ensure_base_model", "base_model_dir", "fetch_base_model", "build_model", "CACHE_DIR"]

log = logging.getLogger(__name__)
METRICS = "metrics.json"
#: Node-local cache of base models fetched from an object store (one folder per key and version).
CACHE_DIR = "prunetune-base-cache"


def build_model(settings: TrialSettings, *, width_mult: float | None = None) -> torch.nn.Module:
    data = load_data(settings)
    kwargs = dict(settings.model_kwargs)
    if width_mult is not None:
        kwargs["width_mult"] = kwargs.get("width_mult", 1.0) * width_mult
    return create_model(settings.model, data.num_classes, in_channels=data.input_shape[0], **kwargs)


def base_model_dir(settings: TrialSettings) -> str:
    """Where the base model of ``settings`` lives: a local path or a URI (see ``trainables.storage``)."""
    return storage.join(settings.base_dir, settings.base_key())


def _read_metrics(target: str) -> dict | None:
    try:
        return json.loads(storage.read_text(storage.join(target, METRICS)))
    except FileNotFoundError:
        return None


def ensure_base_model(settings: TrialSettings) -> tuple[str, dict]:
    """Return ``(location, metrics)`` of the cached base model, training it first if it is missing."""
    target = base_model_dir(settings)
    metrics = _read_metrics(target)
    if metrics is not None:
        log.info("reusing dense base model %s", target)
        return target, metrics
    torch.manual_seed(settings.seed)
    device = pick_device(settings.use_gpu)
    data = load_data(settings)
    model = build_model(settings).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    cfg = settings.base
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    workers = max(0, torch.get_num_threads() - 1)
    loader = trial_loader(data.train, cfg.batch_size, shuffle=True, seed=settings.seed, device=device, num_workers=workers)
    val_loader = trial_loader(data.val, 256, shuffle=False, device=device, num_workers=workers)
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(cfg.lr, epoch, cfg.epochs)
        stats = train_epoch(model, loader, optimizer, device=device)
        acc, _ = evaluate(model, val_loader, device=device)
        log.info("base %s epoch %d/%d loss %.4f val accuracy %.4f", settings.model, epoch + 1, cfg.epochs, stats.loss, acc)
    val_acc, _ = evaluate(model, val_loader, device=device)
    test_acc, _ = evaluate(model, trial_loader(data.test, 256, shuffle=False, device=device), device=device)
    metrics = {"accuracy": val_acc, "test_accuracy": test_acc, "epochs": cfg.epochs,
               "seconds": time.perf_counter() - start, "key": settings.base_key()}
    spec = model_spec(model, settings.model, data.num_classes, in_channels=data.input_shape[0], **settings.model_kwargs)
    local = storage.local_path(target)
    if local is not None:
        def fill(folder: Path) -> None:
            save_model(model.cpu(), folder, spec)
            (folder / METRICS).write_text(json.dumps(metrics, indent=1))

        storage.publish_dir(local, fill)  # a concurrent reader never sees half a model; if another
        # process published first, theirs is kept
    else:
        with tempfile.TemporaryDirectory(prefix="prunetune-base-") as tmp:
            save_model(model.cpu(), tmp, spec)
            if _read_metrics(target) is None:  # another process may have published it meanwhile: keep theirs
                storage.upload_dir(tmp, target)  # weights and spec first ...
                storage.write_text(storage.join(target, METRICS), json.dumps(metrics, indent=1))  # ... commit last
    log.info("trained dense base model in %.1fs: val accuracy %.4f -> %s", metrics["seconds"], val_acc, target)
    return target, _read_metrics(target)


def fetch_base_model(settings: TrialSettings, cache_root: str | os.PathLike | None = None) -> Path:
    """A local folder holding the base model of ``settings``, ready for ``model_io.load_model``.

    A local or NFS ``base_dir`` is read in place. From an object store the model is copied once per
    node into ``cache_root/prunetune-base-cache/<key>-<version>`` (default root: the system temp
    folder), through a temporary sibling and a rename, so concurrent trials on one node are safe; the
    version is a hash of the location and its ``metrics.json``, so a retrained base is fetched anew.
    """
    target = base_model_dir(settings)
    local = storage.local_path(target)
    if local is not None:
        return local
    try:
        marker = storage.read_text(storage.join(target, METRICS))
    except FileNotFoundError:
        raise MissingFileError(f"dense base model {target} is not on the shared storage "
                                f"({METRICS} missing): train it with ensure_base_model first") from None
    version = hashlib.sha256(f"{target}\n{marker}".encode()).hexdigest()[:12]
    cache = Path(cache_root or tempfile.gettempdir()) / CACHE_DIR / f"{settings.base_key()}-{version}"
    if (cache / METRICS).is_file():
        return cache
    storage.publish_dir(cache, lambda folder: storage.download_dir(target, folder))  # False: another
    # trial on this node fetched it first
    log.info("fetched dense base model %s -> %s", target, cache)
    return cache
