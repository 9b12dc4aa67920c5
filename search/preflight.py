"""Checks that need more than the config file itself, run before any work starts (before MLflow or
Ray is touched): the data set's files decode a first batch of each split, the model builds and runs
on the data set's input (with scratch, also at the widths its ``expansion`` searches), a weights
file loads with ``weights_only=True``, the MLflow tracking server and the Ray cluster answer,
``storage_path`` and the SQLite database's folder can be written (by trying: a folder that
``os.access`` calls writable, like ``/proc`` for root, may still refuse) and hold a directory named
like the sweep's. Each failure is one ``ConfigError`` line naming the field; each network probe
gives up after a few seconds instead of hanging."""
from __future__ import annotations

import base64
import contextlib
import errno
import json
import logging
import os
import socket
import threading
import uuid
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

from methods.errors import ConfigError

from .config import SweepConfig

__all__ = ["preflight", "check_workers_fit", "check_data", "check_model", "check_expansion", "check_tracking_uri",
           "check_ray_address", "check_storage_path"]

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 10.0


def preflight(cfg: SweepConfig) -> None:
    with _one_torch_thread():
        check_data(cfg)
        check_model(cfg)
        check_expansion(cfg)
    check_tracking_uri(cfg.tracking_uri)
    check_storage_path(cfg.storage_path, cfg.name)
    if cfg.address:
        check_ray_address(cfg.address)
    else:
        check_workers_fit(cfg.resources_per_trial, *_local_devices(), "this machine")


@contextlib.contextmanager
def _one_torch_thread():
    """The checks' passes are a few images through a model: with torch's default of one thread per
    core, its workers' spin-waits cost more CPU than the work (preflight on a loaded 2-core machine:
    2.7-3.6 s with one thread, 6.5-14.6 s with two). The driver's own count comes back after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _local_devices() -> tuple[float, float]:
    """(CPUs, GPUs) an embedded Ray node on this machine would offer."""
    import torch

    try:
        from ray._private.utils import get_num_cpus

        cpus = float(get_num_cpus())
    except Exception:  # noqa: BLE001  (a private helper: fall back to the plain count)
        cpus = float(os.cpu_count() or 1)
    return cpus, float(torch.cuda.device_count())


def check_workers_fit(res, cpus: float, gpus: float, where: str) -> None:
    """A data-parallel trial's ranks fit in ``cpus``/``gpus``; else one line naming
    ``resources_per_trial.workers``. One-process trials are not checked here."""
    if res.workers == 1:
        return
    _check_train_v2()
    need_cpu, need_gpu = res.workers * res.cpu, res.workers * res.gpu
    if need_cpu > cpus or need_gpu > gpus:
        raise ConfigError(f"resources_per_trial.workers: {res.workers} workers x (cpu {res.cpu}, gpu {res.gpu}) "
                          f"need {need_cpu:g} CPUs and {need_gpu:g} GPUs; {where} has {cpus:g} CPUs and {gpus:g} GPUs")


def _input_of(cfg: SweepConfig) -> tuple[tuple[int, int, int], int]:
    """(input shape, number of classes) of the data set, without loading it."""
    if cfg.dataset == "digits":
        side = cfg.image_size or 8
        return (1, side, side), 10
    if cfg.dataset in ("cifar10", "cifar100"):
        side = cfg.image_size or 32
        return (3, side, side), 10 if cfg.dataset == "cifar10" else 100
    side = cfg.image_size or 224
    classes = [p for p in (Path(cfg.data_dir) / "train").iterdir() if p.is_dir()] if cfg.data_dir else []
    if not classes:
        raise ConfigError(f"data_dir: {cfg.data_dir}/train has no class folders (imagefolder expects train/<class>/)")
    return (3, side, side), len(classes)


def check_data(cfg: SweepConfig) -> None:
    """The data set loads as the trials will load it and a first batch of each split decodes. (The
    driver keeps what it loaded: an embedded sweep trains its dense base on it without reloading.)
    On a cluster the nodes read their own ``data_dir``; this checks the driver's copy."""
    from trainables.data import make_loader
    from trainables.workspace import load_data

    from .sweep import settings_from_config

    field = "data_dir" if cfg.data_dir is not None and cfg.dataset != "digits" else "dataset"
    if cfg.dataset == "imagefolder":  # scanning an ImageNet-sized tree here would cost minutes
        _check_first_images(Path(cfg.data_dir))
        return
    try:
        data = load_data(settings_from_config(cfg))
        for split in ("train", "val", "test"):
            next(iter(make_loader(getattr(data, split), 2, shuffle=False)))
    except StopIteration:
        raise ConfigError(f"{field}: {cfg.dataset} at {cfg.data_dir} has an empty split") from None
    except Exception as exc:  # DataError, or whatever a decoder raises on a garbage file
        raise ConfigError(f"{field}: {cfg.dataset} does not load from {cfg.data_dir}: {_first(exc)}") from None


