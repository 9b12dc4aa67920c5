"""search.sampler: TPE's start-up is a design, every method once and the MACs axis spread evenly,
seeded (the same sweep seed gives the same design) and picklable (Tune saves the searcher)."""
from __future__ import annotations

import math
import pickle

import optuna

from search.config import load_config
from search.sampler import DesignedStartTPE
from search.searcher import make_sampler
from search.space import make_space


def _ask(sampler, space, n):
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    trials = []
    for i in range(n):
        trial = study.ask()
        space(trial)
        trials.append(trial)
        study.tell(trial, [0.5 + 0.01 * i, 1.0 - trial.params["prune_ratio"]])
    return study, trials


def test_startup_covers_every_method_once_and_every_prune_ratio_bin_once():
    cfg = load_config("configs/quickstart.yaml", [])
    space = make_space(cfg.search_space())
    sampler = make_sampler("tpe", 3, cfg.methods)
    assert isinstance(sampler, DesignedStartTPE)
    study, trials = _ask(sampler, space, 12)
    first = trials[:8]
    assert sorted(t.params["method"] for t in first) == sorted(cfg.methods)
    low, high = space.space["thinet"]["prune_ratio"].low, space.space["thinet"]["prune_ratio"].high

    def log_kept_bin(ratio):  # the bins are equal in log(MACs kept): each halving of the cost alike
        return int(math.log((1 - ratio) / (1 - low)) / math.log((1 - high) / (1 - low)) * 8)

    assert sorted(log_kept_bin(t.params["prune_ratio"]) for t in first) == list(range(8))
    # [0.5, 0.98]: half the design below 10% of the dense MACs (equal bins in prune_ratio put one there).
    assert sum(1 - t.params["prune_ratio"] < 0.1 for t in first) == 4
    # After the start-up TPE models the trials: its suggestions stay inside the declared ranges.
    assert all(low <= t.params["prune_ratio"] <= high for t in trials[8:])


def test_the_design_follows_the_seed_and_survives_pickling():
    cfg = load_config("configs/quickstart.yaml", [])
    space = make_space(cfg.search_space())

    def design(sampler):
        return [(t.params["method"], t.params["prune_ratio"]) for t in _ask(sampler, space, 8)[1]]

    assert design(make_sampler("tpe", 5, cfg.methods)) == design(make_sampler("tpe", 5, cfg.methods))
    assert design(make_sampler("tpe", 5, cfg.methods)) != design(make_sampler("tpe", 6, cfg.methods))
    restored = pickle.loads(pickle.dumps(make_sampler("tpe", 5, cfg.methods)))
    assert design(restored) == design(make_sampler("tpe", 5, cfg.methods))


def test_more_methods_than_eight_get_one_startup_trial_each():
    sampler = DesignedStartTPE([f"m{i}" for i in range(11)], seed=0)
    assert sampler._n_startup_trials == 11
