"""Name → factory, timm/open_clip style: exact names, ``prefix:`` families, and every timm CNN.

Resolution of ``create_backbone(name, ...)``:
  1. a name registered exactly (``register_backbone("tiny", f)``);
  2. a family prefix: ``"clip:ViT-B-16"`` → the factory registered as ``"clip:"``;
  3. otherwise any timm model name → `timm_cnn.create_timm_cnn` (also reachable as ``"timm:<name>"``).

A factory is ``factory(name, weights="random", levels=None, **kw) -> Backbone``; ``kw`` must be plain
values, because ``config()`` records them for rebuilding from a checkpoint.
"""
from __future__ import annotations

import difflib
from typing import Callable

from ..errors import BadInputError
from .base import check_backbone

Factory = Callable[..., object]
_EXACT: dict[str, Factory] = {}
_PREFIX: dict[str, Factory] = {}


def register_backbone(name_or_prefix: str, factory: Factory, overwrite: bool = False) -> None:
    """Register ``factory`` under an exact name, or under a family prefix when the key ends with ':'."""
    if not name_or_prefix or not callable(factory):
        raise ValueError("register_backbone needs a non-empty name and a callable factory")
    table = _PREFIX if name_or_prefix.endswith(":") else _EXACT
    if name_or_prefix in table and not overwrite and table[name_or_prefix] is not factory:
        raise ValueError(f"backbone {name_or_prefix!r} is already registered (pass overwrite=True to replace it)")
    table[name_or_prefix] = factory


def list_backbones(pattern: str | None = None) -> list[str]:
    """Registered names and prefixes; with ``pattern`` (fnmatch, e.g. '*efficientnet*') also timm models."""
    out = sorted(_EXACT) + sorted(_PREFIX)
    if pattern:
        import fnmatch

        import timm
        out = [n for n in out if fnmatch.fnmatch(n, pattern)] + timm.list_models(pattern)
    return out


def _resolve(name: str) -> Factory:
    if name in _EXACT:
        return _EXACT[name]
    if ":" in name:
        prefix = name.split(":", 1)[0] + ":"
        if prefix in _PREFIX:
            return _PREFIX[prefix]
        raise BadInputError(f"unknown backbone family {prefix!r} in {name!r}; registered families: "
                            f"{sorted(_PREFIX)}", fix="use a registered prefix, or register_backbone(prefix, factory)")
    import timm
    if timm.is_model(name):
        return _PREFIX["timm:"]
    close = difflib.get_close_matches(name, list(_EXACT) + timm.list_models(), n=5, cutoff=0.6)
    raise BadInputError(
        f"unknown backbone {name!r}: not a registered name ({sorted(_EXACT)}) nor a timm model"
        + (f"; did you mean {close}?" if close else ""),
        fix="pass a timm CNN name (e.g. tf_efficientnet_lite0, wide_resnet50_2, resnet18; search with "
            "uninet_feat.backbones.list_backbones('*pattern*')), a registered 'prefix:name', or "
            "register_backbone(name, factory) first")


def create_backbone(name: str, weights: str = "random", levels=None, **kw):
    """Build a backbone by name. ``weights``: 'random', 'imagenet', 'timm-hub' or a local file path.

    ``levels`` picks the returned feature levels (default: strides 4, 8, 16, as UniNet uses for
    WideResNet-50-2 layer1-3). Extra ``kw`` go to the factory (``mean``/``std`` override normalisation).
    """
    if not isinstance(name, str) or not name:
        raise BadInputError(f"backbone name must be a non-empty string, got {name!r}")
    return check_backbone(_resolve(name)(name, weights=weights, levels=levels, **kw), origin=f"backbone {name!r}")
