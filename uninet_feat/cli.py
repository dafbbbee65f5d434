"""`uninet-feat` command line: every command takes a YAML --config and flags that override it."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path

from .errors import BadInputError


def _common_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of options (flags override it)")
    p.add_argument("--data", help="image folder (root/<label>/*, MVTec-style) or the root a --split-csv is relative to")
    p.add_argument("--split-csv", dest="split_csv", help="CSV manifest path,split,label[,mask][,group]")
    p.add_argument("--group", help="train/evaluate one category only (one-class); default: all (multi-class)")
    p.add_argument("--backbone", help="timm model name, or clip:ARCH for the VLM variant (default "
                                      "tf_efficientnet_lite0)")
    p.add_argument("--weights", help="imagenet | random | PATH to a local checkpoint (default imagenet)")
    _normalisation_flags(p)
    p.add_argument("--levels", type=lambda s: [int(v) for v in s.split(",")], help="feature levels, fine to coarse, e.g. 1,2,3 (the default three); decoder_depths needs one entry per level")
    p.add_argument("--image-size", dest="image_size", type=int,
                   help="side of the square model input, or of each tile (default 256)")
    p.add_argument("--tile", type=int, help="tile large images into TILE×TILE pieces (e.g. 256 for fabric strips)")
    p.add_argument("--tile-score", dest="tile_score", choices=["max", "mean"],
                   help="a tiled image's score: its highest tile's (a defect in any tile; default) or the mean")
    p.add_argument("--epochs", type=int, help="fixed schedule: the last epoch is the model (default 10)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="(default 8)")
    p.add_argument("--lr", type=float, help="learning rate of the student, bottleneck and DFS (default 0.005)")
    p.add_argument("--lr-target", dest="lr_target", type=float,
                   help="learning rate of the trainable target teacher (default 1e-6, the method's; it uses 1e-4 for "
                        "one MVTec class)")
    p.add_argument("--seed", type=int, help="same seed, same scores; it also draws the validation split "
                                            "(default 1203)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", help="auto (a CUDA GPU when torch sees one, else the CPU; default), cpu, cuda or "
                                    "cuda:N")
    p.add_argument("--mem", choices=["official", "multiscale"], help="MEM as the official code runs it (two 3x3 "
                   "branches) or the paper's 3x3 + 7x7, re-parameterised for inference (default official)")
    p.add_argument("--dfs", choices=["learned", "fixed", "off"], help="domain-related feature selection: learned "
                   "theta, parameter-free, or off (default off)")
    p.add_argument("--temperature", "-T", type=float, help="T of the similarity-contrastive loss (default 2.0)")
    p.add_argument("--width", type=float,
                   help="inner width of the bottleneck and the student, x the official sizing from the backbone "
                        "(default 1)")
    p.add_argument("--bottleneck-stride", dest="bottleneck_stride", type=int, choices=[1, 2],
                   help="the bottleneck's embedding stride, x the coarsest level's: 2 (the method, default) or 1, "
                        "which keeps the coarsest level's grid (measured worse on magnetic tile at 128 px: the student "
                        "then reconstructs defects too; docs/results.md)")
    p.add_argument("--border-pad", dest="border_pad", type=int,
                   help="pixels of mirrored context the network sees around each input, cropped off its features, "
                        "so that defects at the border are not hidden by the convolutions' zero padding (a multiple "
                        "of the backbone's coarsest stride, e.g. 16 for EfficientNet-Lite0; default 0)")
    p.add_argument("--select", choices=["last", "synthetic"],
                   help="which epoch becomes model.pt: the last (fixed schedule, default) or the one that best "
                        "separates the validation normals from synthetic defects made from them (no labels)")
    p.add_argument("--val-every", dest="val_every", type=int,
                   help="with --select synthetic: validate every N epochs (default 1, every epoch)")
    _kinds_flag(p, "the synthetic defects that --select synthetic and the auto map choices use")
    _tile_norm_flag(p, " (default none: each tile's own score)")
    p.add_argument("--val-fraction", dest="val_fraction", type=float,
                   help="share of the training normals held out as validation normals, which set the threshold and "
                        "the label-free choices (default 0.1; with n of them a new normal passes the default threshold "
                        "with probability (0.01 n + 0.99) / (n + 1): 24 for under 5 %%, 2 %% at 100); data with its "
                        "own validation split (validation/, `val` CSV rows) gives its normals instead, unless this is 0")
    p.add_argument("--keep-every", dest="keep_every", type=int,
                   help="also keep every N-th epoch's model as epochs/epoch_NNN.pt (evaluate --checkpoint; "
                        "default 0: none kept)")
    p.add_argument("--map-levels", dest="map_levels",
                   help="levels summed into the pixel map: all (the method, default), auto (chosen after training "
                        "on synthetic defects of the validation normals, no labels) or a list such as 2,3")
    p.add_argument("--map-norm", dest="map_norm", choices=["none", "range", "auto"],
                   help="each level's map in its validation-normal range units before the pixel map sums them: "
                        "none (the method, default), range, or auto (chosen with --map-levels on synthetic defects)")
    p.add_argument("--image-score", dest="image_score", choices=["wdm", "map", "auto"],
                   help="the image score: wdm (the method's WDM of all maps, default), map (the same top-k mean of "
                        "the pixel map --map-levels / --map-norm make), or auto (map only when it ranks synthetic "
                        "defects of the validation normals better, no labels)")
    p.add_argument("--denoise", type=float,
                   help="denoising student: this share of the training images gets a synthetic defect, and the "
                        "student's target stays the clean image's teacher features (default 0: the method)")
    p.add_argument("--denoise-kinds", dest="denoise_kinds",
                   help="the synthetic defects drawn for --denoise: fabric (default), all, or names")
    # on/off (--no-X): a store_true flag could turn on what a --config file left off, never the other way
    p.add_argument("--supervised", action=argparse.BooleanOptionalAction, default=None,
                   help="use labelled defects (and masks) in the training split")
    p.add_argument("--skip-bad", dest="skip_bad", action=argparse.BooleanOptionalAction, default=None,
                   help="skip unreadable images with a warning instead of stopping")
    p.add_argument("--grad-checkpointing", dest="grad_checkpointing", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="recompute activations in backward: about 0.6x the peak memory (WideResNet-50-2, 256 px; "
                        "0.8x for Lite0 at 128 px) for about 1.15x the step time (same results)")
    p.add_argument("--step-in-backward", dest="step_in_backward", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="update each parameter as soon as its gradient is complete and free the gradient: "
                        "one parameter copy less at the peak (same results; not with torchrun)")


def _normalisation_flags(p) -> None:
    """--mean / --std: the input normalisation of a weights file trained with its own (recorded in the run)."""
    p.add_argument("--mean", nargs=3, type=float, metavar=("R", "G", "B"),
                   help="input normalisation (x - mean) / std of images in [0, 1], with --std: for a weights file "
                        "trained with another than the backbone's own (default: a timm model's pretrained config; "
                        "a clip: model's open_clip tag, or for a local file open_clip's for the model name, else "
                        "OpenAI's), e.g. --mean 0.5 0.5 0.5 --std 0.5 0.5 0.5")
    p.add_argument("--std", nargs=3, type=float, metavar=("R", "G", "B"),
                   help="per-channel std of the input normalisation, each above 0 (with --mean)")


def _threshold_args(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--threshold", type=_finite, help="flag images whose score is above this value")
    g.add_argument("--max-fpr", dest="max_fpr", type=float,
                   help="flag with the lowest threshold that flags at most this fraction of the run's validation "
                        "normals (default: their 0.99 quantile)")


def _finite(text: str) -> float:
    """--threshold: a finite number, refused with an example before any work (nan was refused only once the run was
    loaded, with no fix)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number, e.g. 0.5 (or --max-fpr 0.01: the "
                                         "threshold from the validation normals)")
    return v


