"""`storage_path` on an object store, against a real S3-protocol server (moto, in this process,
on 127.0.0.1): the storage helpers, the dense base model published to and fetched from S3, and a
whole sweep whose state, checkpoints and base model live in the bucket while the driver writes
nothing to its working directory. Credentials are fake ones in the environment; Ray Tune forwards
them from the driver to its trial actors, the way a real cluster without instance roles gets them."""
from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import torch

moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[test]')")

import pyarrow.fs as pafs  # noqa: E402

from trainables import storage  # noqa: E402
from trainables.settings import TrainSettings, TrialSettings  # noqa: E402

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
SECRET = "prunetune-fake-secret-7c1d"  # moto takes any key; the test checks it is stored nowhere


@pytest.fixture(scope="module")
def s3_endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """A fresh bucket; returns ``(storage URI of s3://BUCKET/runs, pyarrow filesystem, bucket)``."""
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET,
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    bucket = f"prunetune-{uuid.uuid4().hex[:10]}"
    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http", region="us-east-1",
                           allow_bucket_creation=True)
    fs.create_dir(bucket)
    return f"s3://{bucket}/runs?endpoint_override={s3_endpoint}&scheme=http", fs, bucket


def _keys(fs: pafs.FileSystem, prefix: str) -> set[str]:
    """Every object (file) under ``prefix``, relative to it."""
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return {i.path[len(prefix) + 1:] for i in infos if i.type == pafs.FileType.File}


def _settings(base_dir: str) -> TrialSettings:
    return TrialSettings(base=TrainSettings(epochs=1, batch_size=128), base_dir=base_dir, use_gpu=False)


@pytest.mark.parametrize("where", ["s3", "local"])
def test_storage_helpers_round_trip(where, s3, tmp_path):
    uri, fs, bucket = s3
    root = uri if where == "s3" else str(tmp_path / "shared")
    f = storage.join(root, "exp", "state.json")
    if where == "s3":  # the query (pyarrow's filesystem options) stays at the end of a joined URI
        assert f == uri.replace("/runs?", "/runs/exp/state.json?")
        assert storage.local_path(root) is None
    else:
        assert storage.local_path(root) == tmp_path / "shared"
    assert storage.name(storage.join(root, "exp")) == "exp"
    assert not storage.exists(f)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.read_text(f)
    storage.write_text(f, '{"a": 1}')
    assert storage.read_text(f) == '{"a": 1}' and storage.is_file(f)
    assert storage.exists(storage.join(root, "exp")) and not storage.is_file(storage.join(root, "exp"))

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(bytes(range(256)) * 300)
    (src / "sub" / "b.txt").write_text("b")
    storage.upload_dir(src, storage.join(root, "up"))
    if where == "s3":
        assert _keys(fs, f"{bucket}/runs/up") == {"a.bin", "sub/b.txt"}
    storage.download_dir(storage.join(root, "up"), tmp_path / "down")
    assert (tmp_path / "down" / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
    assert (tmp_path / "down" / "sub" / "b.txt").read_text() == "b"
    storage.delete(storage.join(root, "up"))
    assert not storage.exists(storage.join(root, "up"))
    with pytest.raises(FileNotFoundError):
        storage.download_dir(storage.join(root, "up"), tmp_path / "again")


def test_base_model_is_published_to_s3_once_and_fetched_into_a_node_cache(s3, tmp_path, caplog, monkeypatch):
    from methods import create_method
    from trainables.base_model import METRICS, base_model_dir, ensure_base_model, fetch_base_model
    from trainables.model_io import load_model
    from trainables.trial import _start_model

    uri, fs, bucket = s3
    settings = _settings(storage.join(uri, "base_models"))
    key = settings.base_key()
    prefix = f"{bucket}/runs/base_models"
    # A writer that died mid-upload left weights and spec but no metrics.json: that base is absent.
    fs.create_dir(f"{prefix}/{key}")
    with fs.open_output_stream(f"{prefix}/{key}/weights.pt") as f:
        f.write(b"half a model")
    with pytest.raises(FileNotFoundError, match="metrics.json missing"):
        fetch_base_model(settings, cache_root=tmp_path / "cache")

    caplog.set_level("INFO", logger="trainables.base_model")
    target, metrics = ensure_base_model(settings)
    assert target == base_model_dir(settings) == storage.join(uri, "base_models", key)
    assert _keys(fs, prefix) == {f"{key}/weights.pt", f"{key}/spec.json", f"{key}/{METRICS}"}  # one base, no temp
    assert json.loads(fs.open_input_stream(f"{prefix}/{key}/{METRICS}").read()) == metrics
    assert "trained dense base model" in caplog.text

    caplog.clear()
    again_target, again = ensure_base_model(settings)
    assert (again_target, again) == (target, metrics)  # the same record, "seconds" included: not retrained
    assert "reusing dense base model" in caplog.text and "trained dense base model" not in caplog.text

    # The same configuration on a local folder trains the same weights (CPU, fixed seed): the model a
    # trial fetches from S3 computes what the trained one computes.
    local_dir, local_metrics = ensure_base_model(_settings(str(tmp_path / "local_base")))
    assert local_metrics["accuracy"] == metrics["accuracy"]
    trained, _ = load_model(local_dir)
    cached = fetch_base_model(settings, cache_root=tmp_path / "cache")
    assert cached.parent == tmp_path / "cache" / "prunetune-base-cache" and cached.name.startswith(key)
    assert sorted(p.name for p in cached.iterdir()) == sorted(["weights.pt", "spec.json", METRICS])
    stamp = (cached / "weights.pt").stat().st_mtime_ns
    assert fetch_base_model(settings, cache_root=tmp_path / "cache") == cached  # fetched once per node
    assert (cached / "weights.pt").stat().st_mtime_ns == stamp
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no temporary sibling left
    # What a trial starts from (default cache root: the system temp folder).
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "systmp"))
    (tmp_path / "systmp").mkdir()
    start = _start_model(settings, create_method("l1_norm"))
    assert (tmp_path / "systmp" / "prunetune-base-cache").is_dir()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(start.eval()(x), trained(x))
        assert torch.equal(load_model(cached)[0](x), trained(x))


