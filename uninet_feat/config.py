"""Run configuration: one flat plain dict (open_clip style), YAML file + CLI flags on top of defaults.

Every run writes its resolved config, library versions and seed beside its outputs
(``config.yaml`` and ``env.json``), so a run can be re-created exactly.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import platform
import random
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import yaml

from .data.tiling import TILE_SCORES
from .errors import BadInputError
from .io import atomic_write_text, user_yaml
from .model.uninet import DEFAULTS as MODEL_DEFAULTS

DEFAULT_CONFIG: dict = {
    # data
    "data": None, "split_csv": None, "group": None, "mask_pattern": None,
    "image_size": 256, "tile": None, "tile_overlap": 0, "tile_score": "max",
    # "position": a tile's score less the training normals' median score at its place (positions.py); "none"
    "tile_norm": "none",
    "val_fraction": 0.1, "supervised": False, "skip_bad": False,
    # what the stable split of split-less layouts hashes (runs.assign_splits): "relative" = each image's path
    # below --data, the same however --data is spelled; a run config without the key is older and used
    # "path" (the path as typed), which its evaluate/calibrate keep so its split does not change
    "split_hash": "relative",
    # label folders holding split-named folders (good/train/, hole/test/) take that split (session 52); a run
    # config without the key drew their split by hash and keeps doing so
    "label_split_folders": True,
    # the validation normals (runs._validation_split): "group" = a group's normals in the data's own validation
    # split (validation/, `val` rows) where it has one, else a drawn val_fraction of that group's training normals;
    # "data" (sessions 34-48) = the same, but the groups without their own split share one draw; "drawn" = always
    # one draw over all groups, what a run config without the key (before session 34) did. A run keeps its own
    "val_split": "group",
    # model selection without labels (selection.py): "last" = fixed schedule; "synthetic" = the epoch
    # whose model best separates the validation normals from synthetic defects made from them
    "select": "last", "val_every": 1, "synthetic_copies": 2,
    # the synthetic defects drawn (selection.parse_kinds): "fabric" (holes, yarns, picks, stains, oil; the
    # default), "all" (and texture_patch, a region of changed texture, for non-fabric surfaces) or a list
    "synthetic_kinds": "fabric",
    # denoising student (denoise.py): the share of training images given a synthetic defect whose loss target
    # stays the clean image's teacher features (0: off, the method), and the kinds drawn for it
    "denoise": 0.0, "denoise_kinds": "fabric",
    # levels summed into the pixel map (calibration.py): "all" (the method), "auto" (chosen after training on
    # synthetic defects of the validation normals, no labels) or a list such as [2, 3]; the WDM score uses all
    "map_levels": "all",
    # each map in its validation-normal range units before the pixel map sums them (calibration.py): "none" (the
    # method), "range" ((M - median) / (0.999 quantile - median) of its validation-normal pixels) or "auto"
    "map_norm": "none",
    # the image score (calibration.py): "wdm" (the method: the WDM of all levels' maps, raw), "map" (the same top-k
    # mean of the pixel map above) or "auto" (chosen after training on synthetic defects, no labels)
    "image_score": "wdm",
    "keep_every": 0,               # also keep the model of every N-th epoch as epochs/epoch_NNN.pt (0: none)
    # backbone
    "backbone": "tf_efficientnet_lite0", "weights": "imagenet", "levels": None,
    # the input normalisation (x - mean) / std, per channel R, G, B: None = the backbone's own (a timm CNN's pretrained
    # config; a clip: model's open_clip tag, or for a local file open_clip's for the model name, else OpenAI's). A
    # weights file trained with another one (e.g. 0.5 / 0.5) needs it given; model.pt records what the model used
    "mean": None, "std": None,
    # optimisation (method §5, one-class recipe, but 10 epochs instead of its 100 so that a first CPU run takes
    # minutes; the configs set their own; fixed schedule: the last epoch is the model)
    "epochs": 10, "batch_size": 8, "lr": 5e-3, "lr_target": 1e-6, "weight_decay": 1e-5,
    "seed": 1203, "threads": None, "channels_last": True, "eval_batch_size": 8, "cache_images": True,
    # where training runs: "auto" (the first CUDA GPU when torch sees one, else the CPU), "cpu", "cuda", "cuda:N";
    # scoring commands take their own --device (a run trained on a GPU is scored anywhere)
    "device": "auto",
    "grad_checkpointing": False,   # recompute target/bottleneck/student activations in backward: less memory, more time
    "step_in_backward": False,     # AdamW per parameter inside backward, gradients freed at once: less memory
    # model
    **{k: (list(v) if isinstance(v, tuple) else v) for k, v in MODEL_DEFAULTS.items()},
}
MODEL_KEYS = tuple(MODEL_DEFAULTS)


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None,
                base: dict | None = None) -> dict:
    """Defaults ← ``base`` ← YAML file ← non-None ``overrides``; unknown keys are refused."""
    cfg = dict(DEFAULT_CONFIG)
    cfg.update(base or {})
    if path:
        p = Path(path)
        try:
            loaded = user_yaml(p.read_text(encoding="utf-8"), p) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise BadInputError(f"cannot read config: {e}", path=p, fix="pass a readable YAML mapping") from e
        if not isinstance(loaded, dict):
            raise BadInputError("config must be a YAML mapping", path=p, fix="write `key: value` lines")
        _check_keys(loaded, p)
        cfg.update(_meant_when_absent(p, loaded))
        cfg.update(loaded)
    ov = {k: v for k, v in (overrides or {}).items() if v is not None}
    _check_keys(ov, None)
    cfg.update(ov)
    check_numbers(cfg, path, whole=True)
    check_text_options(cfg, path)
    check_switches(cfg, path)
    check_levels_and_depths(cfg, path)
    dev = str(cfg.get("device") or "auto").strip().lower()
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", dev):   # that a GPU is there is checked where it is used
        raise BadInputError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.get('device')!r}", path=path,
                            fix="device: auto (a GPU when torch sees one), or --device cpu")
    if cfg.get("tile_score", "max") not in TILE_SCORES:   # any other word silently meant the mean
        raise BadInputError(f"tile_score must be one of {', '.join(TILE_SCORES)}, got {cfg['tile_score']!r}",
                            path=path, fix="tile_score: max (the highest tile; the default), or --tile-score mean")
    check_model_choices(cfg, path)
    check_mean_std(cfg, path)
    return cfg


# what a key that a run's config.yaml lacks meant when the run trained (it was written before the key existed),
# as its evaluate, calibrate and resume read it (checkpoint_config, runs.load_samples, runs._validation_split)
MEANT_WHEN_ABSENT = {"student_relu": True, "split_hash": "path", "val_split": "drawn", "label_split_folders": False}


def _meant_when_absent(path: Path, loaded: dict) -> dict:
    """For a run's own config.yaml (beside its model.pt or checkpoint.pt) written by an older version: the values
    its missing keys had then (`MEANT_WHEN_ABSENT`), said in a warning. Why: `train --config OLD/config.yaml` filled
    today's defaults, so the re-run built another student and trained and tested on another split, while the
    saved config is what re-creates a run. A flag given beside --config still overrides them."""
    if "command" in loaded or not any((path.parent / n).is_file() for n in ("model.pt", "checkpoint.pt")):
        return {}
    absent = {k: v for k, v in MEANT_WHEN_ABSENT.items() if k not in loaded}
    if absent:
        import warnings
        warnings.warn(f"{path} is the config of a run trained by an older version, without "
                      f"{', '.join(absent)}: they take the values that run trained with "
                      f"({', '.join(f'{k}: {v}' for k, v in absent.items())}), so a run of it re-creates that run. "
                      "Fix: set them in the file (or as flags) for today's defaults")
    return absent


def _model_choices() -> dict:
    """Model options with a fixed set of values (the model code's own lists): key -> (values, fix)."""
    from .model.bottleneck import STRIDES
    from .model.dfs import MODES
    from .model.mem import FORMS
    from .model.uninet import PIXEL_MAPS
    return {"dfs": (MODES, 'dfs: "off" (the default; quoted: YAML reads a bare off as false), --dfs fixed '
                           "(the official code's theta = 1) or --dfs learned"),
            "mem": (FORMS, "mem: official (the method), or --mem multiscale"),
            "pixel_map": (PIXEL_MAPS, "pixel_map: smoothed (the default), or raw (the official unsmoothed map)"),
            "bottleneck_stride": (STRIDES, "bottleneck_stride: 2 (the method), or --bottleneck-stride 1")}


def check_model_choices(cfg: dict, path=None) -> None:
    """Refuse a ``dfs``, ``mem``, ``pixel_map`` or ``bottleneck_stride`` the model does not have, with its own
    fix: building the model raised a ValueError that was answered with the fix for decoder depths."""
    for key, (values, fix) in _model_choices().items():
        v = cfg.get(key, MODEL_DEFAULTS[key])
        ok = v in values and not isinstance(v, bool)   # True == 1: a YAML `on`/`yes` is no stride
        if not ok:
            raise BadInputError(f"{key} must be one of {', '.join(map(str, values))}, got {v!r}", path=path,
                                fix=fix)


# key: (lowest value allowed, whether it may equal it, the fix's example); None only where the default is None
# (`check_numbers`)
_RANGES = {"epochs": (1, True, "10"), "batch_size": (1, True, "8"), "eval_batch_size": (1, True, "8"),
           "image_size": (8, True, "256"), "tile": (8, True, "256"), "tile_overlap": (0, True, "0"),
           "val_fraction": (0, True, "0.1"), "val_every": (1, True, "1"), "threads": (1, True, "2"),
           "lr": (0, False, "5e-3"), "lr_target": (0, True, "1e-6"), "keep_every": (0, True, "10"),
           "seed": (0, True, "1203"), "width": (0, False, "4"), "temperature": (0, False, "2"),
           "margin": (0, True, "1"), "lam": (0, True, "0.7"), "border_pad": (0, True, "16"),
           "weight_decay": (0, True, "1e-5"), "synthetic_copies": (1, True, "2"), "denoise": (0, True, "0.5"),
           # WDM (method §6): w = max(alpha · mean of kept map maxima, beta) is the share of the map's pixels whose
           # top-k mean is the score; the maxima of 1 - cosine lie in [0, 2], so alpha <= 0.5 and beta <= 1 keep w
           # a share (k = floor(H·W·w) is clamped to [1, H·W])
           "alpha": (0, True, "0.01"), "beta": (0, True, "3e-5")}
_HIGH = {"val_fraction": (1, False), "seed": (2 ** 32 - 1, True), "lam": (1, True), "denoise": (1, True),
         "alpha": (0.5, True), "beta": (1, True)}   # (bound, inclusive)
# keys that also have a command-line flag (--batch-size); the others are set in a --config file only
_FLAGGED = {"epochs", "batch_size", "image_size", "tile", "val_fraction", "val_every", "threads", "lr", "lr_target",
            "keep_every", "seed", "width", "temperature", "border_pad", "denoise"}
_INTEGERS = {"epochs", "batch_size", "eval_batch_size", "image_size", "tile", "tile_overlap", "val_every",
             "threads", "keep_every", "seed", "border_pad", "synthetic_copies"}


def check_numbers(cfg: dict, path=None, whole: bool = False) -> None:
    """Numeric options in range, before any folder is written or model built: a batch size of 0 or a negative
    epoch count would otherwise surface as a ZeroDivisionError or an untrained model. ``whole``: ``cfg`` is a
    complete run config (`load_config`), where None (a blank `lr:` in YAML) is refused unless the key's default is
    None: it was a TypeError, some only after training; the commands' own partial checks pass None for "not given"."""
    for key, (low, inclusive, example) in _RANGES.items():
        v = cfg.get(key)
        if v is None and whole and DEFAULT_CONFIG.get(key) is not None:
            raise BadInputError(f"{key} has no value (a blank `{key}:` in YAML is null)", path=path,
                                fix=f"e.g. `{key}: {example}` in a config file, or leave the key out for its "
                                    f"default ({DEFAULT_CONFIG[key]})")
        if v is None or (key == "lr_target" and v == 0):
            continue
        integer = key in _INTEGERS
        if isinstance(v, str) and not integer:   # YAML 1.1 reads `lr: 5e-3` (no dot) as a string
            try:
                v = cfg[key] = float(v)
            except ValueError:
                pass
        ok = (isinstance(v, int) if integer else isinstance(v, (int, float))) and not isinstance(v, bool)
        ok = ok and math.isfinite(v) and (v >= low if inclusive else v > low)
        if key in _HIGH:
            top, top_in = _HIGH[key]
            ok = ok and (v <= top if top_in else v < top)
        if key == "tile_overlap" and ok and cfg.get("tile"):
            ok = v < cfg["tile"]
        if not ok:
            what = "an integer" if integer else "a number"
            high = f" and {'<=' if _HIGH[key][1] else '<'} {_HIGH[key][0]}" if key in _HIGH else ""
            bound = f"{'>=' if inclusive else '>'} {low}{high}"
            bound += f" and < tile ({cfg.get('tile')})" if key == "tile_overlap" and cfg.get("tile") else ""
            raise BadInputError(f"{key} must be {what} {bound}, got {v!r}", path=path,
                                fix=f"e.g. `{key}: {example}` in a config file" + (
                                    f", or --{key.replace('_', '-')} {example}" if key in _FLAGGED else ""))


def _as_group(v, path):
    """A ``group`` as text: YAML reads `group: 2024` as a number, which `runs.load_samples` could not iterate
    (``--group 2024`` is text); a list's items likewise. A bool (`group: yes`) or a mapping is refused."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)):
        return [_as_group(x, path) for x in v]
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        return str(v)
    raise BadInputError(f"group must be a name or a list of names, got {v!r}", path=path,
                        fix='quote it, e.g. `group: "2024"`, or --group NAME')


def check_switches(cfg: dict, path=None) -> None:
    """The on/off options (those whose default is a bool) must be YAML booleans: a quoted `supervised: "false"` is
    the text "false", which Python takes as true (a supervised run, silently); a blank one is null."""
    for key, default in DEFAULT_CONFIG.items():
        v = cfg.get(key, default)
        if isinstance(default, bool) and not isinstance(v, (bool, np.bool_)):
            raise BadInputError(f"{key} must be true or false, got {v!r}", path=path,
                                fix=f"`{key}: true` or `{key}: false`, unquoted (or leave it out for its default, "
                                    f"{str(default).lower()})")


def check_text_options(cfg: dict, path=None) -> None:
    """``group`` as text (`_as_group`), ``mask_pattern`` a string and the two kinds lists of a usable form
    (`selection.parse_kinds`), before any folder is written: `mask_pattern: 5` was an AttributeError and
    `synthetic_kinds: off` (YAML's false) or `denoise_kinds: 3` a TypeError traceback."""
    cfg["group"] = _as_group(cfg.get("group"), path)
    pattern = cfg.get("mask_pattern")
    if pattern is not None and not isinstance(pattern, str):
        raise BadInputError(f"mask_pattern must be text such as \"{{stem}}_mask.png\", got {pattern!r}", path=path,
                            fix='e.g. `mask_pattern: "{stem}_mask.png"` (quoted), or leave it out')
    from .selection import parse_kinds
    for key in ("synthetic_kinds", "denoise_kinds"):
        try:
            parse_kinds(cfg.get(key), key)
        except BadInputError as e:
            raise BadInputError(e.reason, path=path, fix=e.fix) from None


def _whole_numbers(v) -> list[int] | None:
    """``v`` as a list of ints: a list or tuple of ints, or a "1,2,3" string (the CLI's and a YAML file's plain
    form); None for anything else (a float, a bool, a single number, words)."""
    if isinstance(v, str):
        try:
            return [int(x) for x in v.replace(" ", "").split(",") if x]   # "1,2,3," as parse_indices reads it
        except ValueError:
            return None
    if isinstance(v, (list, tuple)) and all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in v):
        return [int(x) for x in v]   # numpy's integers too
    return None


def check_levels_and_depths(cfg: dict, path=None) -> None:
    """``levels`` and ``decoder_depths`` of a usable form, and one depth per level, before the data is read or the
    model built. Without it a depth of 0 built a student stage that passed on the wrong channels (a RuntimeError in
    the first step, after the run folder was written), 2.5 or a single number was a TypeError, `decoder_depths:
    3,4,6` (a YAML string) was read as five characters, and levels [1.5, 2, 3] or [true, 2, 3] silently meant
    level 1. Any number of levels is taken (the bottleneck and the student are sized from the backbone's); which
    indices exist is the backbone's own check (a timm CNN's feature levels; a clip: ViT's blocks, three of them).
    A "3,4,6" string of depths is kept as the list it means; one of levels is left as it is (the backbone reads it,
    and a run saved with it is compared as saved on --resume)."""
    default = list(MODEL_DEFAULTS["decoder_depths"])
    depths_v = cfg.get("decoder_depths", default)
    depths = _whole_numbers(depths_v)
    if not depths or min(depths) < 1:
        raise BadInputError(f"decoder_depths must be a list of whole numbers >= 1 (the student's blocks per level, "
                            f"coarse to fine), one per level, got {depths_v!r}", path=path,
                            fix=f"e.g. `decoder_depths: {default}` in a config file (the method's, for three levels)")
    if isinstance(depths_v, str):
        cfg["decoder_depths"] = depths
    levels_v = cfg.get("levels")
    if levels_v is None:   # the backbone's default levels: their count is checked against the depths at the model
        return
    levels = _whole_numbers(levels_v)
    if not levels or min(levels) < 0 or levels != sorted(set(levels)):
        raise BadInputError(f"levels must be increasing whole numbers >= 0 (the backbone's feature indices, fine to "
                            f"coarse, no repeats), got {levels_v!r}", path=path,
                            fix="e.g. `levels: [1, 2, 3]` in a config file, or --levels 1,2,3; or leave levels out "
                                "for the backbone's default three (strides 4, 8, 16)")
    if len(levels) != len(depths):
        n = len(levels)
        example = default[:n] if n <= len(default) else [default[0]] * (n - len(default)) + default
        raise BadInputError(f"levels {levels} picks {n} feature level{'s' * (n != 1)}, but decoder_depths {depths} has "
                            f"{len(depths)} entr{'ies' if len(depths) != 1 else 'y'}: the student decoder has one "
                            "stage per level", path=path,
                            fix=f"give decoder_depths one entry per level, e.g. `decoder_depths: {example}`, or pick "
                                f"{len(depths)} levels (e.g. `levels: {list(range(1, len(depths) + 1))}`, --levels "
                                f"{','.join(map(str, range(1, len(depths) + 1)))})")


def did_you_mean(unknown, known) -> str:
    """`` (did you mean lr_target?)`` for the closest known key of each unknown one (a typo such as `lr_taget`),
    or ''. Why: the full list of 60 keys hides the one that was meant."""
    import difflib
    near = {k: m[0] for k in unknown if (m := difflib.get_close_matches(str(k), list(known), n=1, cutoff=0.75))}
    return f" (did you mean {', '.join(f'{k} -> {v}' for k, v in near.items())}?)" if near else ""


def _check_keys(d: dict, path) -> None:
    unknown = sorted(set(d) - set(DEFAULT_CONFIG))
    # another command's saved config.yaml (its `command` key; zero-shot's has prompts and patch_mode): named, as the
    # other commands name it, rather than listed as unknown keys
    saved = d.get("command") or ("zero-shot" if {"patch_mode", "prompts"} & set(unknown) else None)
    if unknown and saved and path is not None:
        raise BadInputError(f"this config was written for another command, not `train` (it is `{saved}`'s)",
                            path=path, fix=f"use it with `uninet-feat {saved} --config {path}`, or give train a "
                                           "config of its own (a run's config.yaml, or train's keys)")
    if unknown:
        raise BadInputError(f"unknown config keys {unknown}{did_you_mean(unknown, DEFAULT_CONFIG)}", path=path,
                            fix=f"use only: {', '.join(sorted(DEFAULT_CONFIG))}")


def model_options(cfg: dict) -> dict:
    """The UniNet options of a run config; keys a config from an older version lacks take their defaults."""
    opts = {k: cfg.get(k, MODEL_DEFAULTS[k]) for k in MODEL_KEYS}
    opts["decoder_depths"] = tuple(opts["decoder_depths"])
    return opts


# the libraries behind a command's results besides torch, timm and numpy (heads, clusters, indices, image decoding,
# CLIP, ONNX): their versions in env.json where installed
_RESULT_PACKAGES = ("lightgbm", "scikit-learn", "faiss-cpu", "faiss-gpu", "Pillow", "scipy", "open_clip_torch",
                    "onnx", "onnxruntime", "triton")


def _versions() -> dict:
    from importlib import metadata
    out = {}
    for name in _RESULT_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def environment(seed: int) -> dict:
    import timm
    return {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "timm": timm.__version__, "numpy": np.__version__, "packages": _versions(), "seed": seed,
            "threads": torch.get_num_threads(), "uninet_feat": __import__("uninet_feat").__version__,
            "cuda": torch.version.cuda,   # the build's; None for a CPU build. gpus: those torch sees (device: auto)
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [],
            **source_commit()}


def source_commit() -> dict:
    """The git commit of the code that ran, when it runs from a checkout (``make setup``'s editable install), and
    whether files differed from it. Why: the version number stays 0.1.0 across every change, so a run's figures
    can only be traced to the code that made them by its commit. Empty when git or the checkout is absent."""
    import subprocess
    here = Path(__file__).resolve().parent.parent
    if not (here / ".git").exists():
        return {}
    try:
        git = lambda *a: subprocess.run(["git", "-C", str(here), *a], capture_output=True, text=True,  # noqa: E731
                                        timeout=10, check=True).stdout.strip()
        return {"git_commit": git("rev-parse", "HEAD"),
                "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def save_run_config(run_dir: Path, cfg: dict, name: str = "config.yaml", resumed_at: int | None = None) -> None:
    """``cfg`` as ``name`` and the environment as env.json. ``resumed_at``: a resumed training's first epoch; the
    environment that trained the earlier epochs is kept and this one appended under ``resumes`` (a resume wrote
    over it: the first segment's commit, versions and threads were lost)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    # the environment first (importing timm for its version takes ~2 s in a command that never loaded it), then the
    # two files back to back: a kill in that gap left this command's config.yaml beside the earlier outputs and
    # env.json (an audit, session 53)
    env = environment(cfg.get("seed", 0))
    text = yaml.safe_dump(_plain(cfg), sort_keys=True)
    if resumed_at is not None:
        try:
            first = json.loads((run_dir / "env.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            first = None   # none, or damaged: this environment is all that is known
        if isinstance(first, dict):
            env = {**first, "resumes": [*first.get("resumes", []), {"at_epoch": int(resumed_at), **env}]}
    atomic_write_text(run_dir / "env.json", json.dumps(env, indent=2))
    atomic_write_text(run_dir / name, text)


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def seed_everything(seed: int) -> None:
    # before any CUDA use: without it cuBLAS matmuls are not deterministic (a GPU run has not been checked here)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@contextmanager
def restored_global_state():
    """Undo on exit what `seed_everything` and `runs.set_threads` change process-wide (deterministic algorithms,
    which also fill torch.empty with NaN; the thread count; CUBLAS_WORKSPACE_CONFIG; the random, numpy and torch RNG
    states), so a library caller's process is as it was. CUDA RNG states are kept only where CUDA was already in use:
    reading them otherwise would start CUDA on every device (every rank of a torchrun job)."""
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    threads, cublas = torch.get_num_threads(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    rng = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.set_num_threads(threads)
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.random.set_rng_state(rng[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def check_mean_std(cfg: dict, path=None) -> None:
    """``mean`` and ``std`` None (the backbone's own) or 3 numbers each (`backbones.base.check_normalisation`), kept as
    lists of floats (YAML 1.1 reads ``5e-1`` as text), and given together: one alone would pair with the other's
    default, which belongs to another normalisation."""
    from .backbones.base import check_normalisation
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None and std is None:
        return
    if mean is None or std is None:
        given, missing = ("mean", "std") if std is None else ("std", "mean")
        raise BadInputError(f"{given} is given without {missing}", path=path,
                            fix="give both, --mean R G B --std R G B (`mean: [R, G, B]` and `std: [R, G, B]` in a "
                                "config file), or neither for the backbone's own")
    try:
        m, s = check_normalisation(mean, std, "the input normalisation",
                                   "--mean R G B --std R G B (`mean: [R, G, B]`, `std: [R, G, B]` in a config file)")
    except BadInputError as e:
        raise BadInputError(e.reason, path=path, fix=e.fix) from None
    cfg["mean"], cfg["std"] = list(m), list(s)
