"""What logging a trial's model as an MLflow model costs the sweep's driver.

Every finished trial's pruned model is logged on the driver (only the driver writes to MLflow) as a
pt2 MLflow model (``search.mlflow_model.log_pt2_model``: explicit ``pip_requirements``, serving-input
validation off). Side by side, in one process and one SQLite store, over ``--repeats`` models each:

* prunetune: ``log_pt2_model(..., validate=False)`` as ``search.tracking`` calls it;
* MLflow's defaults: ``mlflow.pytorch.log_model`` (pt2, same input example) with the requirements
  inferred (MLflow imports the model in a subprocess to find them) and the serving input validated
  (the exported program is loaded back and run on the example).

A ResNet-20 for digits (8x8, 10 classes; the quickstart's) stands in for a trial's pruned model; the
first call of each kind is warm-up and not counted.

    python benchmarks/bench_trial_model_logging.py [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from mlflow.tracking import MlflowClient

import search.mlflow_model as mm
from trainables.models import create_model


def _mlflow_defaults(client, run_id: str, model, example) -> None:
    """``log_model`` as MLflow's docs call it: requirements inferred, serving input validated."""
    import mlflow.pytorch

    exp_id = client.get_run(run_id).info.experiment_id
    with mm.tracking_uri(client.tracking_uri):
        logged = client.create_logged_model(exp_id, name="model", source_run_id=run_id)
        mlflow.pytorch.log_model(model, name="model", run_id=run_id, model_id=logged.model_id,
                                 serialization_format="pt2", input_example=example)


def _time(client, exp_id: str, model, example, defaults: bool) -> float:
    run_id = client.create_run(exp_id).info.run_id
    t0 = time.perf_counter()
    if defaults:
        _mlflow_defaults(client, run_id, model, example)
    else:
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


if __name__ == "__main__":
    main()
