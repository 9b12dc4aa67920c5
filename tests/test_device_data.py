"""The device-resident input path: the same batches as the DataLoader path (digits; CIFAR read from
files in the official on-disk format), torchvision-equivalent crops and flips, seeded order, and the
trial's reproducibility; the training loop reads the device once per epoch."""
import numpy as np
import pytest
import torch

from trainables.data import load, make_loader
from trainables.device_data import DeviceArrays, DeviceLoader, trial_loader
from trainables.models import create_model
from trainables.train import NonFiniteLossError, train_epoch

from test_data import cifar10_dir  # noqa: F401  (the fixture: CIFAR-10 files in the official format)


def _all(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_digits_batches_equal_the_dataloader_ones():
    data = load("digits")
    loader = trial_loader(data.val, 64, shuffle=False)
    assert isinstance(loader, DeviceLoader) and len(loader) == len(make_loader(data.val, 64, shuffle=False))
    x, y = _all(loader)
    x0, y0 = _all(make_loader(data.val, 64, shuffle=False))
    assert torch.equal(x, x0) and torch.equal(y, y0)


def test_shuffle_is_seeded_and_a_permutation():
    data = load("digits")
    a = trial_loader(data.train, 50, shuffle=True, seed=3)
    b = trial_loader(data.train, 50, shuffle=True, seed=3)
    ya, yb = _all(a)[1], _all(b)[1]
    assert torch.equal(ya, yb)
    a.generator.manual_seed(4)  # what the trial does before every epoch
    assert not torch.equal(_all(a)[1], ya)
    assert sorted(_all(a)[1].tolist()) == sorted(data.train.targets.tolist())


def test_cifar_eval_split_equals_torchvision_transform(cifar10_dir):  # noqa: F811
    data = load("cifar10", data_dir=cifar10_dir)
    loader = trial_loader(data.test, 7, shuffle=False)
    assert isinstance(loader, DeviceLoader)
    x, y = _all(loader)
    x0, y0 = _all(make_loader(data.test, 7, shuffle=False))
    assert torch.equal(y, y0)
    assert torch.allclose(x, x0, atol=1e-6)


def test_crop_and_flip_match_torchvision_for_the_drawn_offsets():
    """Every augmented image is some 4-pixel-padded 32x32 crop (padding = the image of black, i.e.
    -mean/std after normalisation), possibly flipped, of its source; offsets and flips vary."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    arrays = DeviceArrays(images, torch.arange(16), mean, std, pad_crop=4, flip=True)
    plain = DeviceLoader(DeviceArrays(images, torch.arange(16), mean, std), 16, shuffle=False)
    x = next(iter(DeviceLoader(arrays, 16, shuffle=False, seed=1)))[0]
    ref = next(iter(plain))[0]
    fill = (-torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1)
    padded = torch.nn.functional.pad(ref - fill, (4, 4, 4, 4)) + fill
    found = set()
    for i in range(16):
        crops = {(dy, dx): padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)}
        hits = [(dy, dx, f) for (dy, dx), c in crops.items() for f in (False, True)
                if torch.allclose(c.flip(-1) if f else c, x[i], atol=1e-6)]
        assert hits, i
        found.add(hits[0])
    assert len(found) > 8 and {f for _, _, f in found} == {False, True}


def test_training_epoch_is_reproducible_on_the_device_path():
    data = load("digits")

    def run():
        torch.manual_seed(0)
        model = create_model("resnet20", 10, in_channels=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        loader = trial_loader(data.train, 64, shuffle=True, seed=5)
        stats = train_epoch(model, loader, opt, device=torch.device("cpu"), max_steps=6)
        return stats.loss, [p.detach().clone() for p in model.parameters()]

    (la, pa), (lb, pb) = run(), run()
    assert la == lb and all(torch.equal(a, b) for a, b in zip(pa, pb))


def test_nonfinite_loss_is_raised_with_its_value():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight.fill_(float("inf"))
    loader = DeviceLoader(DeviceArrays(torch.randn(40, 1, 8, 8), torch.zeros(40, dtype=torch.long)), 8, shuffle=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLossError, match=r"training loss became (nan|inf) at or before step 5"):
        train_epoch(model, loader, opt, device=torch.device("cpu"))
