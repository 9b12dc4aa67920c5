"""The sweep: start or join Ray, open the MLflow parent run, make sure the dense base model exists
(trained once, on a worker), run Tune with the Pareto Optuna searcher, then record the front.

``run_sweep(config)`` starts a new sweep in ``storage_path/<name>-<timestamp>``;
``resume_sweep(dir)`` continues an interrupted one with the same parent run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import SweepConfig, config_from_dict

__all__ = ["run_sweep", "resume_sweep", "settings_from_config", "SweepResult", "STATE_FILE"]

log = logging.getLogger(__name__)
STATE_FILE = "prunetune_sweep.json"


@dataclass
class SweepResult:
    experiment_dir: Path
    parent_run_id: str
    finished: int
    failed: int
    hypervolume: float
    front: list = field(default_factory=list)
    base_metrics: dict[str, Any] = field(default_factory=dict)


def settings_from_config(cfg: SweepConfig):
    from trainables.settings import TrainSettings, TrialSettings

    def train(t):
        return TrainSettings(epochs=t.epochs, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                             batch_size=t.batch_size)

    return TrialSettings(
        model=cfg.model, dataset=cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
        image_size=cfg.image_size, model_kwargs=dict(cfg.model_kwargs), seed=cfg.seed,
        base=train(cfg.base), finetune=train(cfg.finetune), latency_batch_size=cfg.latency_batch_size,
        calibration_batches=cfg.calibration_batches, base_dir=os.path.join(cfg.storage_path, "base_models"),
        use_gpu=cfg.resources_per_trial.gpu > 0,
    )


def _init_ray(cfg: SweepConfig) -> bool:
    """Join ``cfg.address`` or start an embedded local Ray; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if cfg.address:
        log.info("joining Ray cluster at %s", cfg.address)
        ray.init(address=cfg.address, log_to_driver=False)
    else:
        # "local" always starts a fresh embedded node (a stale cluster file cannot redirect it).
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    return True


def _run(cfg: SweepConfig, exp_dir: Path, parent_run_id: str | None, restore: bool) -> SweepResult:
    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune

    from methods.cost import profile
    from trainables.base_model import build_model, ensure_base_model
    from trainables.workspace import load_data
    from trainables.tune_trainable import trial_fn

    from .fronts import record_front
    from .searcher import ParetoOptunaSearch, make_sampler
    from .space import make_space
    from .tracking import MLflowTrialLogger, child_runs, open_parent_run

    client = MlflowClient(cfg.tracking_uri)
    parent = open_parent_run(client, cfg.name, parent_run_id, _flatten(cfg.to_dict()),
                             {"prunetune.experiment_dir": str(exp_dir)})
    state = {"parent_run_id": parent, "tracking_uri": cfg.tracking_uri, "config": cfg.to_dict()}
    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / STATE_FILE).write_text(json.dumps(state, indent=1))
    log.info("MLflow parent run %s in experiment %r (%s)", parent, cfg.name, cfg.tracking_uri)

    started = _init_ray(cfg)
    try:
        settings = settings_from_config(cfg)
        res = cfg.resources_per_trial
        log.info("dense base model: training or reusing %s on %s", cfg.model, cfg.dataset)
        t0 = time.perf_counter()
        if cfg.address:  # on a cluster: train where the trials' resources (GPUs) are
            base_task = ray.remote(num_cpus=res.cpu, num_gpus=math.ceil(res.gpu))(ensure_base_model)
            _, base_metrics = ray.get(base_task.remote(settings))
        else:  # embedded: this process already has torch loaded; a new worker would import it again
            _, base_metrics = ensure_base_model(settings)
        log.info("dense base ready in %.1fs: val accuracy %.4f", time.perf_counter() - t0, base_metrics["accuracy"])
        logged = client.get_run(parent).data.metrics
        for key, value in (("base_accuracy", base_metrics["accuracy"]),
                           ("base_test_accuracy", base_metrics["test_accuracy"])):
            if key not in logged:  # a resumed sweep logged them already
                client.log_metric(parent, key, value)

        trainable = tune.with_resources(tune.with_parameters(trial_fn, settings=settings),
                                        {"cpu": res.cpu, "gpu": res.gpu})
        tracker = MLflowTrialLogger(cfg.tracking_uri, parent)
        if restore and not tune.Tuner.can_restore(str(exp_dir)):
            log.warning("%s holds no Tune state yet (the driver stopped before Tune started): starting Tune afresh",
                        exp_dir)
            restore = False
        if restore:
            # Tuner.restore brings back the searcher (the Optuna study, pickled with its trials: a trial
            # that was running keeps its Tune trial id and so its Optuna trial), the callbacks (this
            # sweep's MLflowTrialLogger, pickled in tuner.pkl) and every trial: finished ones are kept,
            # unfinished ones continue from their last checkpoint. Errored trials stay errored: they
            # were told to Optuna as FAIL and recorded FAILED, and used up their retries already.
            tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            searcher = ParetoOptunaSearch(make_space(cfg.search_space()), make_sampler(cfg.sampler, cfg.seed), cfg.seed)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=searcher, num_samples=cfg.num_trials,
                                            max_concurrent_trials=cfg.max_concurrent_trials, reuse_actors=True),
                run_config=tune.RunConfig(
                    name=exp_dir.name, storage_path=str(exp_dir.parent),
                    failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                    callbacks=[tracker], verbose=1),
            )
        tuner.fit()
        failed = sum(1 for r in child_runs(client, parent) if r.info.status == "FAILED")
        dense_macs = profile(build_model(settings), tuple(load_data(settings).input_shape)).macs
        summary = record_front(client, parent, exp_dir / "front", dense_macs=dense_macs)
        client.set_terminated(parent, status="FINISHED")
        log.info("sweep done: %d finished, %d failed; front of %d, hypervolume %.4g",
                 summary["trials"], failed, len(summary["front"]), summary["hypervolume"])
        return SweepResult(exp_dir, parent, summary["trials"], failed, summary["hypervolume"], summary["front"],
                           base_metrics)
    except BaseException:
        client.set_terminated(parent, status="KILLED")
        raise
    finally:
        if started:
            ray.shutdown()


def run_sweep(cfg: SweepConfig) -> SweepResult:
    from .preflight import preflight

    preflight(cfg)  # environment problems are one clear line before Ray or MLflow start
    exp_dir = Path(cfg.storage_path) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return _run(cfg, exp_dir.resolve() if "://" not in cfg.storage_path else exp_dir, None, restore=False)


def resume_sweep(experiment_dir: str | os.PathLike) -> SweepResult:
    exp_dir = Path(experiment_dir)
    state_path = exp_dir / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{exp_dir} is not a prunetune sweep directory ({STATE_FILE} missing)")
    state = json.loads(state_path.read_text())
    cfg = config_from_dict(state["config"])
    return _run(cfg, exp_dir.resolve(), state["parent_run_id"], restore=True)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
