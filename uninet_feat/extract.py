"""`Extractor`: a trained run (or a plain backbone) as a feature extractor, in memory or to a store."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .calibration import calibration_fingerprint
from .config import DEFAULT_CONFIG
from .data.layouts import Sample
from .descriptors import SHAPE_NAMES, hot_region_shape, image_place
from .errors import BadInputError
from .export import backbone_features, uninet_features, vector_names
from .featstore import (SCHEMA, SCHEMA_VERSION, FeatureStore, changed_on_disk, check_writer, file_sha256,
                        file_stamp, file_stats, start_store, write_shard)
from .io import atomic_write, atomic_write_text, remove_dead_temps
from .positions import check_places, corrected
from .runs import check_input_side, make_dataset, model_device, run_path


class Extractor:
    """``Extractor(run).extract(paths)`` → dict of arrays; ``extract_to(samples, folder)`` → FeatureStore.

    With ``run=None`` the plain backbone (``backbone``, ``weights``) is used: ImageNet features, the
    baseline that adapted features are compared against.

    ``text`` (CLIP backbones only): True for the default fabric prompts, or a prompt YAML file; appends the
    zero-shot `TextScorer.features` columns (``clip_image_score``, patch max / mean / q99) to every vector,
    so a LightGBM head sees the text similarities beside the UniNet features. The text tower comes from the
    run's original CLIP weights file (a run's checkpoint holds the image towers only).
    """

    def __init__(self, run=None, backbone: str | None = None, weights: str = "imagenet",
                 image_size: int | None = None, tile: int | None = None, patches: bool = False,
                 batch_size: int = 8, text=None, skip_bad: bool = False, device=None, mean=None, std=None):
        from .calibration import load_run
        from .runs import create_normalised_backbone, pick_device
        if run is not None and (mean is not None or std is not None):
            raise BadInputError("--mean/--std set the input normalisation of plain backbone features; a run scores "
                                "with the one it was trained with (its model.pt records it)", path=run,
                                fix="drop --mean/--std, or drop --run for plain backbone features")
        if run is not None:
            path = run_path(run, "model.pt")
            self._run_typed = run
            self.run_dir = path.parent
            self.model, _, self.cfg = load_run(path.parent, device=device)   # with the run's pixel-map levels
            self.model.eval()
            self.backbone = self.model.source
            self.source = {"run": os.path.abspath(self.run_dir), "model_sha256": file_sha256(path)}
        else:
            self.model, self.run_dir = None, None
            name = backbone or DEFAULT_CONFIG["backbone"]
            from .vlm import seeded
            from .checkpoint import float32_default
            with seeded(), float32_default():   # a random init (--weights random): the same in every run, resume
                bb = create_normalised_backbone(name, weights, mean, std)   # and --shard process
            self.backbone = bb.eval().to(pick_device(device))
            wfile = Path(str(weights)).expanduser() if weights else None
            self._weights_typed = weights
            if wfile is not None and wfile.is_file():   # recorded absolute (a link's own name kept: a clip: file's
                weights = os.path.abspath(wfile)       # name says its activation), so index and predict find it
            self.cfg = {**DEFAULT_CONFIG, "backbone": name, "weights": weights, "mean": mean, "std": std}
            self.source = {"run": None, "backbone": self.backbone.config(), "weights": weights}
            if wfile is not None and wfile.is_file():   # a file replaced at the same path (or a relative one elsewhere)
                self.source["weights_sha256"] = file_sha256(wfile)
        n_levels = len(self.backbone.channels)
        if patches and n_levels < 3:   # patch vectors are levels 2 and 3 on the level-2 grid (`export.patch_vectors`)
            what = "this run has" if run is not None else f"backbone {self.cfg['backbone']} has"
            raise BadInputError(f"patch vectors are made of levels 2 and 3, and {what} {n_levels} level(s)", path=run,
                                fix="drop --patches, or " + ("use a run trained with three levels (the default "
                                                             "--levels)" if run is not None else
                                                             "use a backbone with three levels"))
        if run is not None and ((image_size and image_size != self.cfg["image_size"])
                                or (tile is not None and (tile or None) != (self.cfg.get("tile") or None))):
            now = (image_size or self.cfg["image_size"], self.cfg.get("tile") if tile is None else tile or None)
            warnings.warn(f"{run}: the run was trained and calibrated at image_size {self.cfg['image_size']}, tile "
                          f"{self.cfg.get('tile')}; these features are made at image_size {now[0]}, tile {now[1]}, "
                          "which predict refuses in an index or head (fine for a throughput measurement). Fix: "
                          "drop --image-size / --tile with --run", stacklevel=2)
        if image_size:
            if self.model is not None:   # before any image is read: a size the run's network cannot take
                check_input_side(self.model, image_size, run, own=self.cfg["image_size"])
            self.cfg["image_size"] = image_size
        if tile is not None:
            self.cfg["tile"] = tile or None
        self.device = model_device(self.backbone)   # inputs go there; features come back to the CPU
        self.patches, self.batch_size = patches, batch_size
        self.skip_bad = skip_bad   # unreadable images are left out (warned, listed in ``skipped``) instead of stopping
        self.vector_names = vector_names(self.backbone.channels, adapted=self.model is not None)
        self.text_scorer = self._text_scorer(text) if text else None
        if self.text_scorer is not None:
            self.vector_names = self.vector_names + list(self.text_scorer.feature_names)
            ts = self.text_scorer
            weights = self.cfg.get("weights")   # the text tower's file: its hash, so a replaced file is noticed
            tower = file_sha256(weights) if weights and Path(str(weights)).is_file() else str(weights)
            self.source = {**self.source, "text": {"normal": ts.normal_prompts, "defect": ts.defect_prompts,
                                                   "weights_sha256": tower}}

    def _text_scorer(self, text):
        from .backbones.clip import _RANDOM, ClipViT, build_clip_model
        from .vlm import TextScorer, seeded
        bb = self.backbone
        if not isinstance(bb, ClipViT):
            raise BadInputError(f"text features need a clip: backbone, this one is {getattr(bb, 'name', bb)}",
                                fix="drop --text, or train/extract with --backbone clip:<model> --weights FILE")
        weights = self.cfg.get("weights")
        if str(weights) in _RANDOM:
            import warnings
            warnings.warn("text features with random CLIP weights: the text tower is random, its columns are noise")
        with seeded():   # a random text tower: the same in every process, shard and resume
            text_model = build_clip_model(bb.clip_name, weights, bb._model_cfg, bb.quick_gelu)
        prompt_file = None if text is True else text
        return TextScorer(bb, prompt_file=prompt_file, text_model=text_model).eval().to(self.device)

    def _forward(self, x: torch.Tensor) -> dict:
        if self.model is not None:
            return uninet_features(self.model, x, self.patches)
        return backbone_features(self.backbone, x, self.patches)

    def _forward_with_text(self, x: torch.Tensor):
        """(`_forward` result, text columns or None). With a CLIP source teacher the text scorer reuses
        the teacher's own tower pass (`ClipViT.keep_tower_output`) instead of running the tower again."""
        ts = self.text_scorer
        if ts is None:
            return self._forward(x), None
        keep = getattr(self.backbone, "keep_tower_output", None)
        padded = getattr(self.model, "border_pad", 0)   # the run's pass is of the mirrored input, not the image
        if keep is None or padded or ts.visual is not getattr(self.backbone, "visual", None):
            return self._forward(x), ts.features(x)
        with keep() as passes:
            r = self._forward(x)
        return r, (ts.features_from_tower(passes[0]) if len(passes) == 1 else ts.features(x))

    def _dataset(self, samples):
        samples = [s if isinstance(s, Sample) else Sample(Path(s), "", "unknown", None, "") for s in samples]
        if not samples:
            raise BadInputError("no images to extract features from", fix="pass at least one image path or Sample")
        unmasked = [replace(s, mask=None) for s in samples]   # features need no mask: a bad one is not a bad image
        ds = make_dataset(unmasked, {**self.cfg, "skip_bad": self.skip_bad}, self.backbone)
        if self.model is not None and self.cfg.get("tile"):   # every image's tile places, before any is scored
            check_places(self.model.cfg.get("tile_offsets"), self.model.cfg.get("tile_sizes"), ds)
        return samples, ds

    @staticmethod
    def skipped(samples, ds) -> list[str]:
        """Paths of the samples the dataset left out (unreadable, with ``skip_bad``)."""
        return [str(samples[i].path) for i, _ in ds.skipped]

    def _run(self, ds, indices, patch_fn=None, map_fn=None) -> dict:
        """Features of ``indices``, written batch by batch into arrays allocated once at the first batch:
        no per-batch list and no concatenated second copy, so a shard's peak memory is one shard.
        ``patch_fn`` (e.g. a kNN scorer's ``score_patches``) maps each batch's (n, h*w, d) patches, as float16
        values, to (n, h*w) ``patch_scores``, kept instead of the patches: 4 bytes a patch instead of 6·d.
        ``map_fn(sample_index, pixel_map, score)``: called for every item of an untiled adapted run with its WDM
        pixel map (float32 numpy, the model input's size) and score, as this pass computed them."""
        indices = list(indices)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, indices), batch_size=self.batch_size,
                                             shuffle=False)
        out, i = {}, 0
        by_place = self.model is not None and self.cfg.get("tile") and self.model.cfg.get("tile_offsets")
        hw = {j: (g.h, g.w) for j, g, _ in ds.tile_index} if by_place else {}   # each image's size, for `corrected`
        for batch in loader:
            x = batch["image"].to(self.device)
            if self.model is not None and self.cfg.get("channels_last"):   # as evaluate feeds it: the same scores
                x = x.contiguous(memory_format=torch.channels_last)
            r, text = self._forward_with_text(x)
            r = {k: v.cpu() if torch.is_tensor(v) else v for k, v in r.items()}
            text = None if text is None else text.cpu()
            v = r["vectors"].float()
            if self.model is not None:
                if ds.tile:
                    self._unpadded_shapes(v, r["maps"], ds, indices[i:i + len(v)])
                v = torch.cat([v, self._places(v, ds, indices[i:i + len(v)])], 1)
            if text is not None:
                v = torch.cat([v, text], 1)
            scores = (r["scores"].float().numpy() if r["scores"] is not None
                      else np.full(len(v), np.nan, np.float32))
            if by_place:
                near, ctx = self.model.cfg.get("tile_neighbours"), r["context"].numpy()
                sizes = self.model.cfg.get("tile_sizes")
                scores = np.array([corrected(float(s), b, self.model.cfg["tile_offsets"], ds.samples[i], c, near, sizes,
                                             hw[i], self.model.cfg.get("tile_own"))
                                   for s, b, i, c in zip(scores, batch["tile"], batch["index"].tolist(), ctx)],
                                  np.float64)   # as calibration keeps them: a threshold is one normal's score
            if map_fn is not None and not ds.tile and r.get("maps") is not None:
                for j, (si, sc) in enumerate(zip(batch["index"].tolist(), scores.tolist())):
                    map_fn(si, r["maps"][j].numpy().astype(np.float32), sc)
            cols = {"vectors": v.numpy(), "tile": batch["tile"].numpy(), "index": batch["index"].numpy(),
                    "scores": scores}
            if self.patches:
                half = r["patches"].to(torch.float16)   # what a store keeps, so both score the same values
                if patch_fn is None:
                    cols["patches"] = half.numpy()
                else:
                    cols["patch_scores"] = np.asarray(patch_fn(half.float().numpy()), np.float32)
                out["patch_grid"] = tuple(r["patch_grid"])
            for key, a in cols.items():   # float32 vectors/scores, float16 patches, int64 tile/index
                if key not in out:
                    out[key] = np.empty((len(indices),) + a.shape[1:], a.dtype)
                out[key][i:i + len(a)] = a
            i += len(v)
        return out

    @staticmethod
    def _unpadded_shapes(v: torch.Tensor, maps: torch.Tensor, ds, items) -> None:
        """The hot-region shape block of each tile that runs past its image (an image smaller than the tile,
        mirrored to fill it) measured again on the image's part of its map: on the whole tile the mirrored copy
        pulled the hot spot's place towards, and clipped it at, the image's bottom or right edge."""
        end = len(SHAPE_NAMES)
        for row, j in enumerate(items):
            _, grid, k = ds.tile_index[j]
            _, _, vh, vw = grid.valid_box(k)
            if (vh, vw) == tuple(grid.tile):
                continue
            h, w = maps.shape[-2:]
            ch, cw = max(1, round(h * vh / grid.tile[0])), max(1, round(w * vw / grid.tile[1]))
            v[row, v.shape[1] - end:] = hot_region_shape(maps[row:row + 1, :ch, :cw]).to(v.dtype)[0]

    @staticmethod
    def _places(v: torch.Tensor, ds, items) -> torch.Tensor:
        """The hot spot's place in the whole image (`descriptors.image_place`) from each tile's centroid
        (``hot_cy``, ``hot_cx`` of the shape block that ends an adapted vector)."""
        end = len(SHAPE_NAMES)
        cy, cx = (v[:, SHAPE_NAMES.index(k) - end].tolist() for k in ("hot_cy", "hot_cx"))
        rows = []
        for j, y, x in zip(items, cy, cx):
            if ds.tile:
                _, grid, k = ds.tile_index[j]
                rows.append(image_place(y, x, grid.valid_box(k), (grid.h, grid.w)))   # fractions of its image part
            else:
                rows.append((y, x))
        return torch.tensor(rows, dtype=v.dtype).view(-1, 2)

    @torch.no_grad()
    def extract(self, samples, patch_fn=None, map_fn=None, parts=None, key=None) -> dict:
        """In memory: ``vectors`` (n_items, D), ``scores``, ``tile``, ``index`` (sample of each item), ``patches``
        (or with ``patch_fn``, their ``patch_scores``, scored batch by batch: see `_run`); ``map_fn``: see `_run`.

        ``parts``: a folder where every `PART_ITEMS` items are saved as they are finished, so that a killed
        pass run again on the same files, model and ``key`` (what else the values depend on, e.g. the kNN index
        ``patch_fn`` scores with) redoes at most one part (`resumable_pass`); ``resumed``: the items it reused."""
        samples, ds = self._dataset(samples)
        if parts is None:
            out = self._run(ds, range(len(ds)), patch_fn, map_fn)
            out["resumed"] = 0
        else:
            cal = calibration_fingerprint(self.run_dir, self.model) if self.model is not None else {}   # offsets
            fp = {"source": self.source, "patches": str(self.patches), "key": key, "columns": self.vector_names,
                  "calibration": cal.get("calibration_sha256"),
                  "cfg": {k: self.cfg.get(k) for k in ("image_size", "tile", "tile_score", "tile_norm")}}
            if "tile_neighbours_sha256" in cal:   # the training tiles of tile_norm: neighbours (runs without keep
                fp["tile_neighbours"] = cal["tile_neighbours_sha256"]   # their parts' fingerprint as it was)
            out = resumable_pass(Path(parts), fp, samples, len(ds),
                                 lambda idx: self._run(ds, idx, patch_fn, map_fn))
        out["samples"], out["skipped"] = samples, self.skipped(samples, ds)
        return out

    @torch.no_grad()
    def extract_to(self, samples, folder, shard_size: int = 256, shard: tuple[int, int] = (0, 1),
                   quiet: bool = True, on_shard=None) -> FeatureStore | None:
        """Stream features into ``folder`` shard by shard; resumes a killed run.

        ``shard=(i, n)`` extracts only shards ``k`` with ``k % n == i`` (several processes or machines
        can fill one store). ``on_shard(k)`` is called after shard ``k`` is on disk (progress, memory
        probes). Returns the store when every shard exists.
        """
        folder = Path(folder)
        samples, ds = self._dataset(samples)
        items, typed_paths = [], []
        for si, grid, k in ds.tile_index:   # absolute paths: `index --run` and heads match them from any folder
            s, tile = samples[si], grid.box(k)
            items.append({"path": os.path.abspath(s.path), "label": s.label, "group": s.group, "split": s.split,
                          "is_normal": bool(s.is_normal), "tile": [int(v) for v in tile]})
            typed_paths.append(str(s.path))
        n_shards = max(1, -(-len(items) // shard_size))
        settings = {"image_size": self.cfg["image_size"], "tile": self.cfg.get("tile"), "patches": self.patches,
                    "shard_size": shard_size}
        # what the store holds, however its paths were spelled: the model (or a weights file) by its sha256, items
        # by absolute path
        what = {k: v for k, v in self.source.items() if k != "run"}
        paths = [os.path.abspath(i["path"]) for i in items]
        fp = older = _fingerprint(what, settings, paths)   # older: stores written before the calibration was in it
        extra, legacy = {}, []
        source_typed = self.source   # the weights as typed, as stores written before session 52 recorded them
        if "weights_sha256" in what:   # the file by its content: `--weights ./w.pth`, `w.pth` or the saved config's
            fp = _fingerprint({k: v for k, v in what.items() if k != "weights"}, settings, paths)   # absolute path
            source_typed = {**self.source, "weights": self._weights_typed}
            older = _fingerprint({k: v for k, v in source_typed.items() if k != "run"}, settings, paths)
        if self.model is not None:   # its offsets (and neighbours' tiles) and pixel-map choice make the scores and map
            extra = calibration_fingerprint(self.run_dir, self.model)   # features: a `calibrate` between a kill and
            fp = _fingerprint({**what, **extra}, settings, paths)       # the resume must not mix two
            if len(extra) > 1:   # stores written before the neighbours' tiles were in it: calibration.json's alone
                legacy.append(_fingerprint({**what, "calibration_sha256": extra["calibration_sha256"]}, settings,
                                           paths))
        typed = _fingerprint({**self.source, "run": str(self._run_typed)} if self.model is not None else source_typed,
                             settings, typed_paths)   # stores written before session 23
        if "weights_sha256" in self.source:   # stores written before a weights file's sha256 was in it: its
            bare = {k: v for k, v in source_typed.items() if k != "weights_sha256"}   # replacement since is unknown
            legacy += [_fingerprint({k: v for k, v in bare.items() if k != "run"}, settings, paths),
                       _fingerprint(bare, settings, typed_paths)]
        manifest = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "fingerprint": fp, "source": self.source,
                    **extra, "settings": settings, "vector_names": self.vector_names, "n_items": len(items),
                    "n_shards": n_shards, "items": items, "skipped": self.skipped(samples, ds),
                    "files": file_stats(i["path"] for i in items)}   # a resume redoes shards of images changed since
        if self.model is not None:   # an image's score in image_table, as evaluate and predict reduce its tiles
            manifest["tile_score"] = self.cfg.get("tile_score", "max")
        # tiles scored less their group's position offsets (as `_run` does): a regrouped item's score is stale
        by_group = bool(self.model is not None and self.cfg.get("tile") and self.model.cfg.get("tile_offsets"))
        done = start_store(folder, manifest, legacy=(older, typed, *legacy), by_group=by_group)
        mine = [k for k in range(n_shards) if k % shard[1] == shard[0] and k not in done]
        with Progress(TextColumn("extract"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      disable=quiet) as prog:
            task = prog.add_task("extract", total=len(mine))
            changed = []
            for k in mine:
                span = range(k * shard_size, min((k + 1) * shard_size, len(items)))
                r = self._run(ds, span)
                check_writer(folder, fp, manifest)   # another --shard process may have taken the folder since
                # an image replaced while this process ran: the shard may hold its old pixels, and another
                # `--shard i/n` process that started since recorded the new file, finding no shard to call stale
                # (an audit, session 53): not written, so that a re-run extracts it
                moved = changed_on_disk(manifest["files"], (items[j]["path"] for j in span))
                if moved:
                    changed += moved
                    continue
                write_shard(folder, k, {key: v for key, v in r.items() if key in ("vectors", "scores", "patches")},
                            fingerprint=fp)
                del r  # else this shard stays alive while the next one is filled: two shards at the peak
                prog.update(task, advance=1)
                if on_shard is not None:
                    on_shard(k)
        if changed:
            warnings.warn(f"{folder}: {len(changed)} image(s) changed while they were extracted (e.g. {changed[0]}): "
                          "their shards were not written. Fix: run the same command again, which extracts them")
        if all((folder / f"shard-{k:05d}.npz").exists() for k in range(n_shards)):
            atomic_write_text(folder / "complete", "ok\n")
            return FeatureStore(folder)
        return None


def _fingerprint(source: dict, settings: dict, paths: list) -> str:
    return hashlib.sha256(json.dumps([source, settings, paths], sort_keys=True).encode()).hexdigest()


PART_ITEMS = 1024   # items (images, or tiles) a resumable pass saves at a time: a kill loses at most these


def resumable_pass(folder: Path, what: dict, samples, n_items: int, run) -> dict:
    """``run(indices)`` (an `Extractor._run`) over ``n_items`` items, `PART_ITEMS` at a time, each part saved in
    ``folder`` as it is finished, then all joined. Parts are reused only for the same ``what`` and the same
    files (path, size, modification and change time of each sample, `featstore.file_stamp`: an image replaced since,
    also by `cp -p`, is scored again): each
    part carries its pass's fingerprint, and another pass's part is scored again and overwritten. Why: a batch of
    100k images is hours of scoring on a CPU, and a kill or a reboot must not lose it."""
    files = []
    for s in samples:
        try:
            files.append([os.path.abspath(s.path), *file_stamp(os.stat(s.path)), s.group])   # group: its offsets
        except OSError:   # gone (skipped with skip_bad): its absence is what the pass saw
            files.append([os.path.abspath(s.path), None, None, None, s.group])
    fp = _fingerprint(what, {"n_items": n_items, "part_items": PART_ITEMS}, files)
    remove_dead_temps(folder, ".part-*.tmp")   # parts a killed pass left half-written
    parts, resumed = [], 0
    for k, start in enumerate(range(0, n_items, PART_ITEMS)):
        path = folder / f"part-{k:05d}.npz"
        r = _read_part(path, fp)
        if r is None:
            r = run(range(start, min(start + PART_ITEMS, n_items)))
            arrays = {key: (np.asarray(v) if key != "patch_grid" else np.array(v)) for key, v in r.items()}
            arrays[_PART_FP] = np.array(fp)   # whose part it is: another predict into this --out may write here too

            def save(tmp, arrays=arrays):
                with open(tmp, "wb") as f:
                    np.savez(f, **arrays)
            atomic_write(path, save)
        else:
            resumed += len(r["index"])
        parts.append(r)
    out = {key: np.concatenate([r[key] for r in parts]) for key in parts[0] if key != "patch_grid"} if parts else {}
    if parts and "patch_grid" in parts[0]:
        out["patch_grid"] = tuple(int(v) for v in parts[0]["patch_grid"])
    out["resumed"] = resumed
    return out


_PART_FP = "_fingerprint"


def _read_part(path: Path, fp: str) -> dict | None:
    """A saved part's arrays, or None when it is missing, unreadable (a disk that failed mid-write: numpy then
    raises zipfile.BadZipFile, not an OSError) or another pass's (a second predict into the same --out, started
    before this one, writes its parts into the same folder)."""
    if not path.exists():
        return None
    try:
        with np.load(path) as z:
            r = {key: z[key] for key in z.files}
    except Exception:   # BadZipFile, a CRC error, a truncated member, ...: scored again
        return None
    if str(r.pop(_PART_FP, "")) != fp:
        return None
    return r