def _check_first_images(root: Path) -> None:
    """The first image of the first class of ``train/`` and ``val/`` decodes."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

    for split in ("train", "val"):
        classes = sorted(p for p in (root / split).iterdir() if p.is_dir())
        images = sorted(f for f in classes[0].iterdir() if f.suffix.lower() in IMG_EXTENSIONS) if classes else []
        if not images:
            raise ConfigError(f"data_dir: {root / split} has no class folder with images (imagefolder expects "
                              f"{split}/<class>/<image>)")
        try:
            default_loader(str(images[0])).load()
        except Exception as exc:  # PIL.UnidentifiedImageError, OSError: a truncated or garbage file
            raise ConfigError(f"data_dir: {images[0]} does not decode as an image: {_first(exc)}") from None


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def check_model(cfg: SweepConfig) -> None:
    import torch

    from trainables.models import create_model

    shape, num_classes = _input_of(cfg)
    weights = cfg.model_kwargs.get("weights")
    if weights:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors come in many types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"model_kwargs.weights: {weights} does not load with torch.load(weights_only=True): "
                              f"{first}") from None
        if not isinstance(state, dict):
            raise ConfigError(f"model_kwargs.weights: {weights} holds a {type(state).__name__}, not a state dict")
    try:
        model = create_model(cfg.model, num_classes, in_channels=shape[0], **cfg.model_kwargs).eval()
        with torch.no_grad():
            model(torch.zeros(1, *shape))
    except ConfigError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        field = "model_kwargs.weights" if weights and "state_dict" in first else "model"
        raise ConfigError(f"{field}: {cfg.model} does not run on {cfg.dataset} input {shape} "
                          f"(set image_size?): {first}") from None
    check_methods_fit(cfg, model, shape)


def check_methods_fit(cfg: SweepConfig, model, input_shape) -> None:
    """Every selected method can attach to this architecture (e.g. ManiDP needs ResNet blocks)."""
    import copy

    from methods import PruneContext, create_method
    from methods.errors import PruneTuneError

    methods_log = logging.getLogger("methods")
    level = methods_log.level
    methods_log.setLevel(max(logging.WARNING, methods_log.getEffectiveLevel()))  # no INFO lines of a trial that never runs
    try:
        for i, name in enumerate(cfg.methods):
            try:
                create_method(name).prepare(copy.deepcopy(model), PruneContext(tuple(input_shape)))
            except PruneTuneError as exc:  # a SurgeryError, or e.g. scratch finding no batch norm to gate
                raise ConfigError(f"methods[{i}]: {name} cannot prune {cfg.model}: {exc}") from None
    finally:
        methods_log.setLevel(level)


def check_expansion(cfg: SweepConfig) -> None:
    """Scratch builds its searched network ``expansion`` x wider than the configured model: the
    narrowest and the widest of the searched range must build (weights file included, as the trial
    builds it) and run on the data set's input. Checked on the meta device: shapes only, no weights
    drawn, so it costs milliseconds even for VGG-16."""
    if "scratch" not in cfg.methods:
        return
    import torch

    from trainables.models import create_model

    hp = cfg.search_space()["scratch"]["expansion"]
    field = "space.expansion" if "expansion" in cfg.space and "expansion" not in cfg.space.get("scratch", {}) \
        else "space.scratch.expansion"
    shape, num_classes = _input_of(cfg)
    base = cfg.model_kwargs.get("width_mult", 1.0)
    for expansion in sorted({hp.low, hp.high} - {1.0}):
        kwargs = {**cfg.model_kwargs, "width_mult": base * expansion}
        try:
            with torch.device("meta"), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # loading real weights into meta tensors warns per tensor
                create_model(cfg.model, num_classes, in_channels=shape[0], **kwargs).eval()(torch.zeros(1, *shape))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if kwargs.get("weights") and "state_dict" in first:
                first = f"model_kwargs.weights {kwargs['weights']} holds the unexpanded model ({first})"
            raise ConfigError(f"{field}: {cfg.model} cannot be built {base * expansion:g}x wide (scratch expansion "
                              f"{expansion:g} x model_kwargs.width_mult {base:g}): {first}") from None


def check_tracking_uri(uri: str) -> None:
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "sqlite":
        path = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
        if path is not None and str(path) not in ("", ":memory:"):
            folder = path.expanduser().resolve().parent
            if not folder.is_dir():
                raise ConfigError(f"tracking_uri: folder {folder} for {uri} does not exist")
            if not path.exists():  # the database and its lock file will be created there
                _try_write(folder, "tracking_uri")
        return
    if parsed.scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as resp:
                resp.read(64)
        except urllib.error.HTTPError as exc:
            if exc.code not in (401, 403):  # one that wants credentials is asked with them below
                raise ConfigError(f"tracking_uri: {uri} answered HTTP {exc.code} on /health") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConfigError(f"tracking_uri: cannot reach MLflow server {uri} ({reason})") from None
        _check_tracking_api(uri)


def _check_tracking_api(uri: str) -> None:
    """/health answers for any web app: ask one read-only tracking API call, with the driver's
    credentials, so a wrong URL or refused credentials are one line before any work."""
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if user and password:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    elif token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as resp:
            body = resp.read(1 << 16)
        json.loads(body or b"{}")
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise ConfigError(f"tracking_uri: {uri} refused this driver's credentials (HTTP {exc.code}; set "
                              "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN)") from None
        raise ConfigError(f"tracking_uri: {uri} answers but is not an MLflow tracking server "
                          f"(HTTP {exc.code} from its tracking API)") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ConfigError(f"tracking_uri: cannot reach MLflow server {uri} ({getattr(exc, 'reason', exc)})") from None
    except ValueError:
        raise ConfigError(f"tracking_uri: {uri} answers but is not an MLflow tracking server "
                          "(its tracking API did not return JSON)") from None


def check_ray_address(address: str) -> None:
    if address == "local":
        return
    if address == "auto":
        import ray._private.services as services

        try:
            address = services.canonicalize_bootstrap_address(address)
        except ConnectionError:
            raise ConfigError("address: 'auto' found no running Ray cluster on this machine "
                              "(start one with `ray start --head` or `ray up cluster.yaml`)") from None
        if not address:
            raise ConfigError("address: 'auto' found no running Ray cluster on this machine")
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"address: expected host:port, ray://host:port or auto, got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ConfigError(f"address: cannot reach Ray at {address} ({exc})") from None


def _check_train_v2() -> None:
    """Data-parallel trials run on Ray Train V2 (its reporting and callback API)."""
    import ray

    try:
        from ray.train.v2._internal.constants import is_v2_enabled

        enabled = is_v2_enabled()
    except ImportError:
        enabled = False
    if not enabled:
        raise ConfigError(f"resources_per_trial.workers: data-parallel trials need Ray Train V2, which Ray "
                          f"{ray.__version__} here lacks or has off (RAY_TRAIN_V2_ENABLED=1 turns it on)")


def _try_write(folder: Path, field: str, name: str | None = None) -> None:
    """Create (and remove) a directory in ``folder``, named like the sweep's own (``name`` plus a
    timestamp's length) when given: the folder takes writes and a name that long."""
    probe = folder / (f"{name}-pf{uuid.uuid4().hex[:13]}" if name else f".prunetune-preflight-{uuid.uuid4().hex}")
    try:
        probe.mkdir()
        (probe / "probe").write_bytes(b"")
        (probe / "probe").unlink()
        probe.rmdir()
    except OSError as exc:
        what = exc.strerror or type(exc).__name__
        if name and exc.errno == errno.ENAMETOOLONG:
            raise ConfigError(f"name: {name[:20]!r}... is too long for a directory name in {folder} ({what})") from None
        raise ConfigError(f"{field}: cannot write in folder {folder} ({what})") from None


