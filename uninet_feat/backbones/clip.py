"""open_clip ViT image towers as UniNet backbones: ``create_backbone("clip:ViT-B-16", weights=..., levels=...)``.

A ViT has one token grid (stride = patch size), while UniNet wants three levels whose strides are powers of two
apart. Like ViTDet's simple feature pyramid, but **without parameters** (the source teacher is frozen and the
target teacher is a trainable copy, so any projection layer would have to be frozen or trained in both —
resampling is neither):

* ``levels`` are three 0-based transformer block indices (open_clip/timm ``forward_intermediates`` convention:
  3 = output of the 4th block), shallow → deep; default ``(d//4, d//2, 3d//4)`` for a depth ``d``:
  (3, 6, 9) for 12 blocks (ViT-B), (6, 12, 18) for 24 (ViT-L), (1, 2, 3) for the 4-block test model.
  Blocks after the deepest chosen one are never run by ``forward``.
* each chosen block's output loses its CLS token, becomes an (N, width, H/p, W/p) map, and is resampled
  bilinearly to its level's stride: for a patch size ``p`` divisible by 4 the strides are ``(p/4, p/2, p)``
  (patch 16 → 4, 8, 16: the shallow block ×4, the middle ×2, the deep block as is; patch 32 → 8, 16, 32;
  patch 8 → 2, 4, 8); any other patch size (e.g. 14) gets strides ``(4, 8, 16)``, resampled from the token grid.
  ``strides=(a, b, c)`` overrides this. Every level has ``width`` channels.
* positional embeddings are interpolated (bicubic, as open_clip does when it loads weights for another
  resolution) whenever the token grid differs from the model's native grid, so any input size works whose
  height and width are multiples of ``size_multiple`` = lcm(patch, coarsest stride): 16 for ViT-B-16,
  32 for ViT-B-32, 112 for ViT-L-14 (224 and 448 work). Other sizes raise ``BadInputError`` naming the nearest
  sizes that do (nothing is silently resized). UniNet itself needs multiples of twice the coarsest stride.
* patch dropout is never applied (it would remove grid tokens).

Weights: ``"random"``; a local file (``torch.save(clip_model.state_dict())`` of the whole open_clip model,
or of just its image tower, ``.safetensors``, a ``{'state_dict': ...}`` wrapper or an OpenAI TorchScript
archive) read with ``weights_only=True`` — a file holding other pickled objects is refused; or an open_clip
pretrained tag (``"laion2b_s34b_b88k"``, ``"openai"``, ...), which open_clip downloads from its hub — the only
path that touches the network. Only open_clip's own ``VisionTransformer`` towers are supported (not the
timm-tower models such as SigLIP/EVA, nor the ModifiedResNet ones).

Input normalisation (``mean``/``std``): given, else the hub tag's, else the model config's ``preprocess_cfg``, else
for a local file of a built-in model open_clip's for the model name (`file_normalisation`: the tag the file's path
names, or the one all its tags share; warned where they differ), else OpenAI's, as open_clip's factory has it.

``clip:tiny`` (patch 16) and ``clip:tiny-p8`` (patch 8) are small random configurations for tests and docs
(width 64, 4 blocks, 64 px native, a 1-block text tower); ``register_clip_config`` adds others.
``import uninet_feat.backbones`` registers the ``clip:`` prefix without importing open_clip (it is imported on
first use).
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import json
import logging
import math
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import BadInputError
from .base import Backbone, check_mean_std_pair, check_normalisation, parse_indices
from .registry import register_backbone

log = logging.getLogger(__name__)

PREFIX = "clip:"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip.OPENAI_DATASET_MEAN / _STD, copied so that
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)   # channels/mean/std need no open_clip import
_TEXT_TINY = {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
_CONFIGS: dict[str, dict] = {
    "tiny": {"embed_dim": 32, "text_cfg": dict(_TEXT_TINY),
             "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "head_width": 32, "patch_size": 16}},
    "tiny-p8": {"embed_dim": 32, "text_cfg": dict(_TEXT_TINY),
                "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "head_width": 32, "patch_size": 8}},
}
_RANDOM = ("random", "none", "")


def register_clip_config(name: str, cfg, overwrite: bool = False) -> None:
    """Make ``clip:<name>`` build from an open_clip model config (a dict or a JSON file with
    ``embed_dim``, ``vision_cfg``, ``text_cfg``, e.g. open_clip's ``model_configs/*.json``). Its backbones
    record the config in ``config()``, so checkpoints rebuild without registering it again."""
    if not isinstance(cfg, dict):
        p = Path(cfg).expanduser()
        try:
            cfg = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BadInputError(f"cannot read an open_clip model config ({e})", path=p,
                                fix="pass an open_clip model config JSON (e.g. open_clip_config.json beside the "
                                    "weights)") from e
    if isinstance(cfg.get("model_cfg"), dict):   # open_clip_config.json: its preprocess_cfg (mean, std) sits beside
        pre = cfg.get("preprocess_cfg")          # the model config, and was dropped with it
        cfg = dict(cfg["model_cfg"], **({"preprocess_cfg": pre} if pre and "preprocess_cfg" not in cfg["model_cfg"]
                                         else {}))
    _check_cfg(name, cfg)
    if name in _CONFIGS and not overwrite and _CONFIGS[name] != cfg:
        raise ValueError(f"clip config {name!r} is already registered (pass overwrite=True to replace it)")
    _CONFIGS[name] = copy.deepcopy(cfg)


def _check_cfg(name: str, cfg: dict) -> dict:
    v = cfg.get("vision_cfg") if isinstance(cfg, dict) else None
    if not isinstance(v, dict) or "embed_dim" not in cfg:
        raise BadInputError(f"clip model config {name!r} needs 'embed_dim' and a 'vision_cfg' dict",
                            fix="use the layout of open_clip's model_configs/*.json")
    if v.get("timm_model_name") or not isinstance(v.get("layers", 12), int):
        kind = "a timm image tower" if v.get("timm_model_name") else "a ModifiedResNet image tower"
        raise BadInputError(f"clip model {name!r} has {kind}; only open_clip's VisionTransformer towers are "
                            "supported", fix="choose a ViT config such as ViT-B-16, ViT-B-32 or ViT-L-14, or use "
                                             "the timm model directly as a backbone")
    return cfg


def _model_cfg(clip_name: str, model_cfg: dict | None) -> tuple[dict, bool]:
    """(config, is_open_clip_builtin)."""
    if model_cfg is not None:
        return _check_cfg(clip_name, copy.deepcopy(model_cfg)), False
    if clip_name in _CONFIGS:
        return copy.deepcopy(_CONFIGS[clip_name]), False
    import open_clip
    cfg = open_clip.get_model_config(clip_name) if "/" not in clip_name and ":" not in clip_name else None
    if cfg is None:
        known = list(_CONFIGS) + open_clip.list_models()
        close = difflib.get_close_matches(clip_name, known, n=5, cutoff=0.5)
        raise BadInputError(f"unknown open_clip model {clip_name!r}" + (f"; did you mean {close}?" if close else ""),
                            fix="use a name from open_clip.list_models() (ViT families), 'tiny', or "
                                "register_clip_config(name, cfg) first")
    return _check_cfg(clip_name, cfg), True


def _vision(cfg: dict) -> dict:
    v = cfg["vision_cfg"]
    patch, size = v.get("patch_size", 16), v.get("image_size", 224)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    size = size[0] if isinstance(size, (tuple, list)) else size
    return {"width": int(v.get("width", 768)), "layers": int(v.get("layers", 12)), "patch": int(patch),
            "image_size": int(size)}


def default_block_levels(depth: int) -> tuple[int, int, int]:
    """(d//4, d//2, 3d//4), 0-based block indices: (3, 6, 9) for 12 blocks."""
    if depth < 3:
        raise BadInputError(f"a {depth}-block ViT cannot give three distinct levels")
    return tuple(min(depth - 1, k * depth // 4) for k in (1, 2, 3))


def default_strides(patch: int) -> tuple[int, int, int]:
    return (patch // 4, patch // 2, patch) if patch % 4 == 0 else (4, 8, 16)


def _check_levels(levels, depth: int) -> tuple[int, ...]:
    levels = parse_indices(levels, "transformer block indices")
    if len(levels) != 3 or any(not 0 <= v < depth for v in levels) or list(levels) != sorted(set(levels)):
        raise BadInputError(f"levels {list(levels)} must be three increasing 0-based block indices of this "
                            f"{depth}-block ViT", fix=f"e.g. levels={list(default_block_levels(depth))}")
    return levels


def _check_strides(strides) -> tuple[int, int, int]:
    try:
        s = tuple(int(v) for v in strides)
    except (TypeError, ValueError) as e:
        raise BadInputError(f"strides must be three integers, got {strides!r}") from e
    ok = len(s) == 3 and s[0] >= 1 and all(b > a and (b // a) * a == b and (b // a) & (b // a - 1) == 0
                                           for a, b in zip(s, s[1:]))
    if not ok:
        raise BadInputError(f"strides {list(s)} must be three increasing integers, each a power of two times "
                            "the previous", fix="e.g. strides=(4, 8, 16)")
    return s


# ---------------------------------------------------------------- running an open_clip VisionTransformer
def _pos_embed(visual, gh: int, gw: int) -> torch.Tensor:
    """(1 + gh*gw, C) positional embedding; bicubically interpolated when (gh, gw) is not the native grid, with
    antialiasing whether it grows or shrinks, as open_clip's ``resize_pos_embed`` (features of a larger input
    differed from open_clip's by up to 0.014 at 320 px)."""
    pos = visual.positional_embedding
    g0h, g0w = visual.grid_size
    if (gh, gw) == (g0h, g0w):
        return pos
    grid = pos[1:].reshape(1, g0h, g0w, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False,
                         antialias=True).to(pos.dtype)
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)], 0)


def run_vit(visual, x: torch.Tensor, take=(), upto: int | None = None, value_last: bool = False):
    """Token sequences (N, 1 + gh*gw, C) after the blocks in ``take``, and after block ``upto`` (default:
    the last), plus the grid (gh, gw). ``value_last``: the last block attends each token only to itself
    (identity attention map, MaskCLIP-style dense features). No patch dropout."""
    t = visual.conv1(x)
    n, c, gh, gw = t.shape
    t = t.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(t.dtype).view(1, 1, -1).expand(n, -1, -1)
    t = visual.ln_pre(torch.cat([cls, t], 1) + _pos_embed(visual, gh, gw).to(t.dtype))
    tr = visual.transformer
    blocks = tr.resblocks
    last = len(blocks) - 1 if upto is None else upto
    batch_first = getattr(tr, "batch_first", True)
    if not batch_first:
        t = t.transpose(0, 1)
    out = []
    for i in range(last + 1):
        if value_last and i == last:
            t = _identity_attention_block(blocks[i], t)
        else:
            t = blocks[i](t, attn_mask=None)
        if i in take:
            out.append(t if batch_first else t.transpose(0, 1))
    return out, (t if batch_first else t.transpose(0, 1)), (gh, gw)


def run_vit_two_ends(visual, x: torch.Tensor):
    """Final tokens of the plain tower and of the ``value_last`` one, sharing blocks 0..L-2 (one tower
    pass plus one extra last block instead of two passes), plus the grid."""
    last = len(visual.transformer.resblocks) - 1
    _, t, grid = run_vit(visual, x, upto=last - 1)   # upto=-1 (a one-block tower): the embedded tokens
    return last_block(visual, t), last_block(visual, t, value_last=True), grid


def last_block(visual, t: torch.Tensor, value_last: bool = False) -> torch.Tensor:
    """The tower's last block on batch-first tokens ``t`` (those after block L-2); ``value_last``: with
    an identity attention map, as in `run_vit`."""
    blk = visual.transformer.resblocks[-1]
    batch_first = getattr(visual.transformer, "batch_first", True)
    if not batch_first:
        t = t.transpose(0, 1)
    t = _identity_attention_block(blk, t) if value_last else blk(t, attn_mask=None)
    return t if batch_first else t.transpose(0, 1)


def _identity_attention_block(blk, t):
    attn = getattr(blk, "attn", None)
    if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
        raise BadInputError("patch_mode='value' needs open_clip's default attention blocks",
                            fix="use patch_mode='tokens' for this model")
    c = attn.embed_dim
    bias = attn.in_proj_bias[2 * c:] if attn.in_proj_bias is not None else None
    v = attn.out_proj(F.linear(blk.ln_1(t), attn.in_proj_weight[2 * c:], bias))
    t = t + blk.ls_1(v)
    return t + blk.ls_2(blk.mlp(blk.ln_2(t)))


def pool_vit(visual, t: torch.Tensor):
    """(pooled (N, width), patch tokens after ln_post (N, L, width)) from a final token sequence."""
    if getattr(visual, "attn_pool", None) is not None:
        raise BadInputError("image embeddings of attentional-pool towers (CoCa) are not supported",
                            fix="use a CLIP ViT such as ViT-B-16")
    if visual.pool_type == "none":
        raise BadInputError("this tower has pool_type 'none': no image embedding")
    if getattr(visual, "final_ln_after_pool", False):
        pooled = t[:, 1:].mean(1) if visual.pool_type == "avg" else t[:, 0]
        return visual.ln_post(pooled), visual.ln_post(t[:, 1:])
    t = visual.ln_post(t)
    return (t[:, 1:].mean(1) if visual.pool_type == "avg" else t[:, 0]), t[:, 1:]


def project(visual, v: torch.Tensor) -> torch.Tensor:
    return v @ visual.proj if getattr(visual, "proj", None) is not None else v


# ---------------------------------------------------------------- weights
def _is_torchscript(p: Path) -> bool:
    try:
        with zipfile.ZipFile(p) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_clip_state_dict(path) -> dict:
    """Tensors of a local open_clip / OpenAI CLIP file (never unpickles arbitrary objects)."""
    from .timm_cnn import read_state_dict
    p = Path(path).expanduser()
    if p.is_file() and _is_torchscript(p):  # OpenAI's original release: TorchScript, no Python pickles
        try:
            with warnings.catch_warnings():  # torch.jit.load's deprecation notice
                warnings.simplefilter("ignore", DeprecationWarning)
                sd = dict(torch.jit.load(str(p), map_location="cpu").state_dict())
        except Exception as e:  # noqa: BLE001
            raise BadInputError(f"cannot read TorchScript weights ({type(e).__name__}: {e})", path=p,
                                fix="download the file again, or pass open_clip's own .bin/.safetensors weights") from e
    else:
        sd = read_state_dict(p)
    return {k: v for k, v in sd.items() if k not in ("input_resolution", "context_length", "vocab_size")}


def _visual_part(sd: dict) -> dict:
    if any(k.startswith("visual.") for k in sd):
        return {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    return sd


def _load_tower(module: nn.Module, sd: dict, what: str, source) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    if missing or extra:
        raise BadInputError(
            f"not weights for {what}: {len(missing)} of its {len(own)} tensors are missing (e.g. {missing[:3]}) "
            f"and {len(extra)} are foreign (e.g. {extra[:3]})", path=source,
            fix="pass a checkpoint of this exact open_clip model: torch.save(model.state_dict()) of the whole "
                "open_clip model or of model.visual, or the model name the file was saved from")
    bad = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in own.items() if sd[k].shape != v.shape]
    if bad:
        raise BadInputError(f"{len(bad)} tensors have the wrong shape for {what} (key, file, model): {bad[:3]}",
                            path=source, fix="the file is for another width / patch size / resolution: pick the "
                                             "matching name (e.g. ViT-L-14-336 for 336 px weights)")
    from .timm_cnn import _check_finite
    _check_finite({k: sd[k] for k in own}, {}, source)
    module.load_state_dict(sd, strict=True)


def _is_file_spec(weights: str) -> bool:
    return Path(weights).expanduser().exists() or any(ch in weights for ch in "/\\") or \
        weights.lower().endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def _tag_cfg(clip_name: str, tag: str, builtin: bool) -> dict:
    import open_clip
    tags = open_clip.list_pretrained_tags_by_model(clip_name) if builtin else []
    if tag not in tags:
        raise BadInputError(
            f"weights {tag!r} is neither an existing file nor an open_clip pretrained tag of {clip_name!r}"
            + (f" (its tags: {tags})" if tags else " (it has no pretrained tags)"),
            fix="pass 'random', a local checkpoint path, or one of the listed tags (downloads from open_clip's hub)")
    return open_clip.get_pretrained_cfg(clip_name, tag) or {}


def _tag_normalisation(pcfg: dict) -> tuple[tuple, tuple]:
    """(mean, std) of an open_clip pretrained config; a config without them has open_clip's default, OpenAI's."""
    return (tuple(float(x) for x in (pcfg.get("mean") or OPENAI_MEAN)),
            tuple(float(x) for x in (pcfg.get("std") or OPENAI_STD)))


def _names_of_tag(tag: str, pcfg: dict) -> tuple[list[str], list[str], list[str]]:
    """How a file of open_clip's tag ``tag`` may be named on disk, lower case: (words within its file name: the tag
    and its Hugging Face repository's name; whole file names: its download's, ``ViT-B-16.pt`` — within a name it
    would also be ``my-ViT-B-16.pth`` of other weights; whole names of a folder above it: the tag, the repository's
    and its folder in the hub's cache, ``models--laion--CLIP-...``)."""
    words, files, folders = [tag.lower()], [], [tag.lower()]
    url = str(pcfg.get("url") or "").rstrip("/")
    if url:
        files.append(url.rsplit("/", 1)[-1].lower())
    hub = str(pcfg.get("hf_hub") or "").strip("/")
    if hub:
        words.append(hub.rsplit("/", 1)[-1].lower())
        folders += [hub.rsplit("/", 1)[-1].lower(), "models--" + hub.replace("/", "--").lower()]
    return [n for n in words if n], files, folders


def _named_tags(clip_name: str, weights) -> tuple[dict, list]:
    """({tag: open_clip's pretrained config} of built-in model ``clip_name``, [the tags the file path ``weights``
    names, absolute or with its links followed: in its file name, as its whole file name, or as a whole folder name
    above it, `_names_of_tag`; a tag's word elsewhere in a folder's name, `/work/openai_tests/`, is not taken for
    it]), from open_clip's registry."""
    import open_clip
    tags = {t: open_clip.get_pretrained_cfg(clip_name, t) or {}
            for t in open_clip.list_pretrained_tags_by_model(clip_name)}
    # the absolute path and the one its links lead to: as written, a relative path in a hub folder
    # (`snapshots/abc/open_clip_pytorch_model.bin` from within it) lost the folder that names the tag
    p = Path(str(weights).replace("\\", "/")).expanduser()
    paths = {p.absolute()}
    with contextlib.suppress(OSError, RuntimeError):   # a link loop
        paths.add(p.resolve())
    splits = [(str(q).replace("\\", "/").lower().split("/")[:-1], q.name.lower()) for q in paths]

    def names(t):
        words, files, whole = _names_of_tag(t, tags[t])
        return any(any(w in name for w in words) or name in files or any(f in folders for f in whole)
                   for folders, name in splits)
    return tags, [t for t in tags if names(t)]


def file_quick_gelu(clip_name: str, weights) -> bool:
    """Whether a local weights file of built-in model ``clip_name`` needs QuickGELU: when every tag its path names
    was trained with it (OpenAI's ``ViT-B-16.pt``, a ``..._clip_224.openai`` hub folder, DFN, MetaCLIP). A file
    carries no activation of its own, and open_clip's default for the plain name (GELU) gave OpenAI's weights other
    features, silently; a path that names no tag keeps the name's own (``-quickgelu`` names set it)."""
    tags, named = _named_tags(clip_name, weights)
    return bool(named) and all(tags[t].get("quick_gelu") for t in named)


def file_normalisation(clip_name: str, weights) -> tuple[tuple, tuple, str]:
    """(mean, std, where from) for a local weights file of open_clip's built-in model ``clip_name``, which carries no
    preprocessing of its own (open_clip's factory gives such a file OpenAI's mean/std unless told ``image_mean``/
    ``image_std``). open_clip knows the mean/std of each pretrained tag of the model (``get_pretrained_cfg``): the tag
    the file's path names (`_named_tags`: in its file name, or a hub folder above it) gives its own; otherwise, when
    every tag of the model has one and the same (CLIPA's ImageNet mean/std), that one. When the tags differ (ViT-L-14's
    laion2b_s32b_b82k: 0.5 / 0.5, its others OpenAI's) and the path names none of them, OpenAI's are taken with a
    warning naming the tags of the others and the fix (``mean=``/``std=``, ``--mean``/``--std``)."""
    tags, named = _named_tags(clip_name, weights)
    if not tags:
        return OPENAI_MEAN, OPENAI_STD, "OpenAI's (open_clip's default; it has no pretrained tag of this model)"
    pool = {t: tags[t] for t in (named or tags)}
    kinds: dict = {}
    for t, c in pool.items():
        kinds.setdefault(_tag_normalisation(c), []).append(t)
    if len(kinds) == 1:
        (mean, std), which = next(iter(kinds.items()))
        return mean, std, (f"open_clip's tag {which[0]} (the file's path names it)" if named else
                           f"open_clip's, the same for each of the model's {len(which)} tag(s)")
    openai = (tuple(OPENAI_MEAN), tuple(OPENAI_STD))
    mean, std = openai if openai in kinds else next(iter(kinds))
    others = "; ".join(f"mean {list(m)}, std {list(sd)} for {', '.join(ts)}" for (m, sd), ts in kinds.items()
                       if (m, sd) != (mean, std))
    first = next(((m, sd) for (m, sd) in kinds if (m, sd) != (mean, std)))
    warnings.warn(f"{weights}: a weights file of {clip_name}, whose open_clip checkpoints differ in their input "
                  f"normalisation, and its path names none of their tags: taking mean {list(mean)}, std {list(std)} "
                  f"({', '.join(kinds[(mean, std)])}); open_clip gives {others}. Fix: for a file of those, pass its "
                  f"normalisation: --mean {' '.join(map(str, first[0]))} --std {' '.join(map(str, first[1]))} "
                  "(mean=, std= in the library)", stacklevel=3)
    return mean, std, "OpenAI's, one of the kinds of the model's tags (warned)"


def build_clip_model(clip_name: str, weights: str = "random", model_cfg: dict | None = None,
                     quick_gelu: bool | None = None, text: bool = True):
    """A whole open_clip model (both towers) for ``clip_name``, with the same weight rules as the backbone.

    Used by `uninet_feat.vlm.TextScorer` to get the text tower of a backbone's weights. ``text=False`` raises
    no error when a file holds only the image tower (the text tower then stays random)."""
    import open_clip
    cfg, builtin = _model_cfg(clip_name, model_cfg)
    weights = "random" if weights is None else str(weights)
    if weights not in _RANDOM and not _is_file_spec(weights):
        pcfg = _tag_cfg(clip_name, weights, builtin)
        qg = bool(pcfg.get("quick_gelu", False)) if quick_gelu is None else quick_gelu
        try:
            return open_clip.create_model(clip_name, pretrained=weights, force_quick_gelu=qg)
        except Exception as e:  # noqa: BLE001 - offline, hub errors
            raise BadInputError(f"could not get open_clip weights {clip_name}/{weights} ({type(e).__name__}: {e}); "
                                "there may be no internet here", fix="download the checkpoint elsewhere and pass "
                                "weights=<local file>") from e
    if quick_gelu is not None:
        cfg["quick_gelu"] = quick_gelu
    cfg.pop("preprocess_cfg", None)   # an open_clip_config.json's, kept for the backbone's mean/std: not a model arg
    if cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {}):
        model = open_clip.model.CustomTextCLIP(**cfg)
    else:
        model = open_clip.model.CLIP(**cfg)
    if weights not in _RANDOM:
        sd = read_clip_state_dict(weights)
        if all(k.startswith("visual.") for k in sd) or not any(k.startswith("visual.") for k in sd):
            if text:
                raise BadInputError("the file holds only an image tower, no text tower", path=weights,
                                    fix="pass the whole open_clip checkpoint, or text_model=<an open_clip model>")
            _load_tower(model.visual, _visual_part(sd), f"{clip_name} image tower", weights)
        else:
            if "logit_scale" in sd and sd["logit_scale"].shape != model.logit_scale.shape:
                sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
            _load_tower(model, sd, clip_name, weights)
    return model.eval()


class ClipViT(Backbone):
    """An open_clip ViT image tower (module ``visual``) giving a parameter-free 3-level pyramid.

    ``forward(x)`` → three (N, width, H/s, W/s) maps (see the module doc). ``embed(x)`` → dict(cls = pooled
    token after ln_post, image_embedding = its projection, L2-normalised, as ``encode_image(normalize=True)``).
    ``patch_embeddings(x)`` → (N, embed_dim, H/p, W/p) projected, normalised patch tokens (for text scoring).
    """

    def __init__(self, name: str, weights: str = "random", levels=None, mean=None, std=None, strides=None,
                 quick_gelu: bool | None = None, model_cfg: dict | None = None):
        super().__init__()
        check_mean_std_pair(mean, std, name)
        given = mean is not None   # `is None`: a numpy array has no truth value
        clip_name = name[len(PREFIX):] if name.startswith(PREFIX) else name
        cfg, builtin = _model_cfg(clip_name, model_cfg)
        v = _vision(cfg)
        self.name, self.clip_name, self.finetunable = name, clip_name, True
        self.depth, self.width, self.patch_size = v["layers"], v["width"], v["patch"]
        self.native_size, self.embed_dim = v["image_size"], int(cfg["embed_dim"])
        self.levels = default_block_levels(self.depth) if levels is None else _check_levels(levels, self.depth)
        self.channels = (self.width,) * 3
        self.strides = default_strides(self.patch_size) if strides is None else _check_strides(strides)
        self._strides_given = strides is not None
        self.size_multiple = math.lcm(self.patch_size, self.strides[-1])
        self._model_cfg = None if builtin else cfg
        weights = "random" if weights is None else str(weights)
        self.weights_source = weights
        pre = cfg.get("preprocess_cfg", {}) or {}
        dmean, dstd = pre.get("mean") or OPENAI_MEAN, pre.get("std") or OPENAI_STD
        self.normalisation_source = ("given" if given else "the model config's preprocess_cfg"
                                     if pre.get("mean") else "OpenAI's (open_clip's default)")
        local = weights not in _RANDOM and _is_file_spec(weights)
        if local and builtin and not pre.get("mean") and not given:   # open_clip's for the model name
            dmean, dstd, self.normalisation_source = file_normalisation(clip_name, weights)
        if weights not in _RANDOM and not _is_file_spec(weights):  # an open_clip hub tag
            pcfg = _tag_cfg(clip_name, weights, builtin)
            quick_gelu = bool(pcfg.get("quick_gelu", False)) if quick_gelu is None else quick_gelu
            dmean, dstd = pcfg.get("mean") or dmean, pcfg.get("std") or dstd
            self.normalisation_source = "given" if given else f"open_clip's tag {weights}"
            self.visual = build_clip_model(clip_name, weights, None, quick_gelu).visual
        else:
            import open_clip
            if quick_gelu is None:   # a file of OpenAI's (DFN's, MetaCLIP's) weights by its name: as its tag
                quick_gelu = bool(cfg.get("quick_gelu", False)) or (local and builtin and
                                                                    file_quick_gelu(clip_name, weights))
            self.visual = open_clip.model._build_vision_tower(self.embed_dim, cfg["vision_cfg"], quick_gelu)
            if weights not in _RANDOM:
                sd = _visual_part(read_clip_state_dict(weights))
                _load_tower(self.visual, sd, f"{clip_name} image tower", weights)
        self.quick_gelu = bool(quick_gelu)
        self._tower_out = None   # a list while `keep_tower_output` is active
        self.mean, self.std = check_normalisation(*((mean, std) if given else (dmean, dstd)), f"backbone {name!r}")

    # ------------------------------------------------------------ contract
    def check_size(self, h: int, w: int, m: int | None = None) -> None:
        m = m or self.size_multiple
        bad = [s for s in (h, w) if s % m or s < m]
        if bad:
            near = sorted({max(m, (bad[0] // m) * m), max(m, -(-bad[0] // m) * m)})
            raise BadInputError(
                f"{self.name} needs input height and width that are multiples of {m} (patch {self.patch_size}, "
                f"level strides {list(self.strides)}); got {h}×{w}",
                fix=f"use image_size {' or '.join(map(str, near))} (any multiple of {m}; UniNet also needs a "
                    f"multiple of {2 * self.strides[-1]})")

    def _pyramid(self, tokens: list[torch.Tensor], grid, size) -> list[torch.Tensor]:
        (gh, gw), (h, w) = grid, size
        outs = []
        for t, s in zip(tokens, self.strides):
            f = t[:, 1:].transpose(1, 2).reshape(t.shape[0], -1, gh, gw)
            hs, ws = h // s, w // s
            if (hs, ws) != (gh, gw):
                f = F.interpolate(f, size=(hs, ws), mode="bilinear", align_corners=False)
            outs.append(f.contiguous())
        return outs

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.check_size(*x.shape[-2:])
        keep = self._tower_out
        if keep is None or self.depth < 2:
            tokens, _, grid = run_vit(self.visual, x, take=self.levels, upto=self.levels[-1])
        else:   # run every block once and keep what the text side needs (`keep_tower_output`)
            take = tuple(sorted(set(self.levels) | {self.depth - 2}))
            outs, final, grid = run_vit(self.visual, x, take=take)
            tokens = [outs[take.index(lv)] for lv in self.levels]
            keep.append({"final": final, "pre_last": outs[take.index(self.depth - 2)], "grid": grid})
        return self._pyramid(tokens, grid, x.shape[-2:])

    @contextlib.contextmanager
    def keep_tower_output(self):
        """Within the block every `forward` runs the whole tower and appends its final tokens, the tokens
        before the last block and the grid to the yielded list, so `vlm.TextScorer.features_from_tower`
        scores the same pass instead of running the tower a second time (``extract --text``). Towers
        of one block keep nothing."""
        self._tower_out = []
        try:
            yield self._tower_out
        finally:
            self._tower_out = None

    def config(self) -> dict:
        out = {"name": self.name, "levels": list(self.levels), "mean": list(self.mean), "std": list(self.std),
               "quick_gelu": self.quick_gelu}
        if self._strides_given:
            out["strides"] = list(self.strides)
        if self._model_cfg is not None:
            out["model_cfg"] = copy.deepcopy(self._model_cfg)
        return out

    # ------------------------------------------------------------ export / text side
    def embed(self, x: torch.Tensor) -> dict:
        """dict(cls (N, width), image_embedding (N, embed_dim), L2-normalised) — runs every block."""
        self.check_size(*x.shape[-2:], m=self.patch_size)
        _, t, _ = run_vit(self.visual, x)
        pooled, _ = pool_vit(self.visual, t)
        return {"cls": pooled, "image_embedding": F.normalize(project(self.visual, pooled), dim=-1)}

    def patch_embeddings(self, x: torch.Tensor, mode: str = "tokens") -> torch.Tensor:
        """(N, embed_dim, H/p, W/p): final patch tokens through ln_post and the visual projection, normalised.
        ``mode='value'``: the last block uses an identity attention map (MaskCLIP-style)."""
        if mode not in ("tokens", "value"):
            raise BadInputError(f"patch mode must be 'tokens' or 'value', got {mode!r}")
        self.check_size(*x.shape[-2:], m=self.patch_size)
        _, t, (gh, gw) = run_vit(self.visual, x, value_last=mode == "value")
        _, tok = pool_vit(self.visual, t)
        e = F.normalize(project(self.visual, tok), dim=-1)
        return e.transpose(1, 2).reshape(x.shape[0], -1, gh, gw)


def create_clip_backbone(name: str, weights: str = "random", levels=None, **kw) -> ClipViT:
    """Registry factory for ``clip:<open_clip model name>``."""
    return ClipViT(name, weights=weights, levels=levels, **kw)


register_backbone(PREFIX, create_clip_backbone)
