"""search.space: a hyperparameter several methods declare alike is ONE Optuna parameter, so the
sampler learns the front's axis from every trial; the trial config still carries "<method>.<name>"."""
from __future__ import annotations

import optuna

from search.config import load_config
from search.space import make_space, shared_names
from trainables.tune_trainable import method_hparams


def _space(*overrides):
    return load_config("configs/quickstart.yaml", list(overrides)).search_space()


def test_quickstart_shares_the_front_axis_and_keeps_method_specific_names():
    space = _space()
    shared = shared_names(space)
    # every method declares prune_ratio with the quickstart's one range
    assert "prune_ratio" in shared and "phase_epochs" in shared
    # fixed by the quickstart: constants, not parameters
    assert "scope" not in shared and "allocation" not in shared and "round_to" not in shared
    assert all(space[m]["allocation"].choices == ("global",) for m in space if m not in ("ista", "manidp"))
    keys = make_space(space).distributions("thinet")
    assert {"method", "prune_ratio", "thinet.samples_per_layer", "thinet.finetune_steps"} <= set(keys)
    assert "allocation" in shared_names(_space("space.allocation=[uniform, global]"))
    assert "thinet.prune_ratio" not in keys


def test_a_range_narrowed_for_one_method_is_that_methods_own_parameter():
    space = _space("space.thinet.prune_ratio=[0.9, 0.98]")
    assert "prune_ratio" in shared_names(space)  # the other seven still share theirs
    keys = make_space(space)
    assert "thinet.prune_ratio" in keys.distributions("thinet")
    assert "prune_ratio" in keys.distributions("l1_norm")


def test_trials_of_every_method_sample_one_prune_ratio_and_the_config_names_it_per_method():
    space = make_space(_space("methods=[l1_norm, thinet, slimming]"))
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    methods = set()
    for _ in range(24):
        trial = study.ask()
        constants = space(trial)
        config = {**trial.params, **constants}  # what Ray's OptunaSearch hands the trial
        method, hparams = method_hparams(config)
        methods.add(method)
        assert hparams["prune_ratio"] == trial.params["prune_ratio"]
        assert set(hparams) == set(space.space[method])  # every declared hyperparameter reaches the method
        study.tell(trial, [0.9, 1.0 - hparams["prune_ratio"]])
    assert methods == {"l1_norm", "thinet", "slimming"}
    # Optuna sees one parameter across methods: its history spans every trial
    assert sum("prune_ratio" in t.params for t in study.trials) == 24
