"""Bottleneck: pre-fusion convs bring every teacher level to the coarsest level, then MEM.

Sized from the backbone's channels and strides (timm ``feature_info``), never hard-coded:
for WideResNet-50-2 (256/512/1024 channels at strides 4/8/16) this reproduces the official
network — level 1 goes 256→512→1024 by two stride-2 3×3 convs, level 2 512→1024 by one,
level 3 passes through; the 3072-channel concatenation feeds three MEM blocks (width c3,
output 2·c3, the first with stride 2), so the embedding sits at twice the coarsest stride.

``stride=1`` keeps the embedding on the coarsest level's grid instead (not the method): tried for inputs
smaller than the method's 256 px, where stride 2 leaves a very coarse grid, and measured worse there (the
student then reconstructs defects too; docs/results.md). Kept for experiments.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .mem import MEMBlock

STRIDES = (1, 2)   # the ``bottleneck_stride`` option's values, × the coarsest level's stride


def _downsampler(cin: int, stride: int, channels: dict[int, int], s_last: int, c_last: int) -> nn.Module:
    """Stride-2 3×3 conv + BN + ReLU steps from ``stride`` to ``s_last``.

    Each step outputs the channel count the backbone itself has at the new stride (when it has
    a level there), else the coarsest level's channels — mirroring 256→512→1024 for WRN-50-2.
    """
    steps = math.log2(s_last / stride)
    if steps != int(steps) or steps < 0:
        raise ValueError(f"level strides must differ by powers of two, got {stride} and {s_last}")
    layers, c, s = [], cin, stride
    for _ in range(int(steps)):
        s *= 2
        cout = channels.get(s, c_last)
        layers += [nn.Conv2d(c, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        c = cout
    return nn.Sequential(*layers) if layers else nn.Identity()


class Bottleneck(nn.Module):
    def __init__(self, channels, strides, mem_form: str = "official", n_blocks: int = 3,
                 width: int | None = None, out_channels: int | None = None, stride: int = 2):
        super().__init__()
        channels, strides = tuple(channels), tuple(strides)
        c_last, s_last = channels[-1], strides[-1]
        by_stride = dict(zip(strides, channels))
        self.pre = nn.ModuleList(
            _downsampler(c, s, by_stride, s_last, c_last) for c, s in zip(channels, strides))
        width = width or c_last
        self.out_channels = out_channels or 2 * c_last
        cin = c_last * len(channels)
        if stride not in STRIDES:
            raise ValueError(f"bottleneck_stride must be 1 or 2 (× the coarsest level's stride), got {stride!r}")
        stride = int(stride)   # 1.0 / 2.0 from a config file
        blocks = []
        for i in range(n_blocks):
            blocks.append(MEMBlock(cin, width, self.out_channels, stride=stride if i == 0 else 1, form=mem_form))
            cin = self.out_channels
        self.mem = nn.Sequential(*blocks)
        self.out_stride = stride * s_last
        self.grad_checkpointing = False   # recompute in backward, keeping only the input levels

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._fuse, *feats, use_reentrant=False)
        return self._fuse(*feats)

    def _fuse(self, *feats: torch.Tensor) -> torch.Tensor:
        return self.mem(torch.cat([p(f) for p, f in zip(self.pre, feats)], 1))
