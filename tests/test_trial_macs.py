"""A trial's ``macs`` each epoch (issue 12: a static method's pruned model is counted once, since
its MACs are a function of its layer shapes, fixed after the cut). Every epoch still reports what a
fresh count of that epoch's checkpointed model gives; a method that measures its own MACs
(ManiDP: gates and data decide them) is still measured every epoch."""
from __future__ import annotations

from pathlib import Path

import pytest

import trainables.trial as trial_module
from helpers import small_trial_settings
from methods.cost import profile
from trainables.model_io import load_model
from trainables.trial import MODEL_DIR, run_trial

EPOCHS = 3


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return small_trial_settings(tmp_path_factory.mktemp("base_models"), seed=2, finetune_epochs=EPOCHS)


def _run_counting(settings, method, hparams, root: Path, monkeypatch) -> tuple[list[dict], int]:
    counted = []
    real = trial_module._macs

    def counting(method_, model, *args):
        counted.append(args[-2])  # pruned
        return real(method_, model, *args)

    monkeypatch.setattr(trial_module, "_macs", counting)
    epochs = []

    def report(metrics, save):
        epochs.append(dict(metrics))
        save(root / f"epoch{metrics['epoch']}")

    run_trial(settings, method, hparams, report)
    return epochs, sum(counted)


def test_a_static_methods_macs_are_counted_once_and_are_each_epochs_model(settings, tmp_path, monkeypatch):
    epochs, pruned_counts = _run_counting(settings, "l1_norm", {"prune_ratio": 0.5}, tmp_path, monkeypatch)
    assert [m["epoch"] for m in epochs] == list(range(1, EPOCHS + 1))
    assert pruned_counts == 1
    for m in epochs:
        model, _ = load_model(tmp_path / f"epoch{m['epoch']}" / MODEL_DIR)
        assert m["macs"] == float(profile(model, (1, 8, 8)).macs)


def test_a_method_measuring_its_own_macs_is_measured_every_epoch(settings, tmp_path, monkeypatch):
    epochs, pruned_counts = _run_counting(settings, "manidp", {"phase_epochs": 1, "prune_ratio": 0.5}, tmp_path,
                                          monkeypatch)
    # The cut ends epoch 1 (the phase), whose metrics are of the pruned model: every epoch counts.
    assert pruned_counts == len(epochs) == 1 + EPOCHS
