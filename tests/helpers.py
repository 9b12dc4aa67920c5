"""Small helpers shared by the test modules (pytest puts this folder on sys.path)."""
import torch
from torch import nn


def randomise_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every batch norm non-trivial statistics and affine parameters; return it in eval mode,
    so surgery equivalence tests compare more than identity-like layers."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()
