"""What logging a trial's model as an MLflow model costs the sweep's driver.

Every finished trial's pruned model is logged on the driver (only the driver writes to MLflow) as a
pt2 MLflow model (``search.mlflow_model.log_pt2_model``: explicit ``pip_requirements``, serving-input
validation off). Two measurements:

Default, wall time side by side, in one process and one SQLite store, over ``--repeats`` models each:

* prunetune: ``log_pt2_model(..., validate=False)`` as ``search.tracking`` calls it;
* MLflow's defaults: ``mlflow.pytorch.log_model`` (pt2, same input example) with the requirements
  inferred (MLflow imports the model in a subprocess to find them) and the serving input validated
  (the exported program is loaded back and run on the example).

A ResNet-20 for digits (8x8, 10 classes; the quickstart's) stands in for a trial's pruned model; the
first call of each kind is warm-up and not counted.

    python benchmarks/bench_trial_model_logging.py [--repeats 3] [--threads 1]

``--parts``: the CPU seconds (``time.thread_time`` of the logging thread) of the driver's whole
per-trial model job (``MLflowTrialLogger._log_model_job``: checkpoint copy, weights + spec
artifacts, model rebuild, ``log_pt2_model``) split into its parts, for an l1_norm-pruned (ratio
0.5) ResNet-20 on digits (1x8x8) and ResNet-56 on CIFAR shapes (3x32x32), each trial's run holding
20 epochs of metrics as a sweep's does. A part is the exclusive CPU time inside the named functions
(a function called inside another part counts for itself only), found by wrapping them (MLflow's
and torch's, named in ``PARTS``) for the measurement; "rest" is what no part covers. Min / median /
max over ``--repeats`` trials after one warm-up trial (imports). With ``--compare-with DIR`` the
same job from another checkout (``git worktree add /tmp/old <commit>``) runs in alternation with
this one's, each round in a fresh process per checkout, so a change is measured before/after side
by side under the same load:

    python benchmarks/bench_trial_model_logging.py --parts [--repeats 5] [--rounds 2] [--compare-with DIR]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _mlflow_defaults(client, run_id: str, model, example) -> None:
    """``log_model`` as MLflow's docs call it: requirements inferred, serving input validated."""
    import mlflow.pytorch

    import search.mlflow_model as mm

    exp_id = client.get_run(run_id).info.experiment_id
    with mm.tracking_uri(client.tracking_uri):
        logged = client.create_logged_model(exp_id, name="model", source_run_id=run_id)
        mlflow.pytorch.log_model(model, name="model", run_id=run_id, model_id=logged.model_id,
                                 serialization_format="pt2", input_example=example)


def _time(client, exp_id: str, model, example, defaults: bool) -> float:
    import search.mlflow_model as mm

    run_id = client.create_run(exp_id).info.run_id
    t0 = time.perf_counter()
    if defaults:
        _mlflow_defaults(client, run_id, model, example)
    else:
        mm.log_pt2_model(client, run_id, model, example, {"accuracy": 0.9}, validate=False)
    seconds = time.perf_counter() - t0
    client.set_terminated(run_id)
    return seconds


def vs_mlflow_defaults(args) -> None:
    import torch
    from mlflow.tracking import MlflowClient

    from trainables.models import create_model

    model = create_model("resnet20", 10, in_channels=1).eval()  # digits: 1x8x8 images
    example = torch.randn(4, 1, 8, 8).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
        exp_id = client.create_experiment("bench", artifact_location=f"file://{tmp}/art")
        times: dict[str, list[float]] = {"prunetune": [], "mlflow defaults": []}
        for i in range(args.repeats + 1):  # interleaved; the first round is warm-up
            for kind in times:
                seconds = _time(client, exp_id, model, example, kind == "mlflow defaults")
                if i:
                    times[kind].append(seconds)
    print(f"pt2 MLflow model of a digits ResNet-20, {args.repeats} repeats, {args.threads} thread(s):")
    for kind, ts in times.items():
        print(f"  {kind:<16} min {min(ts):6.2f} s  median {statistics.median(ts):6.2f} s  max {max(ts):6.2f} s")
    ratio = statistics.median(times["mlflow defaults"]) / statistics.median(times["prunetune"])
    print(f"  median ratio (mlflow defaults / prunetune): {ratio:.1f}x")