def check_storage_path(location: str, name: str | None = None) -> None:
    """A local folder: it (or its nearest existing parent) is a folder where a directory named like
    the sweep's can be created (tried, then removed). A URI (``s3://...``): the filesystem resolves
    and a probe object can be written and deleted there, with this process's credentials, within
    ``PROBE_TIMEOUT_S``."""
    from trainables import storage

    if not storage.is_uri(location) or location.startswith("file://"):
        path = storage.local_path(location)
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise ConfigError(f"storage_path: {existing} is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"storage_path: cannot write in folder {existing} (no write permission)")
        _try_write(existing, "storage_path", name)
        return
    outcome: list[BaseException | None] = []

    def probe() -> None:  # resolving an s3:// URI may ask the bucket for its region: inside the time limit too
        try:
            target = storage.join(location, f".prunetune-preflight-{uuid.uuid4().hex}")
            storage.write_text(target, "")
            storage.delete(target)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001  (reported below as one line)
            outcome.append(exc)

    worker = threading.Thread(target=probe, name="prunetune-storage-probe", daemon=True)
    worker.start()
    worker.join(PROBE_TIMEOUT_S)
    if not outcome:
        raise ConfigError(f"storage_path: {location} did not answer within {PROBE_TIMEOUT_S:.0f} s")
    exc = outcome[0]
    if exc is not None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"storage_path: cannot write to {location} ({first})") from None
