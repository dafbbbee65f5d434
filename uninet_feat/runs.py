"""Shared plumbing for commands: choosing samples, building datasets and the model from a config."""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from pathlib import Path

import torch

from .backbones import create_backbone
from .config import model_options
from .data.dataset import ImageDataset
from .data.layouts import discover
from .errors import BadInputError
from .model import UniNet


def load_samples(cfg: dict):
    """The samples of ``cfg``'s data (``group`` filtered), with the stable split that ``split_hash`` names."""
    if not cfg.get("data"):
        raise BadInputError("no data folder given", fix="pass --data ROOT (a folder of images, or the root a CSV is relative to)")
    samples = discover(cfg["data"], split_csv=cfg.get("split_csv"), mask_pattern=cfg.get("mask_pattern"),
                       label_splits=bool(cfg.get("label_split_folders", False)))   # absent: an older run's config
    group = cfg.get("group")
    if group:
        groups = [group] if isinstance(group, str) else list(group)
        there = sorted({s.group for s in samples} - {""})
        missing = [g for g in groups if g not in there]   # a misspelt name of a list trained on the rest silently
        samples = [s for s in samples if s.group in groups]
        if not samples or missing:
            raise BadInputError(f"no images in group(s) {missing or groups}; groups here: {', '.join(there) or 'none'}",
                                path=cfg["data"], fix="check --group against the category folders / CSV column"
                                if there else "drop --group: this data has no groups (category folders or a CSV "
                                              "group column)")
    how = cfg.get("split_hash") or "path"   # a config without the key is from a run trained before it existed
    if how not in SPLIT_HASHES:
        raise BadInputError(f"split_hash {how!r} is not one of {list(SPLIT_HASHES)}", path=cfg.get("data"),
                            fix="use split_hash: relative (or `path` only to reproduce an old run's split)")
    return assign_splits(samples, root=Path(cfg["data"]) if how == "relative" else None)


SPLIT_HASHES = ("relative", "path")


def samples_of(data, split_csv=None, group=None, split_hash=None, mask_pattern=None,
               label_split_folders=None) -> list:
    """Samples of ``data`` (a folder layout, or ``split_csv``'s rows) as `load_samples` reads a config;
    ``split_hash`` and ``label_split_folders`` from a run's config give that run's split (None: a new one's), and
    its ``mask_pattern`` its masks (without it, masks named by the pattern were images: `extract --run` stored them)."""
    from .config import load_config
    return load_samples(load_config(None, {"data": str(data), "split_csv": split_csv, "group": group,
                                           "split_hash": split_hash, "mask_pattern": mask_pattern,
                                           "label_split_folders": label_split_folders}))


def load_test_samples(cfg: dict) -> list:
    """The test split of ``cfg``'s data; refused when empty (what evaluate and ensemble score)."""
    test = [s for s in load_samples(cfg) if s.split == "test"]
    if not test:
        raise BadInputError("no test images", path=cfg.get("split_csv") or cfg["data"],
                            fix="mark rows `test` in the CSV, or use an MVTec-style test/ folder")
    return test


def absolute_data_paths(cfg: dict) -> dict:
    """``cfg`` with ``data`` and ``split_csv`` resolved to absolute paths, as a new run saves them, so that
    ``evaluate --run RUN`` (which reads them back) finds the data from any working directory."""
    out = {**cfg, **{k: str(Path(cfg[k]).expanduser().resolve()) for k in ("data", "split_csv") if cfg.get(k)}}
    w = cfg.get("weights")   # a weights file too: a clip: run reads its text tower from it again (extract --text)
    if isinstance(w, str) and Path(w).expanduser().is_file():   # a link kept: a clip: file's name says its activation
        out["weights"] = os.path.abspath(Path(w).expanduser())   # and normalisation (resolved, an annexed ViT-B-32.pt
        # became a hash and trained with GELU, while extract and zero-shot read the link's name as QuickGELU)
    return out