# --- --parts: CPU seconds per part of the driver's model job --------------------------------------

#: (module or class path, attribute, part). Each is looked up where its caller finds it.
PARTS = [
    ("torch.export", "export", "torch.export (tracing)"),
    ("torch.export", "save", "pt2 save (torch.export.save)"),
    ("mlflow.pytorch", "_save_example", "input example + signature"),
    ("mlflow.pytorch", "_infer_signature_from_input_example", "input example + signature"),
    ("mlflow.models.utils", "_validate_serving_input", "validate_serving_input"),
    ("mlflow.pytorch", "_process_pip_requirements", "requirements, MLmodel, env yaml files"),
    ("mlflow.pytorch._PythonEnv", "current", "requirements, MLmodel, env yaml files"),
    ("mlflow.pytorch._PythonEnv", "to_yaml", "requirements, MLmodel, env yaml files"),
    ("mlflow.models.model.Model", "save", "requirements, MLmodel, env yaml files"),
    ("yaml", "safe_dump", "requirements, MLmodel, env yaml files"),
    ("search.mlflow_model", "pip_requirements", "requirements, MLmodel, env yaml files"),
    ("mlflow.tracking.MlflowClient", "create_logged_model", "LoggedModel create/get/finalize, run output"),
    ("mlflow.tracking.MlflowClient", "get_logged_model", "LoggedModel create/get/finalize, run output"),
    ("mlflow.tracking.MlflowClient", "log_outputs", "LoggedModel create/get/finalize, run output"),
    ("mlflow.tracking.fluent", "finalize_logged_model", "LoggedModel create/get/finalize, run output"),
    ("mlflow.tracking.MlflowClient", "get_run", "run queries (get_run, metric histories)"),
    ("mlflow.tracking.MlflowClient", "get_metric_history", "run queries (get_run, metric histories)"),
    ("mlflow.tracking.MlflowClient", "log_batch", "run queries (get_run, metric histories)"),
    ("mlflow.tracking.MlflowClient", "log_model_artifacts", "pt2 model files into the store"),
    ("mlflow.tracking.MlflowClient", "log_artifacts", "weights + spec artifacts"),
    ("ray.tune.Checkpoint", "to_directory", "checkpoint copy"),
    ("trainables.model_io", "load_model", "model rebuilt from weights + spec"),
    ("search.tracking", "open_client", "client, pending tag"),
    ("mlflow.tracking.MlflowClient", "delete_tag", "client, pending tag"),
]
MODELS = {"resnet20": ("resnet20", (1, 8, 8)), "resnet56": ("resnet56", (3, 32, 32))}


def _resolve(path: str):
    import importlib

    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def _instrument(totals: dict[str, float]) -> None:
    """Wrap every function of PARTS: its exclusive thread CPU time is added to ``totals[part]``."""
    stack: list[float] = []  # CPU time of the parts called inside each open part

    def wrap(fn, part):
        def timed(*args, **kwargs):
            t0 = time.thread_time()
            stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                inclusive, inner = time.thread_time() - t0, stack.pop()
                totals[part] = totals.get(part, 0.0) + inclusive - inner
                if stack:
                    stack[-1] += inclusive
        return timed

    gc_start: list[float] = []

    def gc_timer(phase, info):  # the collector's own time, whichever part it interrupted
        if phase == "start":
            gc_start[:] = [time.thread_time()]
        elif gc_start:
            totals_gc = totals.setdefault("gc", 0.0)
            totals["gc"] = totals_gc + time.thread_time() - gc_start.pop()

    gc.callbacks.append(gc_timer)
    for path, attr, part in PARTS:
        owner = _resolve(path)
        if hasattr(owner, attr):  # absent in some MLflow/torch releases
            setattr(owner, attr, wrap(getattr(owner, attr), part))


def _pruned_checkpoint(name: str, shape, directory) -> None:
    from methods.base import PruneContext
    from methods.registry import create_method
    from trainables.model_io import model_spec, save_model
    from trainables.models import create_model

    model = create_model(name, 10, in_channels=shape[0]).eval()
    model = create_method("l1_norm", prune_ratio=0.5).prune(model, PruneContext(shape)).eval()
    save_model(model, os.path.join(directory, "model"), model_spec(model, name, 10, in_channels=shape[0]))


