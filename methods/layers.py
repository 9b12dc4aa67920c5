"""Building blocks that pruning must understand, shared by the models and the surgery.

Pure PyTorch: the CIFAR ResNets in ``trainables.models`` use ``ChannelPadShortcut`` for He et al.'s
option-A shortcut, and ``methods.graph`` knows how to cut it.
"""
from __future__ import annotations

import torch
from torch import nn
from .errors import ArgumentError

__all__ = ["ChannelPadShortcut"]


class ChannelPadShortcut(nn.Module):
    """Parameter-free shortcut: subsample spatially, then place input channels into a wider output.

    ``source[j]`` is the input channel copied to output channel ``j``, or ``-1`` for a zero channel.
    He et al.'s option A (zero-pad half the new channels on each side) is the initial ``source``;
    after pruning either side the map simply shrinks, so the shortcut never couples the channel
    groups before and after it.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        if out_channels < in_channels:
            raise ArgumentError(f"out_channels ({out_channels}) must be >= in_channels ({in_channels})")
        pad = (out_channels - in_channels) // 2
        source = torch.full((out_channels,), -1, dtype=torch.long)
        source[pad : pad + in_channels] = torch.arange(in_channels)
        self.in_channels = in_channels
        self.stride = stride
        self.register_buffer("source", source)

    @property
    def out_channels(self) -> int:
        return int(self.source.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # Index in_channels of the padded input is an all-zero channel.
        zero = torch.zeros_like(x[:, :1])
        padded = torch.cat([x, zero], dim=1)
        index = torch.where(self.source < 0, torch.full_like(self.source, self.in_channels), self.source)
        return padded.index_select(1, index)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, stride={self.stride}"