def assign_splits(samples, root=None):
    """Samples without a split (a layout without one) get a stable one: ~20% of normals (by path hash) and all
    defects are test.

    A hash, not a random draw, so the split never changes between runs or machines. With ``root`` the
    hash is of the path below it (posix), so ``lf``, ``/abs/lf`` or a moved copy give the same split;
    without it, of the path as written (``split_hash: path``, runs trained before ``relative`` existed).
    """
    for s in samples:
        if s.split:   # given (a CSV group with splits beside a group without: only the latter's are drawn)
            continue
        key = _split_key(s.path, root) if root is not None else str(s.path)
        h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 5
        s.split = "test" if (not s.is_normal or h == 0) else "train"
    return samples


def _split_key(path, root) -> str:
    """``path`` below ``root`` as posix text; discovery builds every path as ``root / ...``, so this is
    lexical (no resolving); an absolute CSV path outside the root keeps its own absolute form."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).absolute().as_posix()


def train_val_samples(samples, cfg: dict):
    """Training normals (and labelled defects when supervised), and a validation split of normals: the data's own
    (an MVTec-style ``validation/`` folder, CSV rows marked ``val``: its normals) when it has one, else a seeded
    ``val_fraction`` of the training normals.

    The validation split calibrates the score threshold and, with ``select: synthetic``, chooses the
    epoch (against synthetic defects made from it, `selection`); nothing is chosen on test labels.

    The normals come without their masks (an all-zero mask says nothing a normal label does not, and no training,
    calibration or selection reads one): a mask that cannot be used (another size, unreadable) used to stop
    `train` and `calibrate`, or with ``skip_bad`` cost its image, a validation normal. A supervised run's defects
    keep theirs: they are its training targets.
    """
    from dataclasses import replace
    samples = [replace(s, mask=None) if s.is_normal and s.mask is not None and s.split in ("train", "val") else s
               for s in samples]
    train = [s for s in samples if s.split == "train"]
    normals = [s for s in train if s.is_normal]
    if not normals:
        raise BadInputError("no normal training images", path=cfg.get("split_csv") or cfg.get("data"),
                            fix="UniNet learns from normal images: add a `good` folder or `train,good` CSV rows")
    fit, val = _validation_split(samples, normals, cfg)
    defects = [s for s in train if not s.is_normal]
    if defects and cfg.get("supervised"):
        fit = fit + defects
    elif cfg.get("supervised"):   # label folders put every defect in test: nothing to supervise with
        warnings.warn("--supervised, but the training split holds no defective image, so the run is one-class "
                      "(fix: a --split-csv with defects in its train rows)")
    elif defects:
        warnings.warn(f"{len(defects)} defective training images ignored (unsupervised run; pass --supervised to use them)")
    return fit, val


def split_paths(fit, val, root=None) -> dict:
    """{"fit": [...], "val": [...]}: the sorted paths of a run's training and validation samples, below ``root``
    (the run's data folder: a moved copy is the same split) as `assign_splits` keys them; plain lists of str, so
    ``torch.load(weights_only=True)`` reads them from checkpoint.pt."""
    def keys(samples):
        return sorted(_split_key(s.path, root) if root is not None else str(s.path) for s in samples)
    return {"fit": keys(fit), "val": keys(val)}


def split_digest(fit, val, root=None) -> dict:
    """The identity of a run's split, saved in checkpoint.pt and model.pt: the sha256 of `split_paths`' two lists
    and their lengths. The validation split is drawn from the sorted training normals, so a normal added to the
    folder redraws it, and a normal the model trained on becomes a validation normal; a resume (`check_split`),
    and a calibration, compare it with the split the data gives now."""
    paths = split_paths(fit, val, root)
    return {**{k: hashlib.sha256("\n".join(v).encode()).hexdigest() for k, v in paths.items()},
            "n_fit": len(fit), "n_val": len(val)}


def check_split(ckpt: dict, fit, val, root=None, where=None) -> None:
    """Refuse a split (``fit``, ``val``: the data's now) other than the one ``ckpt`` (a checkpoint's dict) trained
    on, naming a few images added and removed when it holds `split_paths` (checkpoint.pt), else the counts. A
    checkpoint without a `split_digest` (written before it was saved) is not compared."""
    saved = ckpt.get("split")
    now = split_digest(fit, val, root)
    if not saved or all(now[k] == saved.get(k) for k in ("fit", "val")):
        return
    was = ckpt.get("split_paths")
    if was:
        new, old = split_paths(fit, val, root), {k: set(v) for k, v in was.items()}
        added = sorted(set(new["fit"] + new["val"]) - old["fit"] - old["val"])
        removed = sorted((old["fit"] | old["val"]) - set(new["fit"] + new["val"]))
        moved = sorted(set(new["val"]) & old["fit"])

        def some(names):
            return f"{len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
        what = "; ".join(f"{label} {some(n)}" for label, n in (("added", added), ("removed", removed),
                                                               ("trained on, now validation", moved)) if n)
    else:
        what = (f"{now['n_fit']} training and {now['n_val']} validation images now, {saved.get('n_fit')} and "
                f"{saved.get('n_val')} when it trained")
    raise BadInputError(f"the data's training images differ from those the run trained on ({what}): the validation "
                        "split is drawn anew from them, so the run would now validate and calibrate on other normals, "
                        "some of them trained on", path=where,
                        fix="restore the data folder as it was, or train a new run with a new --out")


VAL_SPLITS = ("group", "data", "drawn")


def _validation_split(samples, normals: list, cfg: dict):
    """(fit, val) of the training ``normals``. A group with normals in the data's own validation split
    (``validation/``, ``val`` rows) takes those, and trains on all its training normals (``val_split`` group and
    data). ``group`` (new runs since session 49): each other group draws its own seeded ``val_fraction`` share, so
    every group of a multi-class run gets its share (with one draw over all, AITEX's fabric_00 got 2 of 17
    validation strips), and a one-group run's split is the one ``data`` drew. ``data`` (sessions 34-48) gives the
    other groups one draw together, as ``drawn`` does over all (a run's config without the key: runs trained before
    session 34); each run keeps the split it trained with."""
    from .data.layouts import split_train_val
    how = cfg.get("val_split") or "drawn"
    if how not in VAL_SPLITS:
        raise BadInputError(f"val_split {how!r} is not one of {list(VAL_SPLITS)}", path=cfg.get("data"),
                            fix="use val_split: group (the data's own validation split where a group has one, else a "
                                "draw per group), data or drawn")
    given = [s for s in samples if s.split == "val"] if how in ("group", "data") else []
    if given and not cfg["val_fraction"]:
        warnings.warn(f"val_fraction is 0, so the data's {len(given)} validation image(s) are not used")
        return normals, []
    own = [s for s in given if s.is_normal]
    if len(own) < len(given):
        warnings.warn(f"{len(given) - len(own)} defective validation image(s) are not used: validation holds normals "
                      "only" + ("" if own else ", and with none the validation normals are drawn from the training "
                                                "normals") + " (fix: move them to the test split to have them scored)")
    covered = {s.group for s in own}
    rest = [s for s in normals if s.group not in covered]
    pools = ([[s for s in rest if s.group == g] for g in sorted({s.group for s in rest}, key=str)]
             if how == "group" else [rest])
    drawn = [s for pool in pools if cfg["val_fraction"] and pool
             for s in split_train_val(pool, cfg["val_fraction"], cfg["seed"])[1]]
    out = {id(s) for s in drawn}
    return [s for s in normals if id(s) not in out], own + drawn


def make_dataset(samples, cfg: dict, backbone, mask_resize: str = "nearest") -> ImageDataset:
    return ImageDataset(samples, image_size=cfg["image_size"], tile=cfg.get("tile"),
                        overlap=cfg.get("tile_overlap", 0), mean=tuple(backbone.mean), std=tuple(backbone.std),
                        skip_bad=cfg.get("skip_bad", False), mask_resize=mask_resize)


def eval_batches(ds, cfg: dict, device=None):
    """(batch, model input) over ``ds`` in order at the run's eval batch size, the input on ``device`` (the
    model's: `model_device`) and channels_last when the run uses it: the scoring loop of
    `evaluate.score_samples` and `calibration.map_ranges`. The batch itself stays on the CPU."""
    # a generator of its own: a loader without one draws its base seed from the caller's global RNG
    for batch in torch.utils.data.DataLoader(ds, batch_size=cfg.get("eval_batch_size", 8), shuffle=False,
                                             generator=torch.Generator()):
        x = batch["image"] if device is None else batch["image"].to(device)
        yield batch, (x.contiguous(memory_format=torch.channels_last) if cfg.get("channels_last") else x)


DEVICES = "auto, cpu, cuda or cuda:N"
_default_device = "cpu"   # the library's, as torch's: a caller's CPU tensors meet a CPU model; the CLI sets auto


def pick_device(name=None) -> torch.device:
    """The device named ``name`` (None: the one `use_device` set: the CPU in the library, ``--device`` (auto) in
    the commands): ``auto`` is the first CUDA GPU when torch sees one, else the CPU. A GPU that is not there is
    refused, not replaced by the CPU: a run asked to use one would otherwise take hours where minutes were
    planned, silently."""
    raw = str(_default_device if name is None else name).strip().lower()
    if raw == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(raw)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise BadInputError(f"device {name!r} is not one this tool runs on", fix=f"--device {DEVICES}")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise BadInputError(f"device {name!r}: torch sees no CUDA GPU here (torch {torch.__version__}, CUDA "
                                f"build: {torch.version.cuda or 'no'})", fix="--device cpu (or auto)")
        if dev.index is not None and dev.index >= n:
            raise BadInputError(f"device {name!r}: torch sees {n} CUDA GPU(s), numbered from 0",
                                fix=f"--device cuda:{n - 1} or lower, or auto")
    return dev


def use_device(name) -> torch.device:
    """Set the device that commands put their models on (`pick_device`'s default); returns it resolved."""
    global _default_device
    dev = pick_device(name)
    _default_device = str(name).strip().lower()
    return dev


def model_device(model) -> torch.device:
    """Where ``model``'s weights are (the CPU for a model without any): its inputs are moved there."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


# what a clip: backbone works out from its weights file's name (`clip.file_normalisation`, `file_quick_gelu`): a
# resumed run keeps what its checkpoint recorded, so that a version that reads the name otherwise changes nothing
_FROM_FILE_NAME = ("mean", "std", "quick_gelu")


def make_model(cfg: dict, saved_backbone: dict | None = None) -> UniNet:
    """The UniNet ``cfg`` describes. ``saved_backbone``: a resumed run's checkpoint record of its backbone
    (``state["backbone"]``), whose input normalisation and activation a clip: backbone keeps (a run started before
    they were read from the file's name trained with OpenAI's mean/std and GELU: resumed, it would train on others)."""
    kw = {}
    if saved_backbone and str(cfg["backbone"]).startswith("clip:"):
        kw = {k: saved_backbone[k] for k in _FROM_FILE_NAME if saved_backbone.get(k) is not None}
    mean, std = kw.pop("mean", cfg.get("mean")), kw.pop("std", cfg.get("std"))
    from .checkpoint import float32_default
    with float32_default():   # whatever the host's default dtype (its float64 model met float32 images at step 1)
        backbone = create_normalised_backbone(cfg["backbone"], cfg["weights"], mean, std, levels=cfg.get("levels"),
                                              **kw)
        try:
            return UniNet(backbone, **model_options(cfg))
        except ValueError as e:   # options that do not fit this backbone (e.g. 2 levels, 3 decoder depths); values
            # the model never takes (dfs, mem, pixel_map, bottleneck_stride) are refused by load_config first
            fix = next((f for words, f in _MODEL_FIXES if words in str(e)),
                       "check the option the message names against docs/usage.md, or train with its default")
            raise BadInputError(f"the model options do not fit backbone {cfg['backbone']} at levels "
                                f"{list(backbone.levels)}: {e}", fix=fix) from e


def create_normalised_backbone(name, weights, mean=None, std=None, **kw):
    """``create_backbone(name, weights=weights, **kw)`` with the input normalisation ``mean``/``std`` when given (a
    config's, `config.check_mean_std`); refused when the backbone does not take it (a factory that ignores them
    would train on another normalisation than the run records)."""
    if mean is None and std is None:
        return create_backbone(name, weights=weights, **kw)
    from .config import check_mean_std
    given = {"mean": mean, "std": std}
    check_mean_std(given)
    mean, std = tuple(given["mean"]), tuple(given["std"])
    try:
        bb = create_backbone(name, weights=weights, mean=mean, std=std, **kw)
    except TypeError as e:
        bb, why = None, f" ({e})"
    else:
        why = ""
    if bb is None or not all(math.isclose(float(a), b, rel_tol=1e-6)
                             for a, b in zip((*bb.mean, *bb.std), (*mean, *std))):
        raise BadInputError(f"backbone {name} does not take an input normalisation of its own{why}",
                            fix="drop --mean/--std (mean/std in the config) for it, or give its factory mean= and "
                                "std= arguments")
    return bb


# make_model's fix for the model's ValueErrors, by words of their message; any other gets a plain one
_MODEL_FIXES = (("border_pad", "--border-pad a multiple of the pixels the message names (the backbone's coarsest "
                               "stride), or 0"),
                ("must have one entry per level", "give decoder_depths one entry per level (e.g. [3, 4, 6] for "
                                                  "three), or --levels with three levels"),
                ("whole numbers >= 1", "give decoder_depths whole numbers >= 1, one per level (e.g. [3, 4, 6])"),
                ("student_relu", "give student_relu one entry per level, true or false, or auto"))


def input_sides(model) -> tuple[int, int, str]:
    """(step, least, why): the network input sides ``model`` takes are the multiples of ``step`` from ``least`` on.
    ``step`` is the bottleneck's stride, and for a ViT also its patch grid (``size_multiple``; both pads keep it,
    `_border_pad`); ``least`` is the first such side larger than ``border_pad`` (a mirror reflects at most the input
    itself); ``why`` says where ``step`` comes from. One rule for `train` and for scoring a run at another size."""
    stride, pad = model.bottleneck.out_stride, getattr(model, "border_pad", 0)
    grid = int(getattr(model.source, "size_multiple", 1) or 1)
    step = math.lcm(stride, grid)
    why = f"bottleneck works at stride {stride}" + (f", its input on a grid of {grid}" if grid > 1 else "")
    return step, (pad // step + 1) * step, why


def side_fix(side: int, step: int, least: int) -> str:
    """The ``--image-size`` values nearest ``side`` (off ``step``) that a model of `input_sides` (step, least) takes."""
    low, high = side // step * step, max(least, (side // step + 1) * step)
    return f"{low} or {high}" if low >= least else str(high)


def check_input_side(model, side: int, run, own: int | None = None) -> None:
    """Refuse scoring a finished run at a network input of ``side`` px (`extract --run RUN --image-size N`) that the
    model cannot take, before any image is read: a side off the bottleneck's stride, or one no larger than the run's
    ``border_pad`` (a mirror reflects at most the input itself), was a ValueError traceback from the first forward,
    whose fix ("a smaller border_pad") cannot be applied to a trained run. ``own``: the run's own image_size."""
    step, least, why = input_sides(model)
    pad = getattr(model, "border_pad", 0)
    own_txt = f" (the run's own is {own})" if own else ""
    if side % step:
        raise BadInputError(f"image_size {side} must be a multiple of {step} for this run's backbone (its {why})",
                            path=run, fix=f"--image-size {side_fix(side, step, least)}{own_txt}, or drop --image-size")
    if pad >= side:
        raise BadInputError(f"image_size {side} is too small for this run's border_pad {pad}: the network sees "
                            f"{pad} px of the input mirrored around it, and a mirror reflects at most the input "
                            "itself", path=run, fix=f"--image-size {least} or larger{own_txt}, or drop --image-size")


def set_threads(cfg: dict) -> None:
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))


