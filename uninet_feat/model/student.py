"""Student decoder: reverse distillation, mirroring the backbone's levels coarse → fine.

Like RD4AD's de-WideResNet: one stage per teacher level, each a stack of residual bottleneck
blocks whose first block upsamples with a transposed conv (kernel = stride = the stride ratio),
in its main path and in its shortcut. Stage outputs have the teacher's channels at the teacher's
stride, so every student map pairs with a teacher map. Default depths (3, 4, 6) are the official
ones; the inner width is half the stage's output channels (min 16), as in the official decoder.

Each stage ends in a ReLU only when the teacher's level is non-negative (ResNets: post-ReLU). Many
backbones return signed maps (EfficientNet/MobileNet linear bottlenecks, ConvNeXt, ViT tokens: about
half the values of EfficientNet-Lite0's levels are negative); a ReLU-ended student cannot point
along those, which left a floor of ≈0.5 in 1 − cos on every pair. ``UniNet`` probes the sign.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, width: int, up: int = 1, relu: bool = True):
        super().__init__()
        mid = (nn.ConvTranspose2d(width, width, up, up, bias=False) if up > 1
               else nn.Conv2d(width, width, 3, 1, 1, bias=False))
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            mid, nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        if up > 1:
            self.shortcut = nn.Sequential(nn.ConvTranspose2d(cin, cout, up, up, bias=False), nn.BatchNorm2d(cout))
        elif cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()
        self.act = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class StudentDecoder(nn.Module):
    def __init__(self, channels, strides, in_channels: int, in_stride: int, depths=(3, 4, 6),
                 out_relu=None, width_mult: float = 1.0):
        """``out_relu[i]``: whether level i (fine → coarse) ends in a ReLU; default all True (RD4AD).
        ``width_mult`` scales the blocks' inner width (official: half the stage's output channels)."""
        super().__init__()
        channels, strides = tuple(channels), tuple(strides)
        out_relu = tuple(out_relu) if out_relu is not None else (True,) * len(channels)
        if len(depths) != len(channels):
            raise ValueError(f"decoder depths {depths} must have one entry per level {channels}")
        if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1 for d in depths):
            # a stage of 0 blocks passes its input's channels on unchanged: a shape error at the first forward
            raise ValueError(f"decoder depths {depths} must be whole numbers >= 1")
        stages, c, s = [], in_channels, in_stride
        for cout, sout, depth, relu in zip(channels[::-1], strides[::-1], depths, out_relu[::-1]):
            up = s // sout
            if up * sout != s:
                raise ValueError(f"stride {s} is not a multiple of {sout}")
            width = max(round(width_mult * (cout // 2)), 16)
            blocks = [DecoderBlock(c if i == 0 else cout, cout, width, up if i == 0 else 1, relu or i < depth - 1)
                      for i in range(depth)]
            stages.append(nn.Sequential(*blocks))
            c, s = cout, sout
        self.stages = nn.ModuleList(stages)
        self.grad_checkpointing = False   # recompute each block in backward, keeping only its input

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Returns maps fine → coarse, in the teacher's level order."""
        outs = []
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for stage in self.stages:
            for block in stage:
                z = checkpoint(block, z, use_reentrant=False) if recompute else block(z)
            outs.append(z)
        return outs[::-1]