def _size_wxh(text: str) -> tuple[int, int]:
    """'4096x256' → (4096, 256)."""
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 4096x256") from None
    return w, h


def _skip_bad_flag(p) -> None:
    p.add_argument("--skip-bad", dest="skip_bad", action="store_true",
                   help="leave unreadable images out with a warning naming each (listed as `skipped` in the "
                        "output) instead of stopping with an error that names them all")


def _kinds_flag(p, what: str, default: str = "fabric") -> None:
    p.add_argument("--synthetic-kinds", dest="synthetic_kinds",
                   help=f"{what}: fabric (holes, yarns, picks, stains, oil), all (and texture_patch, a region of "
                        "changed texture, for tiles and other non-fabric surfaces) or names such as "
                        f"hole,texture_patch (default: {default})")


def _tile_norm_flag(p, default: str) -> None:
    p.add_argument("--tile-norm", dest="tile_norm", choices=["none", "position", "neighbours"],
                   help="tiled images: position scores each tile less the training normals' median score at its "
                        "place, so an edge that is high on every strip does not set the strip's score; neighbours "
                        "less the median of the 3 training tiles at its place that look most like it (an edge "
                        f"whose place drifts between images){default}")


_DEVICE_COMMANDS = ("evaluate", "ensemble", "calibrate", "extract", "index", "predict", "zero-shot", "demo")
_TRAIN_KEYS = ("data", "split_csv", "group", "backbone", "weights", "levels", "image_size", "tile", "tile_score",
               "epochs", "batch_size", "lr", "lr_target", "seed", "threads", "device", "mem", "dfs", "temperature", "width",
               "bottleneck_stride", "select", "val_every", "synthetic_kinds", "val_fraction", "keep_every",
               "map_levels", "map_norm", "image_score", "tile_norm", "supervised", "skip_bad", "grad_checkpointing",
               "step_in_backward", "denoise", "denoise_kinds", "border_pad", "mean", "std")