def ready_to_score(model, cfg: dict, group=None, skip_bad: bool = False, threads: bool = True):
    """``model`` (channels-last when the run trained so) with ``cfg`` set for scoring a finished run: ``group``
    when given, ``skip_bad`` as asked now (not as the run was trained), its thread count (``threads``: torch's
    process-wide setting; a host process embedding a `Detector` keeps its own)."""
    if group is not None:
        own = cfg.get("group")
        own = None if own is None else [own] if isinstance(own, str) else [str(g) for g in own]
        if own is not None and str(group) not in own:   # a run of a list of groups scores each of them
            raise BadInputError(f"this run was trained on group {cfg['group']!r} only; its model, threshold and "
                                f"offsets are that group's, so group {group!r}'s figures would not be",
                                fix=f"use a run trained on {group!r} (`train --group {group}`) or one trained on "
                                    "every group (no --group), or drop --group")
        cfg["group"] = group
    cfg["skip_bad"] = bool(skip_bad)
    if threads:
        set_threads(cfg)
    return model.to(memory_format=torch.channels_last) if cfg.get("channels_last") else model


class CachedDataset(torch.utils.data.Dataset):
    """Keeps decoded, resized items in memory after first use: decoding dominates CPU epochs otherwise.

    Bounded: at most ``max_bytes`` (default `memory_budget`: a quarter of the memory, shared by torchrun's
    processes on the machine) are kept; items past it are decoded again each epoch, with the same values, so a
    large folder costs time instead of a kill for memory (the cache grew by 16·S² bytes per training image, 75 GB
    for 72,000 images at 256 px). A normal item's all-zero mask is kept once per shape, not once per item."""

    def __init__(self, ds, max_bytes: int | None = None):
        self.ds, self.cache, self.nbytes, self._zeros = ds, {}, 0, {}
        self.max_bytes = memory_budget() if max_bytes is None else int(max_bytes)
        self.full = False

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = self.cache.get(i)
        if item is not None:
            return item
        item = self.ds[i]
        m = item.get("mask")
        shared = torch.is_tensor(m) and not m.any()   # one zero mask per shape, counted once (not here)
        if shared:
            item = {**item, "mask": self._zeros.setdefault((tuple(m.shape), m.dtype), torch.zeros_like(m))}
        size = sum(v.numel() * v.element_size() for k, v in item.items()
                   if torch.is_tensor(v) and not (shared and k == "mask"))
        if self.nbytes + size <= self.max_bytes:
            self.cache[i], self.nbytes = item, self.nbytes + size
        elif not self.full:
            self.full = True
            warnings.warn(f"the decoded training images outgrow the memory cache ({self.max_bytes / 2**30:.1f} GB, "
                          f"this process's share of a quarter of the memory): {len(self.cache)} of {len(self.ds)} "
                          "are kept, the others are decoded again each epoch (the same values, more time). Fix: "
                          "none needed; `cache_images: false` in a --config skips the cache", stacklevel=2)
        return item