def test_sweep_on_s3_keeps_everything_in_the_bucket(ray_local, s3, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from search.config import load_config
    from search.sweep import STATE_FILE, resume_sweep, run_sweep, settings_from_config
    from search.tracking import child_runs

    uri, fs, bucket = s3
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    home_results = Path.home() / "ray_results"
    before_home = set(home_results.iterdir()) if home_results.is_dir() else set()
    cache = Path(tempfile.gettempdir()) / "prunetune-base-cache"
    before_cache = set(cache.iterdir()) if cache.is_dir() else set()
    cfg = load_config(str(QUICKSTART), [
        "methods=[l1_norm]", "num_trials=2", "max_concurrent_trials=2", "base.epochs=1", "finetune.epochs=1",
        "space.prune_ratio=[0.3, 0.7]", "sampler=random", "name=s3sweep", f"storage_path={uri}",
        f"tracking_uri=sqlite:///{tmp_path}/mlflow/mlflow.db"])
    (tmp_path / "mlflow").mkdir()
    result = run_sweep(cfg)

    assert result.finished == 2 and result.failed == 0 and result.front
    exp = result.experiment_dir
    assert isinstance(exp, str) and exp.startswith(f"s3://{bucket}/runs/s3sweep-") and exp.endswith(uri[uri.index("?"):])
    name = storage.name(exp)
    keys = _keys(fs, f"{bucket}/runs")
    # Tune's experiment state and the sweep's own state file.
    assert {f"{name}/{STATE_FILE}", f"{name}/tuner.pkl"} <= keys
    assert any(k.startswith(f"{name}/experiment_state-") for k in keys)
    # Every trial's checkpoints (model, optimizer, method state) went to the bucket.
    trial_dirs = {k.split("/")[1] for k in keys if k.startswith(name + "/") and "/checkpoint_" in k}
    assert len(trial_dirs) == 2
    for trial_dir in trial_dirs:
        assert any(k.startswith(f"{name}/{trial_dir}/checkpoint_") and k.endswith("/model/weights.pt") for k in keys)
    # The dense base model (one, committed) and the front's table and plot.
    base = {k for k in keys if k.startswith("base_models/")}
    assert len({k.split("/")[1] for k in base}) == 1 and any(k.endswith("/metrics.json") for k in base)
    assert {f"{name}/front/pareto_front.csv", f"{name}/front/pareto_front.png"} <= keys
    # The credentials reached the trial actors through their environment, never through a stored file.
    assert not [k for k in keys if SECRET.encode() in fs.open_input_stream(f"{bucket}/runs/{k}").read()]
    # The trials loaded the base from the bucket into the node-local cache.
    fetched = set(cache.iterdir()) - before_cache
    assert [p.name.startswith(settings_from_config(cfg).base_key()) for p in fetched] == [True]
    # Nothing on the driver's disk: not in its working directory, not in Tune's default ~/ray_results;
    # beside the bucket only the MLflow database and its artifacts (the driver's own records).
    assert list(cwd.iterdir()) == []
    assert set(home_results.iterdir() if home_results.is_dir() else ()) == before_home
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "mlflow"]
    client = MlflowClient(cfg.tracking_uri)
    for run in child_runs(client, result.parent_run_id):
        assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {"model/weights.pt",
                                                                                      "model/spec.json"}
    assert client.get_run(result.parent_run_id).data.tags["prunetune.experiment_dir"] == exp

    # `prunetune resume s3://...` on the finished sweep: Tune state restored from the bucket, no trial re-run.
    again = resume_sweep(exp)
    assert again.parent_run_id == result.parent_run_id and again.experiment_dir == exp
    assert [p.run_id for p in again.front] == [p.run_id for p in result.front]
    assert again.finished == 2 and len(child_runs(client, result.parent_run_id)) == 2

    # `prunetune fronts s3://...`: the sweep directory on the store names its records.
    from search.compare import resolve_sweep

    ref = resolve_sweep(exp)
    assert (ref.parent_run_id, ref.tracking_uri, ref.experiment_dir) == (result.parent_run_id, cfg.tracking_uri, exp)
    assert ref.config == cfg.to_dict()
    assert resolve_sweep(cfg.name, cfg.tracking_uri).experiment_dir == exp  # found by name, too
    assert list(cwd.iterdir()) == []
    for p in fetched:  # leave the shared temp folder as it was
        shutil.rmtree(p, ignore_errors=True)


def test_resume_of_a_missing_s3_sweep_is_one_clear_error(s3, capsys):
    from search.cli import main

    uri, _, _ = s3
    missing = storage.join(uri, "nope-20260101-000000")
    assert main(["resume", missing]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"prunetune: error: {missing} is not a prunetune sweep directory (prunetune_sweep.json missing)"]


def test_preflight_refuses_a_missing_bucket_in_one_line(s3):
    from methods.errors import ConfigError
    from search.preflight import check_storage_path

    uri, fs, bucket = s3
    check_storage_path(uri)  # writable: the probe object is written and removed again
    assert _keys(fs, f"{bucket}/runs") == set()
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"^storage_path: cannot write to s3://no-such-bucket/runs\?.*\(.+\)$"):
        check_storage_path(uri.replace(bucket, "no-such-bucket"))
    assert time.monotonic() - start < 30