class _AppendOverDefault(argparse.Action):
    """``action="append"`` whose first value on the command line starts a new list: argparse's own appends to the
    default, which is a ``--config`` file's list (`_apply_config`), so `--config C --head B` kept C's heads too,
    though flags override the config."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = getattr(namespace, self.dest, None)
        items = [] if items is None or items is self.default else list(items)   # the default: unchanged, replaced
        setattr(namespace, self.dest, items + [values])


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that keeps its options by destination (``options``) and its mutually exclusive ones
    (``exclusive``), so that a ``--config`` file can be checked against them without argparse's private
    ``_actions``; sub-commands inherit the class. No abbreviations: argparse read `--conf F` as --config, which
    `_apply_config` did not see, so the file was silently ignored."""

    def __init__(self, *args, **kw):
        self.options: dict[str, argparse.Action] = {}   # before super(): it adds --help
        self.exclusive: list[list[argparse.Action]] = []
        kw.setdefault("allow_abbrev", False)
        super().__init__(*args, **kw)

    def add_argument(self, *args, **kw):
        if kw.get("action") == "append":   # a repeated flag replaces a --config's list instead of adding to it
            kw["action"] = _AppendOverDefault
        action = super().add_argument(*args, **kw)
        self.options[action.dest] = action
        return action

    def add_mutually_exclusive_group(self, **kw):
        """A group whose options are recorded too (--threshold / --max-fpr live in one)."""
        group = super().add_mutually_exclusive_group(**kw)
        add = group.add_argument
        members: list[argparse.Action] = []
        self.exclusive.append(members)

        def add_recorded(*args, **kw):
            action = add(*args, **kw)
            self.options[action.dest] = action
            members.append(action)
            return action
        group.add_argument = add_recorded
        return group


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="uninet-feat", description=__doc__)
    from . import __version__
    ap.add_argument("--version", action="version", version=f"uninet-feat {__version__}",
                    help="print the version and exit (each run's env.json records it with the packages')")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train UniNet on normal images")
    _common_train_flags(p)
    p.add_argument("--out", required=True, help="run folder (checkpoints, config, logs)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("evaluate", help="score the test split and print/write metrics")
    p.add_argument("--run", required=True)
    p.add_argument("--data")
    p.add_argument("--split-csv", dest="split_csv")
    p.add_argument("--group", help="score only this group (category) of a multi-group data set")
    p.add_argument("--json", help="write the metrics JSON here")
    p.add_argument("--csv", help="write per-image scores here")
    p.add_argument("--report", help="write a self-contained HTML report here")
    p.add_argument("--checkpoint", help="evaluate this model file of the run instead of model.pt (e.g. "
                                         "checkpoint.pt = the last epoch, or epochs/epoch_010.pt); its threshold and "
                                         "colours come from its own validation-normal scores")
    p.add_argument("--pixel-map", dest="pixel_map", choices=["smoothed", "raw"],
                   help="pixel map for P-AUROC/AUPRO and the --report overlays (default: the run's pixel_map, "
                        "smoothed unless its config says raw)")
    p.add_argument("--knn", help="kNN index folder (uninet-feat index): also report its image metrics and those of "
                                 "kNN + WDM combined (as predict's combined_score)")
    p.add_argument("--pixel-budget", dest="pixel_budget", type=int,
                   help="map pixels kept for exact P-AUROC / AUPRO (default 2^28, ~1 GiB of maps); past it each map "
                        "is binned as it is scored and freed, so memory stays flat (figures of the binned scores)")
    _threshold_args(p)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the run's, else torch's)")
    _skip_bad_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars or tables; print the result as JSON")

    p = sub.add_parser("ensemble", help="evaluate several runs (e.g. seeds of one config) and their ensemble: "
                                        "their scores averaged, flagged above their thresholds' mean")
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--data")
    p.add_argument("--split-csv", dest="split_csv")
    p.add_argument("--group", help="score only this group (category) of a multi-group data set")
    p.add_argument("--json", help="write the ensemble's metrics JSON here")
    p.add_argument("--csv", help="write per-image ensemble and per-run scores here")
    p.add_argument("--pixel-budget", dest="pixel_budget", type=int,
                   help="mean-map pixels kept for exact P-AUROC / AUPRO (default 2^28), as evaluate's")
    _skip_bad_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars or tables; print the result as JSON")

    p = sub.add_parser("calibrate", help="re-score a run's validation normals (thresholds for --max-fpr)")
    p.add_argument("--run", required=True)
    p.add_argument("--normals", help="a folder of normal images the run never trained on (any depth), calibrated on "
                                     "instead of the held-out validation split from now on: thresholds, --max-fpr, "
                                     "colour scale, pixel threshold; `split` goes back to the split (default: keep "
                                     "the run's)")
    p.add_argument("--data", help="where the training data is now (default: where it was)")
    p.add_argument("--split-csv", dest="split_csv")
    p.add_argument("--map-levels", dest="map_levels",
                   help="levels summed into the pixel map: all (the method), auto (chosen on synthetic defects of "
                        "the validation normals, no labels) or a list such as 2,3; default: keep the run's")
    p.add_argument("--map-norm", dest="map_norm", choices=["none", "range", "auto"],
                   help="each level's map in its validation-normal range units before the sum: none (the method), "
                        "range, or auto (chosen on synthetic defects, no labels); default: keep the run's")
    p.add_argument("--image-score", dest="image_score", choices=["wdm", "map", "auto"],
                   help="the image score: wdm (the method), map (the same top-k mean of the pixel map), or auto "
                        "(chosen on synthetic defects, no labels); default: keep the run's")
    _kinds_flag(p, "the synthetic defects the auto choices are made on", default="the run's")
    _tile_norm_flag(p, "; default: keep the run's")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("extract", help="export image (and patch) feature vectors into a sharded store")
    p.add_argument("--data", required=True)
    p.add_argument("--split-csv", dest="split_csv")
    p.add_argument("--group", help="extract only this group (category) of a multi-group data set")
    p.add_argument("--run", help="trained run (domain-adapted features); omit for plain backbone features")
    p.add_argument("--backbone", help="backbone when no --run (default tf_efficientnet_lite0)")
    p.add_argument("--weights", default="imagenet")
    _normalisation_flags(p)
    p.add_argument("--image-size", dest="image_size", type=int)
    p.add_argument("--tile", type=int, help="tile large images into TILE x TILE pieces (default: the run's "
                   "tiling; none without --run)")
    p.add_argument("--patches", action="store_true", help="also store patch vectors (for kNN)")
    p.add_argument("--batch", action="store_true", help="read --data as predict does: every image under it, "
                   "unlabelled unless its layout has a normal folder (a folder of images alone is read so anyway); "
                   "DIR/<group>/ images take a multi-group run's group of that name, --group G gives every image G")
    p.add_argument("--text", nargs="?", const=True, default=None, metavar="PROMPTS_YAML",
                   help="clip: backbones: append zero-shot text-similarity columns (default fabric prompts, "
                        "or a prompt file from `uninet-feat prompts`)")
    p.add_argument("--shard", default="0/1", help="i/n: extract every n-th shard starting at i")
    p.add_argument("--shard-size", dest="shard_size", type=int, default=256,
                   help="images per shard (tiles, with --tile): a killed run redoes at most one shard (default 256)")
    _skip_bad_flag(p)
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("index", help="FAISS index / kNN scorer over extracted features")
    p.add_argument("--features", required=True)
    p.add_argument("--kind", choices=["flat", "ivfpq", "hnsw"], default="flat")
    p.add_argument("--level", choices=["patch", "image"], default="patch")
    p.add_argument("--coreset", type=float, help="memory-bank fraction kept (patch level only; default 0.1)")
    p.add_argument("--k", type=int, help="neighbours averaged into a patch's kNN distance (patch level only; "
                                         "default 1)")
    p.add_argument("--run", help="leave this run's validation normals out of the memory bank (patch level only; "
                                 "automatic for features of a run), so predict can standardise kNN scores on them")
    p.add_argument("--out", required=True)

    p = sub.add_parser("train-head", help="LightGBM head on extracted image vectors, with a CV report")
    p.add_argument("--features", required=True)
    p.add_argument("--task", choices=["binary", "multiclass"], default="binary")
    p.add_argument("--label-from", dest="label_from", choices=["label", "group/label"], default="label",
                   help="class names: the label (e.g. d022), or group/label (fabric_03/d022: one class per "
                        "group and code; default label)")
    p.add_argument("--defects-only", dest="defects_only", action="store_true",
                   help="multiclass over defect types only (normal rows left out)")
    p.add_argument("--folds", type=int, default=5, help="stratified CV folds (at most the largest class; a class "
                                                        "with fewer rows is tested in fewer folds)")
    p.add_argument("--threads", type=int, help="LightGBM threads (default: OMP_NUM_THREADS when set, else the "
                                                "cores this process may use; recorded in cv_report.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds, the early-stopping carve and LightGBM "
                                                       "(default 0)")
    p.add_argument("--labels", help="a CSV path,label (e.g. `cluster`'s labels.csv with the clusters named): these "
                                     "labels, for these images only, in place of the store's own")
    p.add_argument("--out", required=True)

    p = sub.add_parser("cluster", help="group flagged (or labelled defect) images into candidate defect types, with "
                                       "a contact sheet, to name them for train-head --labels")
    p.add_argument("--features", required=True, help="a feature store of a run (`uninet-feat extract --run RUN`)")
    p.add_argument("--flagged", help="predict's predictions.csv: cluster the images it flagged (default: every "
                                     "image not labelled normal)")
    p.add_argument("--k", default="auto", type=_cluster_k,
                   help="number of clusters (2 or more), or auto (highest silhouette; default)")
    p.add_argument("--max-k", dest="max_k", type=int, default=10, help="largest k that auto tries (default 10)")
    p.add_argument("--columns", choices=["descriptors", "all"], default="descriptors",
                   help="descriptors: the top tile's defect descriptors (each level's spot features less its "
                        "tile's mean, the hot region's shape and place; default); all: every image-vector column")
    p.add_argument("--seed", type=int, default=0, help="seed of the PCA and k-means starts (default 0)")
    p.add_argument("--group", help="cluster this group's images only (a store of several products)")
    p.add_argument("--no-sheet", dest="sheet", action="store_false", help="skip sheet.html (the thumbnails)")
    p.add_argument("--out", required=True)

    p = sub.add_parser("predict", help="scores, flags, kNN scores and head predictions per image")
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True, help="one image, or a folder: every image in it and below it "
                                                  "(unlabelled unless it is a labelled layout)")
    p.add_argument("--split-csv", dest="split_csv")
    p.add_argument("--knn", help="folder written by `index --level patch`")
    p.add_argument("--head", action="append", default=[], help="folder written by `train-head` (repeatable)")
    p.add_argument("--no-overlays", dest="overlays", action="store_false")
    p.add_argument("--ensemble", nargs="+", default=[], metavar="RUN",
                   help="more runs of the same config (other seeds): adds ensemble_score, the mean of the runs' "
                        "WDM scores, which then flags images above the mean of their thresholds (see `uninet-feat "
                        "ensemble`)")
    p.add_argument("--flag-by", dest="flag_by", choices=["wdm", "knn", "combined", "ensemble"], default=None,
                   help="the score that flags images (knn / combined need --knn, ensemble --ensemble); its threshold "
                        "comes from its own scores on the run's validation normals, like WDM's; ensemble's is the "
                        "mean of the runs' thresholds and refuses --max-fpr (default: ensemble with --ensemble, "
                        "else wdm)")
    p.add_argument("--heatmap", choices=["wdm", "knn", "combined", "ensemble"], default=None,
                   help="the map the overlays of flagged images show: WDM's, the kNN patch distances (--knn), "
                        "both in their validation-normal range units, summed (combined, --knn), or the runs' "
                        "maps in those units, averaged (ensemble; default with --ensemble, else wdm)")
    p.add_argument("--text", nargs="?", const=True, default=None, metavar="PROMPTS_YAML",
                   help="add text-similarity columns, as `extract --text` (needed by heads trained on them)")
    p.add_argument("--group", help="the group of every image, e.g. fabric_04 (a multi-class run with "
                                   "--tile-norm position compares tiles with that group's normals)")
    _threshold_args(p)
    p.add_argument("--save-maps", dest="save_maps", action="store_true",
                   help="also write every image's WDM pixel map at its own size (maps/<folders>__<name>.npy, "
                        "float16; names as the overlays') and its defect mask (maps/<folders>__<name>_mask.png: "
                        "pixels above the pixel threshold)")
    p.add_argument("--pixel-threshold", dest="pixel_threshold", type=float,
                   help="with --save-maps: the map value above which a pixel is defect (default: the 0.999 "
                        "quantile of the validation normals' map pixels, from calibration.json)")
    _skip_bad_flag(p)
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("export-model", help="a trained run as one ONNX file (model.onnx + model.json) for a line's "
                                            "own runtime: ONNX Runtime, OpenVINO, TensorRT")
    p.add_argument("--run", required=True)
    p.add_argument("--input-size", dest="input_size", type=_size_wxh,
                   help="tiled runs: WxH of the images the model will get, e.g. 4096x256 (default: the training "
                        "images' size when they had one); untiled runs take any size")
    p.add_argument("--group", help="tiled runs with --tile-norm position over several groups: whose place offsets")
    _threshold_args(p)
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (18 or later: the antialiased resize)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip running the file in ONNX Runtime against the run (done by default when installed)")
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("zero-shot", help="score images with CLIP text prompts only (no training images)")
    p.add_argument("--data", required=True)
    p.add_argument("--split-csv", dest="split_csv")
    p.add_argument("--group", help="score only this group (category) of a multi-group data set")
    p.add_argument("--backbone", required=True, help="a clip: backbone, e.g. clip:ViT-B-16")
    p.add_argument("--weights", required=True, help="the whole open_clip checkpoint (both towers), or a tag")
    _normalisation_flags(p)
    p.add_argument("--quick-gelu", dest="quick_gelu", action=argparse.BooleanOptionalAction, default=None,
                   help="the towers' activation: QuickGELU (OpenAI-trained weights) or GELU (--no-quick-gelu); "
                        "default: what the weights file's name or hub folder says (recorded in config.yaml)")
    p.add_argument("--prompts", help="prompt YAML (write the defaults with `uninet-feat prompts`)")
    p.add_argument("--image-size", dest="image_size", type=int, default=None,
                   help="side of the square model input, or of each tile (default: the model's native size, 224 "
                        "for most CLIP models)")
    p.add_argument("--tile", type=int, help="tile large images into TILE x TILE pieces")
    p.add_argument("--patch-mode", dest="patch_mode", choices=["tokens", "value"], default="tokens",
                   help="patch features: CLIP's final tokens through its projection (tokens, default) or the "
                        "last block's value path, MaskCLIP-style (value)")
    _skip_bad_flag(p)
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("prompts", help="write the default normal/defect prompt file, to edit")
    p.add_argument("--object", default="fabric", help="what the images show (fills {} in the prompts)")
    p.add_argument("--out", required=True)

    p = sub.add_parser("demo", help="synthetic woven fabric → train → evaluate → report, in a few minutes")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int, default=None, help="training epochs of the demo (default 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, tables or summary (the demo's "
                                                        "summary.json holds it)")
    for name in _DEVICE_COMMANDS:   # train has its own (a config key, recorded in the run)
        where = "the coreset and the FAISS index are built" if name == "index" else "the model runs"
        sub.choices[name].add_argument("--device", help=f"where {where}: auto (a CUDA GPU when torch sees "
                                                        "one, else the CPU; default), cpu, cuda or cuda:N")
    for name, sp in sub.choices.items():
        if name != "train":   # train's --config holds model/training options (uninet_feat.config)
            sp.add_argument("--config", help="YAML file: flag names (without --) → values; flags override it")
    for name, sp in sub.choices.items():   # flags that many commands share get their help in one place
        for a in sp._actions:
            if not a.option_strings or a.option_strings[0] == "-h":
                continue
            text = a.help or _help_of(name, a.option_strings[0])
            if a.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text and a.nargs != 0:
                text = f"{text} (default {a.default})".strip()   # a switch (--no-overlays) has no value to show
            a.help = text or " "
    ap.commands = sub.choices
    return ap