def parts_worker(model_key: str, repeats: int) -> dict:
    """One process: ``repeats`` + 1 model jobs of the driver; per-part CPU of each but the first."""
    import torch
    from mlflow.entities import Metric
    from ray import tune

    from search.store import open_client
    from search.tracking import LOGGED_METRICS, MODEL_PENDING_TAG, MLflowTrialLogger, open_parent_run

    torch.set_num_threads(1)
    name, shape = MODELS[model_key]
    totals: dict[str, float] = {}
    _instrument(totals)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        _pruned_checkpoint(name, shape, os.path.join(tmp, "ckpt"))
        client = open_client(f"sqlite:///{tmp}/mlflow.db")
        parent = open_parent_run(client, "bench", None, {}, {})
        logger = MLflowTrialLogger(client.tracking_uri, parent, example=torch.randn(4, *shape).numpy())
        exp_id = client.get_run(parent).info.experiment_id
        result = {"accuracy": 0.9, "test_accuracy": 0.9, "macs": 1e6, "params": 1e4, "latency_ratio": 0.7}
        for i in range(repeats + 1):
            run_id = client.create_run(exp_id, run_name=f"l1_norm-t{i}").info.run_id
            now = int(time.time() * 1000)  # a trial's history: 20 epochs of its metrics
            client.log_batch(run_id, metrics=[Metric(k, 0.5, now, e) for e in range(1, 21) for k in LOGGED_METRICS[:8]])
            client.set_tag(run_id, MODEL_PENDING_TAG, "true")
            client.set_terminated(run_id)
            totals.clear()
            t0 = time.thread_time()
            logger._log_model_job(run_id, f"t{i}", "l1_norm", tune.Checkpoint.from_directory(os.path.join(tmp, "ckpt")),
                                  result)
            total = time.thread_time() - t0
            if i:
                collected = totals.pop("gc", 0.0)  # inside the parts' times already
                rows.append({**totals, "rest": total - sum(totals.values()), "total": total,
                             "of which garbage collection": collected})
    return {"rows": rows}


def _run_worker(checkout: str | None, model_key: str, repeats: int) -> list[dict]:
    env = dict(os.environ)
    root = checkout or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.path.abspath(root)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--parts-worker", model_key, str(repeats)],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"worker failed ({root}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["rows"]


def _table(label: str, rows: list[dict]) -> None:
    last = ["rest", "total", "of which garbage collection"]
    keys = sorted({k for r in rows for k in r if k not in last},
                  key=lambda k: -statistics.median(r.get(k, 0.0) for r in rows)) + last
    print(f"  {label}: CPU s per trial, min / median / max over {len(rows)} trials")
    for k in keys:
        v = [r.get(k, 0.0) for r in rows]
        print(f"    {k:<48} {min(v):6.3f} {statistics.median(v):6.3f} {max(v):6.3f}")


def parts(args) -> None:
    arms = {"this checkout": None, **({f"{args.compare_with}": args.compare_with} if args.compare_with else {})}
    print(f"load average before: {os.getloadavg()}")
    for model_key in args.models:
        rows: dict[str, list[dict]] = {arm: [] for arm in arms}
        for _ in range(args.rounds):
            for arm, checkout in arms.items():
                rows[arm] += _run_worker(checkout, model_key, args.repeats)
        name, shape = MODELS[model_key]
        print(f"\n{name} (l1_norm 0.5), input {'x'.join(map(str, shape))}:")
        for arm, r in rows.items():
            _table(arm, r)
        if args.compare_with:
            mine, other = (statistics.median(r["total"] for r in rows[a]) for a in arms)
            print(f"  median total: this {mine:.3f} s, {args.compare_with} {other:.3f} s, ratio {mine / other:.2f}")
    print(f"\nload average after: {os.getloadavg()}")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--parts-worker":
        print(json.dumps(parts_worker(sys.argv[2], int(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parts", action="store_true", help="CPU seconds per part of the driver's model job")
    parser.add_argument("--rounds", type=int, default=1, help="--parts: fresh processes per checkout and model")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--compare-with", metavar="DIR", help="--parts: another checkout, run in alternation")
    args = parser.parse_args()
    if args.parts:
        parts(args)
        return
    import torch

    torch.set_num_threads(args.threads)
    vs_mlflow_defaults(args)


if __name__ == "__main__":
    main()
