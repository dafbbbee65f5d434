"""Multi-Scale Embedding Module (MEM): the residual blocks at the heart of UniNet's bottleneck.

Each block splits its input channels into two halves and runs one branch per half:
branch A is conv3x3 → BN → ReLU → conv3x3 → BN; branch B is where the two forms differ.

* ``form="official"`` — what the official code actually runs: branch B is a second 3×3 branch
  (with conv bias), because its 7×7 "re-parameterised" convs are overwritten at construction
  (method notes §2.3, §8.4).
* ``form="multiscale"`` — what the paper draws: branch B is a 7×7 conv with a parallel 3×3 conv
  (each with its own BN), summed; ``reparameterize()`` folds both BNs and the 3×3 kernel into one
  7×7 conv with bias for inference, giving the same output (tested).

The branch outputs are concatenated, fused by a 1×1 conv + BN, added to the shortcut, then ReLU.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=bias), nn.BatchNorm2d(cout))


def _fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold BN (running stats) into the conv: returns (weight, bias)."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    w = conv.weight * scale.reshape(-1, 1, 1, 1)
    b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return w, bn.bias + (b - bn.running_mean) * scale


class RepConv(nn.Module):
    """Large-kernel conv + parallel small-kernel conv (each with BN), re-parameterisable into one conv."""

    def __init__(self, cin: int, cout: int, k_large: int = 7, k_small: int = 3, stride: int = 1):
        super().__init__()
        self.large = conv_bn(cin, cout, k_large, stride)
        self.small = conv_bn(cin, cout, k_small, stride)
        self.k_large, self.k_small, self.stride = k_large, k_small, stride
        self.fused: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x)
        return self.large(x) + self.small(x)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Replace both branches by one k_large conv with bias (valid in eval mode only)."""
        wl, bl = _fuse_conv_bn(self.large[0], self.large[1])
        ws, bs = _fuse_conv_bn(self.small[0], self.small[1])
        p = (self.k_large - self.k_small) // 2
        conv = nn.Conv2d(wl.shape[1], wl.shape[0], self.k_large, self.stride, self.k_large // 2, bias=True)
        conv.weight.copy_(wl + F.pad(ws, (p, p, p, p)))
        conv.bias.copy_(bl + bs)
        self.fused = conv.to(wl.device)
        del self.large, self.small


def _branch(cin: int, width: int, stride: int, form: str, bias: bool) -> nn.Module:
    if form == "multiscale":
        return nn.Sequential(RepConv(cin, width, stride=stride), nn.ReLU(inplace=True), RepConv(width, width))
    return nn.Sequential(conv_bn(cin, width, 3, stride, bias), nn.ReLU(inplace=True), conv_bn(width, width, 3, 1, bias))


FORMS = ("official", "multiscale")   # the ``mem`` option's values (config.load_config checks them up front)


class MEMBlock(nn.Module):
    """One two-branch residual block; ``width`` is split evenly between the branches."""

    def __init__(self, cin: int, width: int, cout: int, stride: int = 1, form: str = "official"):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"MEM form must be one of {FORMS}, got {form!r}")
        self.split = cin // 2
        half = width // 2
        self.branch_a = _branch(self.split, half, stride, "official", bias=False)
        self.branch_b = _branch(cin - self.split, width - half, stride, form, bias=(form == "official"))
        self.fuse = conv_bn(width, cout, 1)
        self.shortcut = nn.Identity() if (stride == 1 and cin == cout) else conv_bn(cin, cout, 1, stride)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x[:, : self.split], x[:, self.split:]
        y = self.fuse(torch.cat([self.branch_a(a), self.branch_b(b)], 1))
        return self.act(y + self.shortcut(x))


def reparameterize(module: nn.Module) -> nn.Module:
    """Fold every RepConv inside ``module`` into a single conv (call after ``eval()``)."""
    for m in list(module.modules()):
        if isinstance(m, RepConv) and m.fused is None:
            m.reparameterize()
    return module