def _cluster_k(text: str):
    """``--k``: auto (any case), or a whole number of 2 or more."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of clusters, or auto") from None
    if k < 2:
        raise argparse.ArgumentTypeError(f"{k}: at least 2 clusters, or auto")
    return k


_SHARED_HELP = {
    "--run": "run folder written by `uninet-feat train --out` (or its model.pt)",
    "--runs": "two or more run folders of one config (e.g. other --seed values)",
    "--data": "image folder (label folders, MVTec-style), or the root a --split-csv is relative to",
    "--split-csv": "CSV manifest path,split,label[,mask][,group] with paths relative to --data",
    "--quiet": "no progress bars (the result is printed as JSON either way)",
    "--features": "feature store written by `uninet-feat extract --out`",
    "--weights": "imagenet | random | PATH to a local weights file, for plain features without --run (default "
                 "imagenet); with --run the run's own are used and another --weights is refused",
    "--image-size": "side of the square model input, or of each tile (default: the run's own with --run, where "
                    "another size is warned; 256 without)",
    "--no-overlays": "write no heatmap overlays (scores and flags only)",
}
_OUT_HELP = {"evaluate": None, "calibrate": None, "extract": "feature store folder (sharded, resumable)",
             "index": "index folder (knn.json or ids.json, the FAISS index)",
             "train-head": "head folder (head.json, model.txt, cv_report.json)",
             "cluster": "output folder (clusters.csv, labels.csv to name, clusters.json, sheet.html)",
             "predict": "output folder (predictions.csv / .json, summary.json, overlays/, maps/)",
             "zero-shot": "output folder (scores.csv / .json, metrics.json when labels exist)",
             "export-model": "folder for model.onnx, model.json (inputs, outputs, thresholds, the check) and "
                             "run_config.yaml",
             "prompts": "YAML file to write", "demo": "demo folder (data, run, report; default runs/demo)"}


def _help_of(command: str, flag: str) -> str:
    return (_OUT_HELP.get(command) if flag == "--out" else _SHARED_HELP.get(flag)) or ""


def _apply_config(ap: argparse.ArgumentParser, argv: list[str]) -> None:
    """``--config FILE`` of a non-train command: its keys become that command's defaults (flags still win)."""
    cmd = argv[0] if argv and not argv[0].startswith("-") else None
    if cmd not in ap.commands or cmd == "train" or not any(a == "--config" or a.startswith("--config=")
                                                         for a in argv):
        return
    # the last one, as argparse keeps it (and train reads it): the first was read here, the last named in args
    i = max(j for j, a in enumerate(argv) if a == "--config" or a.startswith("--config="))
    given = argv[i].split("=", 1)[1] if "=" in argv[i] else (argv[i + 1] if i + 1 < len(argv) else "")
    path = Path(os.path.expanduser(given))   # a quoted '~/c.yaml' reaches us unexpanded, as other path flags do
    import yaml
    from .io import user_yaml
    try:
        d = user_yaml(path.read_text(encoding="utf-8"), path) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise BadInputError(f"cannot read config ({type(e).__name__}: {e})", path=path,
                            fix="pass a readable YAML mapping of flag names to values") from e
    if not isinstance(d, dict):
        raise BadInputError("config must be a YAML mapping", path=path, fix="write `flag-name: value` lines")
    saved = d.pop("command", cmd)
    if saved != cmd:
        raise BadInputError(f"this config was written for another command, not `{cmd}`", path=path,
                            fix=f"use it with `uninet-feat {saved} --config {given}`, or give `{cmd}` a config of its "
                                "own (its --out's config.yaml, or flag names without --)")
    sp = ap.commands[cmd]
    actions = {d: a for d, a in sp.options.items() if d not in ("help", "config")}
    values = {str(k).replace("-", "_"): v for k, v in d.items()}
    record_only = set()
    if cmd == "zero-shot":   # its config.yaml also records the resolved run settings: accepted, not flags
        from .config import DEFAULT_CONFIG, _plain
        record_only = set(DEFAULT_CONFIG) - set(actions)
        # at the values zero-shot scores with; another (tile_overlap: 32, tile_score: mean) was dropped unsaid
        changed = sorted(k for k in record_only & set(values) if _plain(values[k]) != _plain(DEFAULT_CONFIG[k]))
        if changed:
            raise BadInputError(f"{', '.join(f'{k}: {values[k]!r}' for k in changed)}: zero-shot takes no "
                                f"such setting (it scores with {', '.join(f'{k}: {DEFAULT_CONFIG[k]!r}' for k in changed)})",
                                path=path, fix=f"remove {'it' if len(changed) == 1 else 'them'} from the config; "
                                               f"zero-shot's settings are: {', '.join(sorted(actions))}")
    values = {k: v for k, v in values.items() if k not in record_only}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        from .config import did_you_mean
        raise BadInputError(f"unknown keys {unknown} for `{cmd}`{did_you_mean(unknown, actions)}", path=path,
                            fix=f"use only: {', '.join(sorted(actions))}")
    typed = {a.split("=", 1)[0] for a in argv[1:] if a.startswith("-")}
    for k, v in values.items():
        if v is None and actions[k].required and not set(actions[k].option_strings) & typed:
            raise BadInputError(f"{k} has no value (a blank `{k}:` in YAML is null), and {cmd} needs its "
                                f"{actions[k].option_strings[0]}", path=path,
                                fix=f"give {k} a value in the file, or pass {actions[k].option_strings[0]}")
        actions[k].required = False
        if isinstance(actions[k], _AppendOverDefault) and not isinstance(v, list):   # `head: DIR`: one of them
            v = [] if v is None else [v]
        values[k] = _config_value(actions[k], k, v, path)
    for group in sp.exclusive:   # a flag typed now wins over its exclusive partner from the file (--max-fpr over
        if any(set(a.option_strings) & typed for a in group):   # a saved threshold), as over its own value
            for a in group:
                if not set(a.option_strings) & typed and a.dest in values:
                    values[a.dest] = None
    sp.set_defaults(**values)