def memory_budget(share: float = 0.25) -> int:
    """``share`` of the memory this process may use, in bytes: the machine's physical memory or, when lower, the
    container's limit (cgroup v2 or v1), divided between the processes torchrun starts on this machine
    (``LOCAL_WORLD_SIZE``), since each keeps its own cache. 8 GiB where the OS does not say."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = 32 * 2 ** 30
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            total = min(total, int(Path(limit).read_text().split()[0]))   # "max": no limit
        except (OSError, ValueError, IndexError):
            pass
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return int(share * total / local)


def run_folder(run: str | Path, what: str = "the run") -> Path:
    """A run given as its folder or its ``model.pt`` (what a user copies from a listing): the folder. Another file
    (checkpoint.pt, a kept epoch) is refused, since the folder's model.pt would be scored in its place."""
    p = Path(run)
    if not p.is_file():
        return p
    if p.name != "model.pt":
        fix = f"{what} {p.parent} (its model.pt)" + ("; `evaluate --checkpoint FILE` scores another model file of "
                                                      "the run" if p.suffix == ".pt" else "")
        raise BadInputError(f"{what} takes a run folder (or its model.pt), not this file", path=run, fix=fix)
    return p.parent


def run_path(run: str | Path, name: str) -> Path:
    p = Path(run) / name
    if not Path(run).is_dir():
        raise BadInputError("no such run folder", path=run,
                            fix="pass the --out folder of a finished `uninet-feat train`")
    if not p.exists():
        raise BadInputError(f"{name} not found in run folder", path=run,
                            fix="pass the --out folder of a finished `uninet-feat train`")
    return p
