import os

# Same settings for every Ray process the tests start (see README: Ray).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest
import torch

# The test models are tiny (8x8 digits): one thread avoids threading overhead and contention with
# the Ray workers some tests start, on a 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray node for the whole test session, stopped at the end."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


TINY_SWEEP = [
    "methods=[l1_norm, random]", "num_trials=4", "max_concurrent_trials=2", "base.epochs=3",
    "finetune.epochs=1", "space.prune_ratio=[0.2, 0.8]", "sampler=random",
    "early_stopping.type=none",  # every trial runs its whole budget (what the quickstart does too)
]


@pytest.fixture(scope="session")
def tiny_sweep(ray_local, tmp_path_factory):
    """A real sweep (Ray Tune + Optuna + MLflow on SQLite) of 4 digits trials over two methods.

    Returns ``(config, SweepResult)``; shared by the sweep, fronts and promotion tests.
    """
    from search.config import load_config
    from search.sweep import run_sweep

    root = tmp_path_factory.mktemp("sweep")
    cfg = load_config("configs/quickstart.yaml", TINY_SWEEP + [
        f"tracking_uri=sqlite:///{root}/mlflow.db", f"storage_path={root}/ray_results", "name=tiny"])
    return cfg, run_sweep(cfg)
