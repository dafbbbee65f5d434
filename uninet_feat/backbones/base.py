"""The `Backbone` contract every feature extractor meets, so UniNet never looks inside one.

UniNet sizes its bottleneck, student and DFS from ``channels`` and ``strides`` alone, deep-copies the
backbone into the trainable target teacher, and rebuilds it from ``config()`` when a checkpoint is
read. Any ``nn.Module`` with these attributes works (tests use a hand-written one); subclassing
`Backbone` just documents them and adds `describe`.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

from ..errors import BadInputError


class Backbone(nn.Module):
    """A multi-level feature extractor.

    Attributes (all known before the first forward, e.g. from timm's ``feature_info``):
        name:       the name ``create_backbone`` was called with.
        levels:     the backbone-specific indices of the returned levels (timm ``out_indices``).
        channels:   channels of each returned level, fine → coarse.
        strides:    input-to-feature reduction of each level, fine → coarse (e.g. 4, 8, 16).
        mean, std:  per-channel input normalisation the weights expect (inputs in [0, 1]).
        finetunable: whether it may serve as UniNet's trainable target teacher.
    """

    name: str
    levels: tuple[int, ...]
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    finetunable: bool = True

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - abstract
        """(N, 3, H, W) normalised images → one (N, channels[i], H/strides[i], W/strides[i]) map per level."""
        raise NotImplementedError

    def config(self) -> dict:
        """Plain dict such that ``create_backbone(**config())`` rebuilds this backbone (random weights)."""
        raise NotImplementedError

    def describe(self) -> str:
        return (f"{self.name} levels={list(self.levels)} channels={list(self.channels)} "
                f"strides={list(self.strides)} mean={list(self.mean)} std={list(self.std)}")


_REQUIRED = ("name", "levels", "channels", "strides", "mean", "std", "config")


def check_backbone(bb, origin: str = "backbone") -> nn.Module:
    """Fail early (not deep inside UniNet) when a factory returns something off-contract."""
    missing = [a for a in _REQUIRED if not hasattr(bb, a)]
    if not isinstance(bb, nn.Module) or missing:
        raise BadInputError(f"{origin} returned {type(bb).__name__}, which lacks {missing or 'nn.Module'}",
                            fix="return an nn.Module with the attributes of uninet_feat.backbones.Backbone")
    n = len(bb.channels)
    if n == 0 or len(bb.strides) != n or len(bb.levels) != n:
        raise BadInputError(f"{origin}: channels {bb.channels}, strides {bb.strides} and levels {bb.levels} "
                            "must be non-empty and of equal length")
    strides, channels = list(bb.strides), list(bb.channels)
    if not all(isinstance(v, int) and v > 0 for v in strides + channels):
        raise BadInputError(f"{origin}: channels {channels} and strides {strides} must be positive integers")
    if any(b <= a or b % a or (b // a) & (b // a - 1) for a, b in zip(strides, strides[1:])):
        raise BadInputError(f"{origin}: strides {strides} must go fine → coarse, each a power of two times the "
                            "one before (e.g. 4, 8, 16): the student decoder upsamples by powers of two")
    check_normalisation(bb.mean, bb.std, origin)
    _check_outputs(bb, origin)
    return bb


def check_mean_std_pair(mean, std, name: str) -> None:
    """``mean`` and ``std`` given together or not at all: one alone would pair with the other's default, which
    belongs to another normalisation (`config.check_mean_std` refuses it in configs for the same reason)."""
    if (mean is None) != (std is None):
        given, missing = ("mean", "std") if std is None else ("std", "mean")
        raise BadInputError(f"backbone {name!r}: {given} is given without {missing}",
                            fix="give both, mean=(R, G, B) and std=(R, G, B), or neither for the backbone's own")


def check_normalisation(mean, std, origin: str = "mean/std", flags: str = "mean=(R, G, B), std=(R, G, B)"):
    """(mean, std) as two tuples of 3 floats, the input normalisation ``(x - mean) / std`` of images in [0, 1]:
    each mean in [0, 1], each std finite and above 0 (a std of 0 divides by zero; a mean outside the image range is
    a typo or 0-255 units), else a BadInputError naming ``flags``. Numbers written as text (YAML 1.1's ``5e-1``)
    are read as numbers."""
    out = []
    for name, v, ok in (("mean", mean, lambda x: 0 <= x <= 1), ("std", std, lambda x: 0 < x < math.inf)):
        try:
            vals = tuple(float(x) for x in v) if not isinstance(v, (str, bytes)) else None
        except (TypeError, ValueError):
            vals = None
        if vals is None or len(vals) != 3 or any(isinstance(x, bool) for x in v) or not all(map(ok, vals)):
            rule = "each in [0, 1]" if name == "mean" else "each above 0"
            raise BadInputError(f"{origin}: {name} must be 3 numbers (R, G, B), {rule}, for images in [0, 1]; "
                                f"got {v!r}", fix=f"give {flags}, e.g. OpenAI CLIP's mean 0.48145466 0.4578275 "
                                                  "0.40821073, std 0.26862954 0.26130258 0.27577711, or 0.5 0.5 0.5 "
                                                  "for both")
        out.append(vals)
    return out[0], out[1]


@torch.no_grad()
def _check_outputs(bb, origin: str) -> None:
    """One small forward: the maps must have the declared channels and strides. Why: UniNet is sized from the
    declarations alone, and a wrong one otherwise surfaces as a shape error deep inside its first forward."""
    was = bb.training
    first = next(bb.parameters(), None)
    errors = []
    try:
        # the smallest size every level has 4 cells at; then 224, the size fixed-grid models (a ViT's patches) take
        for size in dict.fromkeys((4 * bb.strides[-1], max(224, 4 * bb.strides[-1]))):
            try:
                with torch.no_grad():
                    feats = bb.eval()(torch.zeros(1, 3, size, size, device=None if first is None else first.device))
                break
            except Exception as e:   # noqa: BLE001 - reported below, not raised: UniNet may use a size that works
                errors.append(f"{size}x{size}: {type(e).__name__}: {e}")
        else:   # the declarations stand unchecked; a broken forward was silently passed over before
            warnings.warn(f"{origin}: could not check the declared channels and strides, its forward failed on "
                          f"a zero image ({'; '.join(errors)})", stacklevel=3)
            return
    finally:
        bb.train(was)
    if not isinstance(feats, (list, tuple)) or len(feats) != len(bb.channels):
        raise BadInputError(f"{origin}: forward returned {type(feats).__name__} of {len(feats) if isinstance(feats, (list, tuple)) else 1}"
                            f" maps, but the backbone declares {len(bb.channels)} levels",
                            fix="return a list with one (N, C, H, W) map per level, fine → coarse")
    for i, (f, c, st) in enumerate(zip(feats, bb.channels, bb.strides)):
        want = (1, c, size // st, size // st)
        if tuple(f.shape) != want:
            raise BadInputError(f"{origin}: level {i} returns a map of shape {tuple(f.shape)} for a {size}x{size} "
                                f"input, but channels[{i}] = {c} and strides[{i}] = {st} declare {want}",
                                fix="set channels / strides to what forward returns (e.g. from timm's "
                                    "feature_info), or return the declared levels")


def parse_indices(levels, what: str) -> tuple[int, ...]:
    """``levels`` as a tuple of ints: accepts a sequence or a "1,2,3" string (CLI and YAML both give those)."""
    if isinstance(levels, str):
        levels = [v for v in levels.replace(" ", "").split(",") if v]
    try:
        return tuple(int(v) for v in levels)
    except (TypeError, ValueError) as e:
        raise BadInputError(f"levels must be {what}, got {levels!r}") from e