def _config_value(action: argparse.Action, key: str, value, path: Path):
    """A ``--config`` value checked as argparse checks the flag's (it checks only the command line's): its
    ``type`` (on the text of a number or bool YAML read, so `folds: 2.5` or `threshold: yes` is refused, not
    truncated or taken as 1) and its ``choices``, each item of a list; a number for a text flag (`group: 2024`)
    as text. Why: `pixel-map: smooth` silently scored the raw map, `level: patches` built an image index."""
    flag = action.option_strings[0]
    if action.nargs == 0:   # a switch: a YAML bool, as train's `config.check_switches` asks; a quoted "false" is
        # text, which turned it on. Null only where the default is "not given" (--quick-gelu: the weights say)
        if isinstance(value, bool) or value is None and action.default is None:
            return value
        default = "" if action.default is None else f", {str(action.default).lower()}"
        raise BadInputError(f"{key} must be true or false, got {value!r}", path=path,
                            fix=f"`{key}: true` or `{key}: false`, unquoted (or leave it out for its default{default})")
    if value is None:
        if action.default is not None and (action.type is not None or action.choices is not None):
            raise BadInputError(f"{key} has no value (a blank `{key}:` in YAML is null)", path=path,
                                fix=f"give {flag}'s value, or leave the key out for its default ({action.default})")
        return None
    many = action.nargs not in (None, "?") or isinstance(action, _AppendOverDefault)
    if isinstance(value, dict) and action.dest == "prompts":   # zero-shot's config.yaml records its sentences
        return value

    def refuse(v):   # a list or mapping where the flag takes one value: a TypeError deep in the command
        raise BadInputError(f"{key} takes {'a list of single values' if many else 'one value'}, as {flag} does, "
                            f"got {v!r}", path=path, fix=f"e.g. `{key}: [A, B]`" if many else
                            f"one value, as {flag} takes it: `{key}: VALUE`")
    if isinstance(value, dict):
        refuse(value)
    if isinstance(value, (list, tuple)) and not many:
        if action.choices is not None:
            raise BadInputError(f"{key} takes one value, one of {', '.join(map(str, action.choices))}, got "
                                f"{value!r}", path=path, fix=f"e.g. `{key}: {next(iter(action.choices))}`")
        if action.type is not _size_wxh:
            refuse(value)
        try:   # a value its type made (export-model's input_size, saved as [W, H]): the command takes it
            _size_wxh("x".join(map(str, value)))
        except argparse.ArgumentTypeError as e:
            raise BadInputError(f"{key}: {value!r} is not a valid {flag} value ({e})", path=path,
                                fix=f"e.g. `{key}: [4096, 256]` or `{key}: 4096x256`") from None
        return value
    if action.const is not None:   # --text's optional file: true, or the file
        return value
    if action.nargs in ("+", "*") and not isinstance(value, (list, tuple)):   # `runs: RUN`: one of them, not
        value = [value]                                                       # its letters

    def one(v):
        if isinstance(v, (list, tuple, dict)):
            refuse(v)
        if action.type is None:
            if isinstance(v, bool):   # YAML reads off / no / on / yes as false / true: `group: off` was False, "no
                raise BadInputError(   # group", and scored every group
                    f"{key}: YAML read this value as {str(v).lower()} (off, no, on, yes and true / false are "
                    f"booleans to it), and {flag} takes text", path=path,
                    fix=f"quote it: `{key}: 'off'` (or whatever text was meant)")
            if isinstance(v, (int, float)):   # a text flag: 2024 is the name "2024"
                v = str(v)
        else:   # argparse converts a string default too, but names no file when it fails
            try:
                v = action.type(v if isinstance(v, str) else str(v))
            except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                raise BadInputError(f"{key}: {v!r} is not a valid {flag} value ({e})", path=path,
                                    fix=f"give {key} a value as {flag} takes it") from None
        if action.choices is not None and v not in action.choices:
            raise BadInputError(f"{key} must be one of {', '.join(map(str, action.choices))}, got {v!r}",
                                path=path, fix=f"e.g. `{key}: {next(iter(action.choices))}`")
        return v
    return [one(v) for v in value] if isinstance(value, (list, tuple)) else one(value)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as a user reads it: one line, no source path or code line (those are for developers)."""
    kind = "" if category is UserWarning else f" ({category.__name__})"
    print(f"warning{kind}: {message}", file=file or sys.stderr)


_NEGATIVE_EXPONENT = re.compile(r"^-(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _joined_exponent_values(argv: list) -> list:
    """``--threshold -1e-3`` as ``--threshold=-1e-3``: argparse takes a negative number only without an exponent as a
    value and stopped at "expected one argument", while a position-corrected threshold near 0 is printed so by
    summary.json (an audit, session 52)."""
    out = []
    for tok in argv:
        if out and _NEGATIVE_EXPONENT.match(tok) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={tok}"
        else:
            out.append(tok)
    return out


def main(argv: list[str] | None = None) -> int:
    if argv is None:   # the command line (console script, python -m); a caller passing argv keeps its own display
        warnings.showwarning = _show_warning
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:   # `torchrun ... -m uninet_feat -- extract --run R` (else torchrun takes --run itself)
        argv = argv[1:]
    argv = _joined_exponent_values(argv)
    ap = build_parser()
    try:
        _apply_config(ap, argv)
    except BadInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args = ap.parse_args(argv)
    try:
        _user_paths(args)
    except BadInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:   # `--run RUN/model.pt`: the run is the folder the model is in
        for flag in ("run", "runs", "ensemble"):
            v = getattr(args, flag, None)
            if v:
                setattr(args, flag, _run_folder(v, flag) if isinstance(v, str) else [_run_folder(r, flag) for r in v])
    except BadInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "train-head" and args.threads is None:   # recorded as used: LightGBM's model text names the
        from .downstream.head import default_threads            # count, so `--config OUT/config.yaml` under
        args.threads = default_threads()                        # another OMP_NUM_THREADS made another head
    from . import runs
    device_before = runs._default_device   # --device is the command's: a host process calling main keeps its own
    try:
        out = getattr(args, "out", None)
        # train's folder lock, and the one-writer commands' (`_command_lock`), remove them themselves
        if args.command not in ("train", "prompts", *_ONE_WRITER) and isinstance(out, str) and Path(out).is_dir():
            _remove_dead_temps(Path(out))
        from .thresholds import said_once
        with warnings.catch_warnings(), _command_lock(args), _records_first(args) as flush, said_once():
            code = _dispatch(args)   # _dispatch sets the commands' warning filters: a host keeps its own
            flush()   # its records also when it wrote nothing there (else they came before its first output)
        return code
    except BadInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # e.g. an output under /proc, or --out naming an existing file: one line, no traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e} (fix: check the path; outputs need a writable folder)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # in train's first epoch there is no checkpoint.pt yet, and --resume is refused
        then = _CONTINUE.get(args.command, "re-run the command")
        if args.command == "train" and not (Path(args.out) / "checkpoint.pt").is_file():
            then = "no epoch was saved yet: re-run the same command (without --resume) to start over"
        print(f"interrupted: finished outputs are kept; {then}", file=sys.stderr)
        return 130
    finally:
        runs._default_device = device_before


# commands whose --out is theirs alone while they write it; `extract`'s jobs share theirs (`--shard i/n`)
_ONE_WRITER = ("index", "train-head", "cluster", "predict", "export-model", "zero-shot")


def _command_lock(args):
    """The folder a command writes, locked against other processes while it runs (`io.folder_lock`). Why: two
    commands into one --out (a pipeline step retried while the first still ran, or another command) each passed
    `_check_out_is_its_own` and mixed their files: one head's booster beside the other's CV report. `calibrate`
    writes into its run, so it waits for no one but is refused while `train` trains that run (its calibration
    would describe a model about to be replaced). train takes its own lock; demo, evaluate and ensemble write files."""
    from .io import folder_lock
    if args.command in _ONE_WRITER:
        return folder_lock(args.out, f"{args.command} output")
    if args.command == "extract":
        return folder_lock(args.out, "feature store", shared=True,
                           fix="wait for it to finish, or choose another --out (the jobs of one sharded extract, "
                               "`--shard i/n` with the same arguments, may share it)")
    if args.command == "calibrate" and Path(args.run).is_dir():   # else calibrate says what is wrong with --run
        return folder_lock(args.run, "run", fix="wait for its training (or the other calibrate) to finish")
    return contextlib.nullcontext()


def _remove_dead_temps(out: Path) -> None:
    """Temp files that a kill mid-write left in a command's --out and its subfolders: those of writers that are gone
    (`io.remove_dead_temps`; a live writer's is kept). train's folder lock removes its run's; the others' stayed."""
    from .io import remove_dead_temps
    for sub in [out, *(d for d in out.iterdir() if d.is_dir())]:
        remove_dead_temps(sub)


def _run_folder(value: str, flag: str) -> str:
    """A run flag's value as a run folder (`runs.run_folder`): `RUN/model.pt` names its folder."""
    from .runs import run_folder
    return str(run_folder(value, f"--{flag}")) if Path(value).is_file() else value


_CONTINUE = {"train": "re-run with --resume to continue",
             "extract": "re-run the same command to continue (finished shards are kept)"}


_OWN_RECORDS = ("train", "zero-shot", "demo", "evaluate", "ensemble", "prompts", "calibrate")


def _save_command_config(args) -> None:
    """Beside a command's outputs: ``config.yaml`` (every resolved flag; reusable as ``--config``) and
    ``env.json``. train, zero-shot and demo write their own. extract's is the store's, not one `--shard` job's
    (the jobs write one store: a re-run of a job's record built only its shards); index's patch-level bank
    states its coreset share and k."""
    if args.command in _OWN_RECORDS:
        return
    from .config import save_run_config
    opts = {k: _absolute(k, v) for k, v in vars(args).items() if k not in ("config", "command")}
    if args.command == "extract":
        opts["shard"] = "0/1"
    if args.command == "index" and args.level == "patch":
        from .workflows import INDEX_DEFAULTS
        opts.update({k: v for k, v in INDEX_DEFAULTS.items() if opts.get(k) is None})
    save_run_config(Path(args.out), {"command": args.command, **opts})


def _records_first(args):
    """A folder command's records written just before its first output (`io.records_first`); a refused command
    writes no output and leaves the folder's earlier records with the earlier outputs they describe."""
    out = getattr(args, "out", None)
    if args.command in _OWN_RECORDS or not isinstance(out, str):
        return contextlib.nullcontext(lambda: _save_command_config(args))
    from .io import records_first
    return records_first(out, lambda: _save_command_config(args))


_PATH_FLAGS = ("data", "split_csv", "run", "runs", "out", "features", "knn", "head", "ensemble", "text", "weights",
               "flagged", "labels", "normals")
_INPUT_FOLDERS = ("run", "ensemble", "knn", "head", "features")   # folders a command reads: never its --out


_OUTPUT_FILES = ("json", "csv", "report")


def _user_paths(args) -> None:
    """``~`` expanded in every path flag (a quoted '~/x', or one from a --config YAML, reaches us unexpanded), and
    an output file that names a folder refused before any work (it failed at the end, naming a temp file)."""
    for k in _PATH_FLAGS + _OUTPUT_FILES + ("checkpoint", "prompts", "config"):
        v = getattr(args, k, None)
        if k == "normals" and v == "split":   # `calibrate --normals split`: a word, not a path
            continue
        if isinstance(v, str):
            setattr(args, k, os.path.expanduser(v))
        elif isinstance(v, list):
            setattr(args, k, [os.path.expanduser(x) if isinstance(x, str) else x for x in v])
    for k in _OUTPUT_FILES:
        v = getattr(args, k, None)
        if isinstance(v, str) and Path(v).is_dir():
            raise BadInputError(f"--{k} names a folder, not a file", path=v,
                                fix=f"give a file name, e.g. --{k} {Path(v) / ('report.html' if k == 'report' else 'metrics.' + k)}")
        if isinstance(v, str):   # a folder it cannot write in failed only after all the scoring
            up = _nearest_existing(Path(os.path.abspath(v)).parent)
            if not up.is_dir() or not os.access(up, os.W_OK | os.X_OK):
                what = "not a folder" if not up.is_dir() else "read-only"
                raise BadInputError(f"--{k} cannot be written: {up} is {what}", path=v,
                                    fix=f"give --{k} a path in a folder you can write")
    _check_output_files_are_not_inputs(args)
    out = getattr(args, "out", None)
    if isinstance(out, str) and getattr(args, "command", None) != "prompts":   # --out is a folder (prompts': a file)
        up = _nearest_existing(Path(os.path.abspath(out)))
        if not up.is_dir():   # predict, export-model, ... failed at mkdir after all their scoring
            here = up == Path(os.path.abspath(out))
            alt = Path(out).with_suffix("") if Path(out).suffix else Path(f"{out}_out")
            raise BadInputError(f"--out must be a folder, and {up} is a file", path=out,
                                fix=f"give --out a folder, e.g. --out {alt}" if here else
                                f"give --out a path whose folders are not files ({up} is one)")
        if not os.access(up, os.W_OK | os.X_OK):
            raise BadInputError(f"--out cannot be written: {up} is read-only", path=out,
                                fix="give --out a folder you can write")
        if args.command != "train":   # train refuses a used run folder itself (or resumes it)
            _check_out_is_its_own(args, out)


_RUN_RECORDS = ("model.pt", "checkpoint.pt", "best.pt", "calibration.json", "config.yaml", "env.json",
                "train_log.jsonl")


def _check_output_files_are_not_inputs(args) -> None:
    """Refuse --json / --csv / --report naming one file twice, or a file the command reads: a run's own records
    (model.pt, calibration.json, ..., epochs/), its split CSV or the --split-csv given, the --config or --checkpoint.
    `evaluate --run R --report R/model.pt` replaced the model with the report, and `--csv split.csv` (for
    --split-csv) the run's manifest with the scores, after which evaluate scored another test set without a word
    (an audit, session 52)."""
    import yaml
    outs = {k: os.path.realpath(v) for k in _OUTPUT_FILES if isinstance(v := getattr(args, k, None), str)}
    if not outs:
        return
    seen: dict = {}
    for k, p in outs.items():
        if p in seen:
            raise BadInputError(f"--{seen[p]} and --{k} name one file: the second would replace the first",
                                path=getattr(args, k), fix=f"give --{k} a file of its own")
        seen[p] = k
    reads = {os.path.realpath(v): f"--{k.replace('_', '-')}" for k in ("split_csv", "config", "checkpoint")
             if isinstance(v := getattr(args, k, None), str)}
    runs = [getattr(args, k, None) for k in ("run", "runs", "ensemble")]
    for r in [x for v in runs for x in (v if isinstance(v, list) else [v]) if isinstance(x, str)]:
        folder = os.path.realpath(r)
        reads.update({os.path.join(folder, n): f"the run's {n}" for n in _RUN_RECORDS})
        try:
            own = (yaml.safe_load(Path(folder, "config.yaml").read_text(encoding="utf-8")) or {}).get("split_csv")
        except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
            own = None
        if isinstance(own, str):
            reads[os.path.realpath(own)] = "the run's split CSV"
        for k, p in outs.items():
            if p.startswith(os.path.join(folder, "epochs") + os.sep):
                reads[p] = "one of the run's kept epochs"
    for k, p in outs.items():
        if p in reads:
            other = Path(getattr(args, k)).with_name(f"{k}_out.{'html' if k == 'report' else k}")
            raise BadInputError(f"--{k} would write over {reads[p]}, which this command reads", path=getattr(args, k),
                                fix=f"give --{k} another file name (e.g. {other})")


def _check_out_is_its_own(args, out: str) -> None:
    """Refuse an ``--out`` that is an input folder of the command (``--run``, ``--knn``, ...) or holds a run or
    another command's outputs. Why: the command's config.yaml and env.json replaced the folder's own, so that
    `export-model --run R --out R` or `predict --run R --out R` lost R's training record: `evaluate --checkpoint`
    then refused R's own checkpoints and `train --resume` continued from predict's config."""
    here = Path(os.path.realpath(out))
    alt = os.path.normpath(out)
    alt = f"{here if alt in ('.', '..') else alt}_{args.command.replace('-', '_')}"
    fix = f"give --out a folder of its own, e.g. --out {alt}"
    for flag in _INPUT_FOLDERS:
        values = getattr(args, flag, None)
        for v in [values] if isinstance(values, str) else values or []:
            p = Path(os.path.realpath(v))
            if (p.parent if p.is_file() else p) == here:   # `--run RUN/model.pt` is the run folder
                raise BadInputError(f"--out is the --{flag} folder: {args.command}'s config.yaml and env.json "
                                    "would replace its own", path=out, fix=fix)
    if not here.is_dir():
        return
    model = next((n for n in ("model.pt", "checkpoint.pt") if (here / n).is_file()), None)
    if model is not None:
        raise BadInputError(f"--out holds a trained run ({model}): {args.command}'s config.yaml and env.json would "
                            "replace the run's training record", path=out, fix=fix)
    saved = _saved_command(here / "config.yaml")
    if saved not in (None, args.command):
        raise BadInputError(f"--out holds the outputs of `{saved}` (its config.yaml): {args.command}'s config.yaml "
                            "and env.json would replace that command's record", path=out, fix=fix)


def _saved_command(path: Path) -> str | None:
    """The command whose outputs ``path`` (a folder's config.yaml) records: its ``command`` key (`_save_command_config`),
    ``zero-shot`` for one with prompts' ``patch_mode``, ``train`` for a run's model config; None for none (or a file
    of the user's own)."""
    if not path.is_file():
        return None
    import yaml
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):   # not ours to judge: as before, the command writes its own
        return None
    if not isinstance(d, dict):
        return None
    if d.get("command"):
        return str(d["command"])
    if "patch_mode" in d:
        return "zero-shot"
    return "train" if {"backbone", "epochs"} <= set(d) else None


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists: where a file or folder given for output would be written."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _absolute(key: str, value):
    """A path flag's value made absolute (as `train` saves its data paths), so that `--config OUT/config.yaml`
    re-runs the command from any folder; `--weights imagenet` and `--text` without a file are not paths."""
    if key not in _PATH_FLAGS or value is None or isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)):
        return [_absolute(key, v) for v in value]
    if key in ("weights", "text") and not Path(str(value)).exists() or key == "normals" and value == "split":
        return value
    return os.path.abspath(value)


