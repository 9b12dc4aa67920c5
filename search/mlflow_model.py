"""A pruned model as an MLflow model: ``mlflow.pytorch.log_model`` in the pickle-free ``pt2`` format
(``torch.export``: no prunetune class is needed to load it), with an input example and explicit
``pip_requirements``, as a LoggedModel of the run's own experiment that carries the trial's metrics
(as its parameters).

Used by the driver for every finished trial (so the UI's Register button works on any trial) and by
``prunetune promote`` for trials recorded before that. Only the driver writes to MLflow.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import time
from contextlib import contextmanager
from typing import Iterator, Mapping

from mlflow.tracking import MlflowClient

__all__ = ["pip_requirements", "tracking_uri", "log_pt2_model", "trial_model_id", "MODEL_METRICS", "MODEL_NAME"]

log = logging.getLogger(__name__)
MODEL_NAME = "model"
#: The trial metrics its LoggedModel carries as parameters (those the trial recorded).
MODEL_METRICS = ("accuracy", "test_accuracy", "macs", "params", "latency_ms", "dense_latency_ms", "latency_ratio")


def pip_requirements() -> list[str]:
    """What the pt2 model needs to load and run: torch (same release: pt2 archives are versioned)
    and mlflow. Explicit, because inferring them costs a subprocess that imports the model (~20x)."""
    import mlflow
    import numpy
    import torch

    torch_release = torch.__version__.split("+")[0]
    return [f"torch=={torch_release}", f"mlflow=={mlflow.__version__}", f"numpy=={numpy.__version__}"]


@contextmanager
def _no_stack_traces() -> Iterator[None]:
    """``torch.export`` without the Python stack trace of every graph node (``node.meta
    ["stack_trace"]``: for debugging a trace, never used to load or run the program): ~15% of a
    ResNet's tracing CPU and ~6% of its pt2 archive (benchmarks/RESULTS.md). torch's flag is
    process-wide; in the driver only the model-logging thread traces (``search.model_logs``)."""
    import torch.fx.config as fx_config

    if not hasattr(fx_config, "do_not_emit_stack_traces"):  # an older torch: always emitted
        yield
        return
    previous = fx_config.do_not_emit_stack_traces
    fx_config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        fx_config.do_not_emit_stack_traces = previous


@contextmanager
def _one_young_collection() -> Iterator[None]:
    """The block runs with Python's cyclic garbage collector off, then one young-generation
    collection frees its cyclic garbage. torch.export leaves tens of thousands of objects behind
    (~36,000 a ResNet-20), most in reference cycles (graph nodes), and with the collector on they set
    off full collections of the whole heap: ~25% of a ResNet-56's logging CPU (benchmarks/RESULTS.md).
    Process-wide, as the collector is; other threads' garbage waits for the block's end too."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect(0)


@contextmanager
def tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri`` for the block, then put back what was there."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    previous, env = getattr(utils, "_tracking_uri", None), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _model_params(metrics: Mapping[str, float] | None) -> dict[str, str]:
    return {k: f"{float(metrics[k]):.6g}" for k in MODEL_METRICS
            if isinstance((metrics or {}).get(k), (int, float)) and math.isfinite(float(metrics[k]))}


def log_pt2_model(client: MlflowClient, run_id: str, model, example, metrics: Mapping[str, float] | None = None,
                  registered_model_name: str | None = None, validate: bool = True, name: str = MODEL_NAME):
    """Log ``model`` (eval mode) as run ``run_id``'s pt2 model; return ``(ModelInfo, seconds)``.

    The LoggedModel is created in the run's experiment first (``log_model`` alone would put it in
    MLflow's *active* experiment), named ``name`` (a trial's: its run name), with the finite
    ``metrics`` among ``MODEL_METRICS`` as its parameters. Not as its metrics: MLflow stores a
    model's metrics as extra rows of its run's metric history, and a trial's history holds each
    epoch once."""
    import mlflow.pytorch

    exp_id = client.get_run(run_id).info.experiment_id
    with tracking_uri(client.tracking_uri), _no_stack_traces(), _one_young_collection():
        t0 = time.perf_counter()
        logged = client.create_logged_model(exp_id, name=name, source_run_id=run_id, params=_model_params(metrics))
        info = mlflow.pytorch.log_model(
            model.eval(), name=name, run_id=run_id, model_id=logged.model_id,
            serialization_format="pt2",  # torch.export program; `export_model=True` is its deprecated spelling
            input_example=example, pip_requirements=pip_requirements(),
            registered_model_name=registered_model_name, validate_serving_input=validate)
        seconds = time.perf_counter() - t0
    return info, seconds


def trial_model_id(client: MlflowClient, run_id: str) -> str | None:
    """The id of the READY pt2 LoggedModel that run ``run_id`` logged (the newest), or None."""
    exp_id = client.get_run(run_id).info.experiment_id
    found = client.search_logged_models([exp_id], filter_string=f"source_run_id = '{run_id}'", max_results=50)
    ready = [m for m in found if str(m.status).upper().endswith("READY")]
    return max(ready, key=lambda m: m.creation_timestamp).model_id if ready else None
