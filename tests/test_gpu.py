"""The GPU path: bf16 autocast and channels_last in the training loop, every method's trial end to
end on CUDA, a GPU checkpoint resumed on a CPU-only node, and lossless surgery on CUDA tensors.

Skipped where CUDA is absent (CI has no GPU); run on a GPU machine with
``python -m pytest tests/test_gpu.py``.
"""
import math

import pytest
import torch

from helpers import randomise_bn
from methods import PruneContext, create_method, get_method_class, list_methods
from methods.graph import DependencyGraph
from methods.surgery import prune_group
from trainables.base_model import ensure_base_model
from trainables.data import load, make_loader
from trainables.models import create_model
from trainables.settings import TrainSettings, TrialSettings
from trainables.train import train_epoch
from trainables.trial import run_trial

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")

# Small, fast hyperparameters for each method's phase (a full trial per method stays a few seconds).
QUICK = {"phase_epochs": 1, "samples_per_layer": 64, "finetune_steps": 2}


def _settings(tmp_path, use_gpu):
    return TrialSettings(model="resnet20", dataset="digits", seed=0, use_gpu=use_gpu,
                         base=TrainSettings(epochs=3, lr=0.1), finetune=TrainSettings(epochs=2, lr=0.01),
                         base_dir=str(tmp_path / "base_models"))


def _hparams(name):
    declared = {hp.name for hp in get_method_class(name).hyperparameters}
    return {k: v for k, v in QUICK.items() if k in declared}


def test_training_step_runs_bf16_autocast_on_channels_last_inputs():
    model = create_model("resnet20", 10, in_channels=1).to(CUDA).to(memory_format=torch.channels_last)
    seen = {}

    def hook(module, inputs, output):
        seen.setdefault("in_channels_last", inputs[0].is_contiguous(memory_format=torch.channels_last))
        seen.setdefault("out_dtype", output.dtype)

    model.conv1.register_forward_hook(hook)
    loader = make_loader(load("digits").train, 64, shuffle=True, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    stats = train_epoch(model, loader, optimizer, device=CUDA, max_steps=5)
    assert seen == {"in_channels_last": True, "out_dtype": torch.bfloat16}
    assert math.isfinite(stats.loss) and stats.steps == 5
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


@pytest.mark.parametrize("name", list_methods())
def test_trial_on_gpu_resumes_on_a_cpu_node(name, tmp_path):
    """Every method's whole trial on CUDA; then the trial, resumed from its first checkpoint on a
    node without a GPU, ends with the same number of epochs (a lost GPU node costs no trial)."""
    gpu = _settings(tmp_path, use_gpu=True)
    _, base = ensure_base_model(gpu)
    assert base["accuracy"] > 0.5, base  # the dense base really trained on the GPU
    epochs, checkpoints = [], []

    def report(metrics, save):
        epochs.append(metrics)
        target = tmp_path / f"ckpt{len(epochs)}"
        save(target)
        checkpoints.append(target)

    final = run_trial(gpu, name, _hparams(name), report)
    assert "nonfinite" not in final, final
    assert math.isfinite(final["accuracy"]) and final["accuracy"] > 0.1
    assert 0 < final["macs"] <= final["dense_macs"]
    total = len(epochs)

    resumed = []
    cpu = _settings(tmp_path, use_gpu=False)
    last = run_trial(cpu, name, _hparams(name), lambda m, save: resumed.append(m), resume_from=checkpoints[0])
    assert [m["epoch"] for m in resumed] == list(range(2, total + 1))
    if not get_method_class(name).dynamic:  # a dynamic method's MACs depend on its gates' inputs
        assert last["macs"] == pytest.approx(final["macs"], rel=1e-6)


def test_lossless_surgery_on_cuda_tensors():
    """Removing channels whose batch norm emits zero changes nothing, on CUDA tensors too."""
    model = randomise_bn(create_model("resnet20", 10, in_channels=1)).to(CUDA)
    model.layer1[1].bn1.weight.data[[2, 5]] = 0
    model.layer1[1].bn1.bias.data[[2, 5]] = 0
    x = torch.randn(16, 1, 8, 8, device=CUDA)
    with torch.no_grad():
        before = model(x)
    graph = DependencyGraph(model)
    prune_group(graph, graph.group_of("layer1.1.conv1"), [c for c in range(16) if c not in (2, 5)])
    assert model.layer1[1].conv1.out_channels == 14
    assert all(p.is_cuda for p in model.parameters())
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_pruning_a_cuda_model_gives_a_cuda_model():
    model = create_model("resnet20", 10, in_channels=1).to(CUDA).eval()
    pruned = create_method("l1_norm", prune_ratio=0.5).prune(model, PruneContext((1, 8, 8), device=CUDA))
    assert all(p.is_cuda for p in pruned.parameters())
    with torch.no_grad():
        assert pruned(torch.randn(4, 1, 8, 8, device=CUDA)).shape == (4, 10)


def test_cuda_trial_times_its_latency_on_the_gpu(tmp_path):
    """A trial on CUDA measures the pruned and the dense model side by side on the GPU (channels_last,
    bf16 autocast), not on the CPU."""
    gpu = _settings(tmp_path, use_gpu=True)
    ensure_base_model(gpu)
    final = run_trial(gpu, "l1_norm", {"prune_ratio": 0.5}, lambda metrics, save: None)
    assert final["latency_device"] == "cuda"
    assert math.isfinite(final["latency_ratio"]) and final["latency_ratio"] > 0
    assert final["dense_latency_ms"] > 0
    assert final["latency_ratio"] == pytest.approx(final["latency_ms"] / final["dense_latency_ms"], rel=1e-12)


def test_device_resident_epoch_reads_the_device_only_at_its_checks():
    """Digits on the GPU (DeviceLoader): 15 training steps sync the host only for the epoch-end
    read-backs (non-finite check, loss, accuracy), never per step."""
    import warnings

    from trainables.device_data import DeviceLoader, trial_loader

    loader = trial_loader(load("digits").train, 64, shuffle=True, device=CUDA)
    assert isinstance(loader, DeviceLoader) and loader.images.is_cuda
    model = create_model("resnet20", 10, in_channels=1).to(CUDA).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_epoch(model, loader, opt, device=CUDA, max_steps=2)  # warm-up: lazy initialisations may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stats = train_epoch(model, loader, opt, device=CUDA, max_steps=15)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert stats.steps == 15 and math.isfinite(stats.loss)
    assert len(syncs) <= 3, syncs
