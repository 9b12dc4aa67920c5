"""What logging a trial's model as an MLflow model costs the sweep's driver.

Every finished trial's pruned model is logged on the driver (only the driver writes to MLflow) as a
pt2 MLflow model (``search.mlflow_model.log_pt2_model``: explicit ``pip_requirements``, serving-input
validation off). Side by side, in one process and one SQLite store, over ``--repeats`` models each:

* prunetune: ``log_pt2_model(..., validate=False)`` as ``search.tracking`` calls it;
* MLflow's defaults: the same call with the requirements inferred (``pip_requirements=None``: MLflow
  imports the model in a subprocess to find them) and the serving input validated (the exported
  program is loaded back and run on the example).

A ResNet-20 for digits (8x8, 10 classes; the quickstart's) stands in for a trial's pruned model; the
first call of each kind is warm-up and not counted.

    python benchmarks/bench_trial_model_logging.py [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from unittest import mock

import torch
from mlflow.tracking import MlflowClient

import search.mlflow_model as mm
from trainables.models import create_model


def _time(client, exp_id: str, model, example, defaults: bool) -> float:
    run_id = client.create_run(exp_id).info.run_id
    if defaults:
        with mock.patch.object(mm, "pip_requirements", lambda: None):  # MLflow infers them
            t0 = time.perf_counter()
            mm.log_pt2_model(client, run_id, model, example, {"accuracy": 0.9}, validate=True)
    else:
        t0 = time.perf_counter()
        mm.log_pt2_model(client, run_id, model, example, {"accuracy": 0.9}, validate=False)
    seconds = time.perf_counter() - t0
    client.set_terminated(run_id)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = create_model("resnet20", 10, in_channels=1).eval() if _takes_in_channels() else create_model("resnet20", 10)
    example = torch.randn(4, *_input_shape(model)).numpy()
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


def _takes_in_channels() -> bool:
    import inspect

    from trainables import models

    return "in_channels" in inspect.signature(models.create_model).parameters


def _input_shape(model) -> tuple[int, int, int]:
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    return (first.in_channels, 8, 8)


if __name__ == "__main__":
    main()
