"""A finished run as one ONNX file, for a line's own runtime (`uninet-feat export-model`).

Why: `predict` and `Detector` need Python, torch, timm and this package; an inspection PC often runs only an
ONNX runtime (ONNX Runtime from C++, C#, Java or Python; OpenVINO; TensorRT). The graph holds everything from
a decoded image to predict's outputs: the antialiased resize and the backbone's normalisation, UniNet's
teachers, bottleneck and student, the anomaly maps, the run's pixel map (its levels, units and smoothing, as
calibrated) and the WDM image score. For a tiled run it is built for one image size and also holds the tiles,
their place offsets (``tile_norm: position``), the image score over the tiles and the stitched full-size map.
Outside it are only decoding the file (``DECODE``) and the thresholds, which ``model.json`` carries so that
they can be changed without exporting again.

The export runs the ONNX file and the torch model on the same images and refuses a file whose scores or maps
differ by more than ``TOLERANCE`` (it records the differences in ``model.json``); a refused or failed export
leaves the folder's previous model.onnx and model.json as they were, and a kill at worst a model.onnx without its
model.json, never beside another export's.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from .errors import BadInputError

INPUT = "image"
OPSET = 18   # the first ONNX opset whose Resize has antialias, which the training resize uses
TOLERANCE = 1e-3   # largest |ONNX - torch| score (and map value) accepted, relative to max(1, their largest |value|)
DECODE = ("RGB, float32 in [0, 1], shape (N, 3, H, W): 8-bit values / 255, 16-bit grey / 65535 (16-bit colour: "
          "its high byte / 255, as PIL reads it); a grey image repeated to three channels; alpha dropped; palette "
          "and CMYK images as PIL converts them to RGB; the EXIF orientation applied; at least 8 px a side -- as "
          "uninet_feat.data.images.load_image decodes a file (which also scales 32-bit integer and float images: "
          "see its _to_array)")


class ScoringGraph(torch.nn.Module):
    """Decoded image(s) → (pixel map, image score[, tile scores]), as `evaluate.score_samples` scores a file.

    Untiled: any (N, 3, H, W) in; the map is at the model's size (the run's ``image_size``), as predict's maps are
    before the resize to the file's size, and a third output is that map at the input's size. Tiled: (N, 3, H, W)
    of the one size it was built for; the map is (N, H, W), the tiles' maps less their place's offset, stitched
    with overlaps averaged."""

    def __init__(self, model, image_size, grid=None, offsets=None, tile_score: str = "max", map_offsets=None):
        super().__init__()
        self.model = model.eval()
        self.size = tuple(image_size)
        self.register_buffer("mean", torch.tensor(model.source.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(model.source.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.grid, self.tile_score = grid, tile_score
        if grid is not None:
            off = torch.zeros(grid.n) if offsets is None else torch.as_tensor(offsets, dtype=torch.float32)
            self.register_buffer("offsets", off)
            # the maps' own (`positions.tile_map_shift`): the score's unless the map is of other units
            self.register_buffer("map_offsets", off.clone() if map_offsets is None
                                 else torch.as_tensor(map_offsets, dtype=torch.float32))
            count = torch.zeros(grid.canvas)
            for y, x in grid.origins:
                count[y:y + grid.tile[0], x:x + grid.tile[1]] += 1
            self.register_buffer("count", count)

    def _score(self, x):
        if self.grid is None or tuple(x.shape[-2:]) != self.size:   # untiled sizes are not known here: always
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return self.model.predict((x - self.mean) / self.std)

    def forward(self, image):
        if self.grid is None:   # and the map at the input's size, as predict and Detector give it out (their
            pix, score = self._score(image)   # Pillow bilinear resize is torch's antialiased one, to ~1e-5)
            full = F.interpolate(pix[:, None], size=image.shape[-2:], mode="bilinear", align_corners=False,
                                 antialias=True)[:, 0]
            return pix, score, full
        from .data.tiling import extract_tile
        g = self.grid
        th, tw = g.tile
        n = image.shape[0]
        tiles = torch.stack([extract_tile(image, g, k) for k in range(g.n)], 1).reshape(n * g.n, 3, th, tw)
        pix, score = self._score(tiles)
        if tuple(pix.shape[-2:]) != (th, tw):
            pix = F.interpolate(pix[:, None], (th, tw), mode="bilinear", align_corners=False)[:, 0]
        tile_scores = score.view(n, g.n) - self.offsets
        pix = pix.view(n, g.n, th, tw) - self.map_offsets.view(1, -1, 1, 1)
        acc = image.new_zeros((n,) + g.canvas)
        for k, (y, x) in enumerate(g.origins):
            acc[:, y:y + th, x:x + tw] += pix[:, k]
        full = (acc / self.count)[:, :g.h, :g.w]
        img_score = tile_scores.amax(1) if self.tile_score == "max" else tile_scores.mean(1)
        return full, img_score, tile_scores


def _tile_offsets(model, grid, group, run) -> tuple[list[float] | None, list[float] | None, str | None]:
    """Each tile's place offset (``tile_norm: position``) for images of ``grid``'s size in ``group``, and what its
    map is less (`positions.tile_map_shift`: the same offset, or for a pixel map of other units than the score's
    the map's own): the same `positions.corrected` that scoring uses, so its checks (group, image size, place) and
    its numbers hold here."""
    from .positions import corrected, tile_map_shift
    offsets = model.cfg.get("tile_offsets")
    if not offsets:
        return None, None, None
    if group is None and len(offsets) > 1:
        raise BadInputError(f"the run's position offsets come from {len(offsets)} groups {sorted(offsets)}, and "
                            "the exported model is for one of them", path=run,
                            fix="pass --group G (export once per group)")
    sample = SimpleNamespace(group=group if group is not None else next(iter(offsets)), path=Path(run))
    vals = [-corrected(0.0, grid.box(k), offsets, sample, None, None, model.cfg.get("tile_sizes"),
                       (grid.h, grid.w)) for k in range(grid.n)]
    maps = [tile_map_shift(model.cfg, 0.0, -v, grid.box(k), sample, None, (grid.h, grid.w))
            for k, v in enumerate(vals)]
    return vals, maps, sample.group


def _input_size(model, cfg, input_size, group, run) -> tuple[int, int]:
    """(H, W) a tiled run's graph is built for: ``input_size`` (W, H), else the training images' one size."""
    offsets = model.cfg.get("tile_offsets") or {}
    # a group the offsets do not know (misspelt) is named first: its record of sizes is empty, which read as a run
    # that records none (--input-size asked for, then refused for the group)
    if group is not None and offsets and str(group) not in offsets:
        known = sorted(offsets)
        raise BadInputError(f"no position offsets for group {group!r}: the run's normals came from "
                            + (f"groups {known}" if len(known) > 1 else f"group {known[0]!r} only"), path=run,
                            fix="drop --group (the run's normals had no group)" if known == [""] else
                            f"pass --group {known[0]}, or drop it" if len(known) == 1 else
                            f"pass --group as one of {known}")
    if input_size is not None:
        w, h = (int(v) for v in input_size)
        if w < 1 or h < 1:
            raise BadInputError(f"--input-size {w}x{h} is not an image size", fix="e.g. --input-size 4096x256")
        return h, w
    sizes = model.cfg.get("tile_sizes") or {}   # the position offsets' record, per group
    seen = {tuple(s) for g, ss in sizes.items() if group is None or g == group for s in ss}
    if not sizes:   # a run without offsets: its normals' sizes, counted at calibration since session 27
        from .io import read_json
        path = Path(run) / "calibration.json"
        fix = f"re-create it: `uninet-feat calibrate --run {run}`"
        seen = {tuple(s) for s in (read_json(path, fix).get("image_sizes") or [])} if path.exists() else set()
    if len(seen) == 1:
        return next(iter(seen))
    raise BadInputError("a tiled run is exported for one image size, and "
                        + (f"its training normals came in {len(seen)} sizes" if seen else "the run does not record "
                           "its training images' size"), path=run,
                        fix="pass --input-size WxH, e.g. --input-size 4096x256 for AITEX strips")


def export_model(run, out, input_size=None, group: str | None = None, threshold: float | None = None,
                 max_fpr: float | None = None, opset: int = OPSET, check: bool = True, quiet: bool = True) -> dict:
    """Write ``out``/model.onnx and ``out``/model.json (how to feed it, its outputs, thresholds, the check);
    return model.json's content. ``input_size``: (W, H) of a tiled run's images."""
    from . import __version__
    from .calibration import load_run
    from .thresholds import group_thresholds, resolve_thresholds
    from .data.tiling import tile_grid
    from .featstore import file_sha256
    from .io import atomic_write, staged_text
    from .predict import default_pixel_threshold
    from .runs import run_path
    from .scoring import pixel_map_kind

    import importlib.util
    if any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript")):   # torch's ONNX exporter needs them
        raise BadInputError("exporting to ONNX needs the packages onnx and onnxscript",
                            fix="pip install 'uninet-feat[deploy]' (onnx, onnxscript, onnxruntime)")
    if int(opset) < OPSET:
        raise BadInputError(f"--opset {opset}: the graph's antialiased resize needs opset {OPSET} or later",
                            fix=f"--opset {OPSET} (ONNX Runtime >= 1.16, OpenVINO >= 2023.1 read it)")
    run, out = Path(run), Path(out)
    model, _, cfg = load_run(run, device="cpu")
    if group is not None:   # a misspelt --group exported the pooled threshold, warned in predict's words only (an
        from .calibration import run_group_names   # audit, session 53): a shipped model that cannot be told apart
        known = run_group_names(run, model.cfg)
        if known and group not in known:
            raise BadInputError(f"--group {group!r}: the run knows no such group; its groups are "
                                f"{', '.join(sorted(known))}", path=run,
                                fix="pass --group as one of them, or leave it out (model.json then holds every "
                                    "group's threshold, group_thresholds)")
    # refused flags fail before the export's seconds; a run of several groups: --group's own threshold, or all of
    # them in model.json (`group_thresholds`) for a line to pick its product's
    thr, thr_rule, by_group = resolve_thresholds(run, threshold, max_fpr, group)
    if model.cfg.get("tile_neighbours"):
        raise BadInputError("this run scores each tile against the training tiles that look most like it "
                            "(tile_norm: neighbours), which needs the training tiles at scoring time", path=run,
                            fix=f"`uninet-feat calibrate --run {run} --tile-norm position` (or none), then export; "
                                "or score with predict / Detector")
    size = (int(cfg["image_size"]),) * 2 if isinstance(cfg["image_size"], int) else tuple(cfg["image_size"])
    grid, offsets, map_offsets, used_group = None, None, None, group
    if (group is not None and not (cfg.get("tile") and model.cfg.get("tile_offsets"))   # its threshold: G's when
            and not group_thresholds(run, threshold, max_fpr, warn=False)):                # the run has them
        warnings.warn(f"--group {group}: this run has no per-group place offsets (tile_norm: position) and "
                      + ("the threshold is the one given" if threshold is not None else "no per-group thresholds")
                      + ", so the exported model is the same for every group; --group changes nothing", stacklevel=2)
    if cfg.get("tile"):
        h, w = _input_size(model, cfg, input_size, group, run)
        grid = tile_grid(h, w, cfg["tile"], cfg.get("tile_overlap", 0))
        offsets, map_offsets, off_group = _tile_offsets(model, grid, group, run)
        used_group = off_group if off_group is not None else group   # "" (a run of no group) stays "", not None
    elif input_size is not None:
        warnings.warn("--input-size is for tiled runs; this run resizes any image to "
                      f"{size[1]}x{size[0]}, so the exported model takes any size", stacklevel=2)
    from .data.tiling import tile_score_reducer
    rule = cfg.get("tile_score", "max")
    tile_score_reducer(rule)   # the run's rule checked (and a legacy word warned about) as scoring does
    graph = ScoringGraph(model, size, grid, offsets, "max" if rule == "max" else "mean", map_offsets).eval()

    gen = torch.Generator().manual_seed(0)
    # untiled: an example of another size than the model's, so that no size is taken as the only one
    ex_h, ex_w = (grid.h, grid.w) if grid is not None else (size[0] + 16, size[1] + 32)
    example = torch.rand(2, 3, ex_h, ex_w, generator=gen)
    batch = torch.export.Dim("batch", min=1, max=4096)
    dims = {0: batch} if grid is not None else {0: batch, 2: torch.export.Dim("height", min=8, max=16384),
                                                   3: torch.export.Dim("width", min=8, max=16384)}
    outputs = ["map", "score"] + (["tile_scores"] if grid is not None else ["map_image"])
    out.mkdir(parents=True, exist_ok=True)
    probe = torch.rand(3, 3, ex_h, ex_w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():   # before the export, which leaves the module's tensors in its own state
        want = [t.numpy().copy() for t in graph(probe)]
    # read before the export: once the new model.onnx is in place, only a dict stands between it and its model.json
    model_sha, pixel_thr = file_sha256(run_path(run, "model.pt")), default_pixel_threshold(run, model)
    t0 = time.perf_counter()

    done: dict = {}

    def make_info() -> dict:   # what model.json says of the file just checked
        export_s, checked = done["export_s"], done["check"]
        return {
            "format": "onnx", "opset": opset, "uninet_feat": __version__, "torch": torch.__version__,
            "run": str(run.resolve()), "model_sha256": model_sha,
            "onnx_sha256": done["sha"], "export_seconds": round(export_s, 1),
            "input": {"name": INPUT, "decode": DECODE,
                      "shape": ["N", 3, ex_h, ex_w] if grid is not None else ["N", 3, "H", "W"],
                      "inside the graph": (f"resized to {size[1]}x{size[0]} (bilinear, antialiased)" if grid is None else
                                           f"cut into {grid.tile[1]}x{grid.tile[0]} tiles, each resized to "
                                           f"{size[1]}x{size[0]} (bilinear, antialiased) only where the sizes differ")
                                          + f", normalised with the backbone's mean {list(model.source.mean)} / std "
                                            f"{list(model.source.std)}"},
            "outputs": {
                "map": ("(N, H, W) pixel map at the input's size: the tiles' maps less their place offsets, stitched"
                        if grid is not None else
                        f"(N, {size[0]}, {size[1]}) pixel map at the model's size; predict resizes it to the "
                        "file's size: bilinear, half-pixel centres, antialiased where it shrinks (Pillow's BILINEAR, "
                        "torch's interpolate(antialias=True)); a plain bilinear resize (OpenCV INTER_LINEAR) differs "
                        "where the file is smaller than the model's size") + f"; kind: {pixel_map_kind(model.cfg)}",
                "score": ("(N,) image anomaly score, the run's WDM score" if model.cfg.get("image_score") != "map" else
                          "(N,) image anomaly score, the WDM's top-k mean of the run's pixel map (image_score: map)") + (
                    f" ({rule} of the tile scores)" if grid is not None else ""),
                **({"tile_scores": f"(N, {grid.n}) each tile's score less its place offset, tiles row-major"}
                   if grid is not None else
                   {"map_image": "(N, H, W) the map at the input's size, as predict and Detector give it out (and "
                                 "threshold it for defect masks)"})},
            # the group exported for, as --group named it (None: every group, or a run of one): it showed only in
            # the threshold's rule (an audit, session 53)
            "group": group,
            "threshold": thr, "threshold_rule": thr_rule, **({"group_thresholds": by_group} if by_group else {}),
            "flag": "score > threshold",
            "pixel_threshold": pixel_thr,
            "defect_mask": "map > pixel_threshold",
            "tiling": None if grid is None else {
                "tile": list(grid.tile), "overlap": grid.overlap, "origins_yx": [list(o) for o in grid.origins],
                "tile_score": rule, "group": used_group, "offsets": offsets,
                               **({"map_offsets": map_offsets} if map_offsets != offsets else {})},
            "check": checked,
        }

    def write(tmp):   # exported and checked under a temp name: a refused or failed export leaves the folder's
        with warnings.catch_warnings(), torch.no_grad():   # previous model.onnx and model.json as they were
            warnings.simplefilter("ignore")   # the exporter's deprecation and tracing notices, not the user's
            torch.onnx.export(graph, (example,), tmp, dynamo=True, external_data=False, opset_version=opset,
                              dynamic_shapes={"image": dims}, input_names=[INPUT], output_names=outputs,
                              verbose=False, report=False)
        done["export_s"] = time.perf_counter() - t0
        _check_opset(tmp, opset)   # torch keeps opset 18 when it cannot convert to the one asked for
        try:
            done["check"] = check_onnx(Path(tmp), probe, want) if check else {"skipped": "--no-check"}
        except BadInputError as e:   # named by the file it would have been, not its temp name
            raise BadInputError(e.reason, path=out / "model.onnx", fix=e.fix) from None
        done["sha"] = file_sha256(tmp)
        done["info"] = make_info()   # model.json written in full before the old one goes (a full disk failed after)
        done["json"] = staged_text(out / "model.json", json.dumps(done["info"], indent=2))
        (out / "model.json").unlink(missing_ok=True)   # never the old model.json beside the new model.onnx, nor
        (out / "run_config.yaml").unlink(missing_ok=True)   # the old run's settings (a stop before the copy below)
    try:
        _quietly(lambda: atomic_write(out / "model.onnx", write), quiet)
        os.replace(done["json"], out / "model.json")   # just after the new model.onnx: nothing left to fail between
    finally:
        if done.get("json") and os.path.exists(done["json"]):
            os.unlink(done["json"])
    info = done["info"]
    if (run / "config.yaml").exists():   # the run's settings beside its model (the command's own config.yaml is the CLI's)
        atomic_write(out / "run_config.yaml", lambda tmp: shutil.copyfile(run_path(run, "config.yaml"), tmp))
    return info


def _check_opset(path, opset: int) -> None:
    """Refuse a file whose default-domain opset is not ``opset`` (model.json would name the wrong one)."""
    import onnx
    proto = onnx.load(str(path), load_external_data=False)
    got = {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")}
    if got != {int(opset)}:
        raise BadInputError(f"--opset {opset}: torch's exporter wrote opset {sorted(got)} instead (it converts only to "
                            "the opsets the installed onnx knows)", fix=f"--opset {OPSET} (the default)")


def _quietly(fn, quiet: bool):
    """Run ``fn`` with the exporter's progress lines (printed to stdout) hidden when ``quiet``."""
    if not quiet:
        return fn()
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        return fn()


def check_onnx(path, x: torch.Tensor, want: list) -> dict:
    """Run the ONNX file on images ``x`` and compare with the torch graph's outputs ``want`` on them: the largest
    differences. Raises for a file whose scores differ by more than ``TOLERANCE``; says so when ONNX Runtime is not
    installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        warnings.warn("onnxruntime is not installed, so the exported model was not checked against the run "
                      "(pip install onnxruntime)", stacklevel=2)
        return {"skipped": "onnxruntime not installed"}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {INPUT: x.numpy()})
    names = [o.name for o in sess.get_outputs()]
    diffs = {name: float(np.abs(g - t).max()) for name, g, t in zip(names, got, want)}
    # every output, each on its own scale: a tiled graph's per-tile scores (an operator may read them on their
    # own) and an untiled graph's map at the image's size too, not the score and map alone
    for out, name in enumerate(names):
        scale = max(1.0, float(np.abs(want[out]).max()))
        if not diffs[name] <= TOLERANCE * scale:
            raise BadInputError(f"the exported model's {name}s differ from the run's by {diffs[name]:.3g} (allowed "
                                f"{TOLERANCE * scale:.3g}); it was not kept", path=path,
                                fix="report this with the run's config.yaml; score with predict meanwhile")
    import onnxruntime
    return {"runtime": f"onnxruntime {onnxruntime.__version__}", "images": int(x.shape[0]),
            "size": list(x.shape[-2:]),
            **{f"max_abs_diff_{k}": v for k, v in diffs.items()}}