def _resume_base(out: Path) -> dict:
    """The config a resumed run continues with: its own saved one, so that `train --out RUN --resume` finishes
    the run's schedule instead of the defaults'; flags (and --config keys) given now override it, and only
    those a resume can honour (``train.RESUMABLE_KEYS``: --epochs, --threads, --map-levels, --map-norm, --device) are
    accepted: `train.check_resume_changes` refuses the others, for this command and a library caller alike."""
    from .checkpoint import checkpoint_config, read_checkpoint
    saved_path = out / "config.yaml"
    if saved_path.is_file():
        from .io import read_yaml
        saved = read_yaml(saved_path, "restore it, or delete it: --resume then takes the config saved in "
                                      "checkpoint.pt") or {}
    elif (out / "checkpoint.pt").is_file():
        saved = checkpoint_config(read_checkpoint(out / "checkpoint.pt"))
    else:
        return {}   # train() says there is nothing to resume
    return saved


def _dispatch(args) -> int:
    warnings.simplefilter("default")
    if args.command in _DEVICE_COMMANDS:   # checked before any work; the commands' models go there
        from .runs import use_device
        use_device(args.device or "auto")
    if args.command == "train":
        from .config import load_config
        from .train import train
        overrides = {k: getattr(args, k) for k in _TRAIN_KEYS}
        base = _resume_base(Path(args.out)) if args.resume else None
        cfg = load_config(args.config, overrides, base=base)
        if args.val_every is not None and cfg.get("select") != "synthetic":
            warnings.warn("--val-every has no effect without --select synthetic (nothing is validated)")
        model = Path(args.out) / "model.pt"
        before = model.stat().st_mtime_ns if model.exists() else None
        path = train(cfg, args.out, resume=args.resume, quiet=args.quiet,
                     flags=tuple(k for k, v in overrides.items() if v is not None))
        from .distributed import env_rank_world
        if (env_rank_world() or (0, 1))[0] != 0:   # torchrun: rank 0 speaks for all
            return 0
        print(f"model.pt unchanged: {path}" if before is not None and model.stat().st_mtime_ns == before
              else f"model written to {path}")
        return 0
    if args.command == "evaluate":
        from .evaluate import evaluate
        rep = evaluate(args.run, args.data, args.split_csv, json_path=args.json, csv_path=args.csv,
                       group=args.group, quiet=args.quiet,
                       overrides={"threads": args.threads, "pixel_map": args.pixel_map,
                                  "threshold": args.threshold, "max_fpr": args.max_fpr},
                       report_path=args.report, checkpoint=args.checkpoint, skip_bad=args.skip_bad, knn=args.knn,
                       pixel_budget=args.pixel_budget)
        if args.quiet:
            print(json.dumps({k: v for k, v in rep.items() if not k.startswith("_")}))
        return 0
    if args.command == "ensemble":
        from .ensemble import evaluate_ensemble
        rep = evaluate_ensemble(args.runs, args.data, args.split_csv, json_path=args.json, csv_path=args.csv,
                                group=args.group, quiet=args.quiet, skip_bad=args.skip_bad,
                                pixel_budget=args.pixel_budget)
        if args.quiet:
            print(json.dumps(rep))
        return 0
    if args.command == "cluster":
        from .clusters import cluster_cmd
        res = cluster_cmd(args.features, args.out, args.flagged, args.k, args.max_k, args.columns, args.seed,
                          sheet=args.sheet, group=args.group)
        keys = ("rows", "n_images", "k", "k_rule", "sizes", "agreement_with_labels")
        print(json.dumps({k: res[k] for k in keys if k in res} | {"out": args.out}, indent=2))
        return 0
    if args.command in ("extract", "index", "train-head", "predict"):
        from . import workflows as wf
        if args.command == "extract":
            res = wf.extract_cmd(args.data, args.out, args.run, args.split_csv, args.group, args.backbone,
                                 args.weights, args.image_size, args.tile, args.patches, args.shard,
                                 args.shard_size, args.quiet, text=args.text, skip_bad=args.skip_bad,
                                 batch=args.batch, mean=args.mean, std=args.std)
        elif args.command == "index":
            res = wf.index_cmd(args.features, args.out, args.kind, args.level, args.coreset, args.k, args.run,
                               device=args.device or "auto")
        elif args.command == "train-head":
            res = wf.train_head_cmd(args.features, args.out, args.task, args.label_from, args.defects_only,
                                    args.folds, args.seed, threads=args.threads, labels=args.labels)
            res = {"task": res["task"], "classes": res["classes"], "cv": res["oof"], "out": args.out}
        else:
            from .predict import predict_cmd
            res = predict_cmd(args.run, args.data, args.out, args.knn, args.head, args.split_csv,
                              args.overlays, args.quiet, text=args.text, threshold=args.threshold,
                              max_fpr=args.max_fpr, skip_bad=args.skip_bad, flag_by=args.flag_by,
                              heatmap=args.heatmap, group=args.group, ensemble=args.ensemble,
                              save_maps=args.save_maps, pixel_threshold=args.pixel_threshold)
            res = {k: v for k, v in res.items() if k != "rows"} | {"out": args.out}
        print(json.dumps(res, indent=2, default=str))
        return 0
    if args.command == "zero-shot":
        from .workflows import zero_shot_cmd
        res = zero_shot_cmd(args.data, args.out, args.backbone, args.weights, args.prompts, args.split_csv,
                            args.group, args.image_size, args.tile, args.patch_mode, args.quiet,
                            skip_bad=args.skip_bad, device=args.device or "auto", mean=args.mean, std=args.std,
                            quick_gelu=args.quick_gelu)
        print(json.dumps(res, indent=2))
        return 0
    if args.command == "calibrate":
        from .calibration import recalibrate
        cal = recalibrate(args.run, args.data, args.split_csv, args.quiet, args.map_levels, args.map_norm,
                          args.synthetic_kinds, args.tile_norm, normals=args.normals, image_score=args.image_score)
        keys = ("n_val_normals", "calibration_normals", "threshold", "threshold_rule", "quantiles", "map_levels",
                "map_norm", "pixel_map_choice", "image_score", "image_score_choice")
        print(json.dumps({k: cal[k] for k in keys if k in cal}, indent=2))
        return 0
    if args.command == "export-model":
        from .deploy import export_model
        info = export_model(args.run, args.out, args.input_size, args.group, args.threshold, args.max_fpr,
                            args.opset, args.check, args.quiet)
        keys = ("threshold", "threshold_rule", "pixel_threshold", "check", "export_seconds")
        print(json.dumps({"model": str(Path(args.out) / "model.onnx"), **{k: info[k] for k in keys}}, indent=2))
        return 0
    if args.command == "prompts":
        from .vlm import dump_prompts
        print(f"prompts written to {dump_prompts(args.out, args.object)} (pass it as --prompts / --text)")
        return 0
    if args.command == "demo":
        from .demo import run_demo
        run_demo(Path(args.out), epochs=args.epochs, quiet=args.quiet, device=args.device)
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
