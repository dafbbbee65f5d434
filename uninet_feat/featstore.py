"""The on-disk feature store: versioned, sharded, resumable, with flat memory.

Layout of a FEATURES folder (schema ``uninet-feat/features`` version 2; version 1 had no defect descriptors,
`descriptors.py`, in a run's vectors — its stores still load, their vector names are in their manifest):
    manifest.json       schema, source (run path, model sha256, backbone), with a run its calibration.json's
                        ``calibration_sha256`` (and under ``tile_norm: neighbours`` the digest of the training
                        tiles in its tile_neighbours.npz, ``tile_neighbours_sha256``), vector names, shard size,
                        and one record per item (absolute path, label, group, split, is_normal,
                        tile [y, x, h, w]); an item's shard is its position // shard size
    shard-00000.npz     arrays for items [0, shard_size): ``vectors`` (n, D) float32, ``scores`` (n,)
                        float32 (NaN without a model), ``patches`` (n, h*w, P) float16 when requested,
                        ``fingerprint`` (the writer's; shards from before session 37 have none)
    complete            written last
Each shard is written atomically; a killed run re-started with the same arguments skips shards that
exist and redoes only the missing ones. The manifest records a fingerprint of the source model and
settings (with ``--run``, of its calibration too: calibration.json's offsets and pixel-map choice, and the
neighbours' tiles it names, make the scores and map features), and a resume with a different one is refused
rather than silently mixing features. It also records
each image file's size and modification time (``files``), so a shard holding an image replaced since is
extracted again rather than kept with the old image's features (as predict's resumable parts); so is a shard
holding an image whose group changed when the run scores tiles by position (per-group offsets). A tiled image
replaced by one of another size moves every later row: the shards before it are kept, the rest redone. Each shard
carries its writer's fingerprint: a `--shard i/n` process that finds the manifest taken over by one with other
settings stops before its next shard, and a shard of another extraction is refused when read (redone on resume).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

from .errors import BadInputError
from .io import atomic_write, atomic_write_text, read_json, remove_dead_temps

SCHEMA = "uninet-feat/features"
SCHEMA_VERSION = 3   # 3: the spot-difference descriptors (`l*_spotdiff_*`); 2: the defect descriptors
# what a run's calibration is named by in a manifest (`calibration.calibration_fingerprint`)
CALIBRATION_KEYS = ("calibration_sha256", "tile_neighbours_sha256")


_SHA256: dict = {}   # (path, inode, size, mtime, ctime) → digest


def file_sha256(path) -> str:
    """The file's sha256, read once per version of the file in a process: a scoring command names model.pt by it
    twice (the calibration's model check, the feature store's source), and a large backbone's file takes a while.
    An atomic rewrite (new inode) or any change of size, mtime or ctime reads it again."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_ino, *file_stamp(st))
    if key not in _SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.npz"


def write_shard(folder: Path, i: int, arrays: dict, fingerprint: str | None = None) -> None:
    """Streamed into the temp file (no in-memory copy of the shard), then renamed into place. ``fingerprint``:
    the writer's (the manifest's, when it started), kept in the shard as ``fingerprint`` so that a shard written
    by another `--shard i/n` process with other settings is told apart from the manifest's own."""
    if fingerprint is not None:
        arrays = {**arrays, SHARD_FP: np.array(fingerprint)}
    def w(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    atomic_write(folder / shard_name(i), w)


SHARD_FP = "fingerprint"   # a shard's writer's fingerprint (shards written before session 37 have none)


def shard_fingerprints(manifest: dict) -> set[str]:
    """The fingerprints a shard of this store may carry: the manifest's, and those of the extractions it was
    resumed from under an older fingerprint recipe (``resumed_from``)."""
    return {manifest.get("fingerprint"), *manifest.get("resumed_from", [])}


def shard_writer(z, manifest: dict) -> str | None:
    """A loaded shard's fingerprint when it is not one of this store's (None: the store's own, or a shard from
    before shards carried one)."""
    if SHARD_FP not in z.files:
        return None
    fp = str(z[SHARD_FP])
    return None if fp in shard_fingerprints(manifest) else fp


_WRITERS_SEEN: dict = {}   # manifest path -> (its stat, its fingerprints): parsed again only once it is replaced


def check_writer(folder: Path, fingerprint: str, mine: dict | None = None) -> None:
    """Refuse to write another shard when the folder's manifest no longer names this extraction: a second
    `extract --shard i/n` with other settings (model, image size, images, ...) started into the same --out before
    any shard existed, and wrote its own manifest over this one's. The manifest is parsed again only when it was
    replaced (an atomic write: another inode): parsed before every shard, a store of 10^6 images spent hours on it
    (an audit, session 53). ``mine``: this extraction's manifest, to say when only the images differ."""
    mpath = folder / "manifest.json"
    try:
        st = os.stat(mpath)
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        key = None
    seen = _WRITERS_SEEN.get(str(mpath))
    if key is not None and seen is not None and seen[0] == key:
        fps, m = seen[1], None
    else:
        m = read_manifest(mpath, "delete the feature folder and extract again (or choose a new --out)")
        fps = shard_fingerprints(m)
        if key is not None:
            _WRITERS_SEEN[str(mpath)] = (key, fps)
    if fingerprint not in fps:
        m = m or read_manifest(mpath, "delete the feature folder and extract again (or choose a new --out)")
        same = ("source", "settings", "vector_names", *CALIBRATION_KEYS)
        if mine is not None and all(m.get(k) == mine.get(k) for k in same):
            was = {i["path"] for i in mine["items"]}
            now = {i["path"] for i in m["items"]}
            new = sorted(now - was) or sorted(was - now)
            raise BadInputError("the data folder changed since this extraction started: another `uninet-feat "
                                "extract` of the same settings found other images"
                                + (f" (e.g. {new[0]})" if new else ""), path=folder,
                                fix="re-run the command (every `--shard i/n` process), which extracts the folder as "
                                    "it is now and keeps the finished shards")
        raise BadInputError("another `uninet-feat extract` with other settings (model, image size, tiling, images "
                            "or calibration) has taken over this feature folder since this one started",
                            path=folder, fix="give every `--shard i/n` process the same arguments, or each setting "
                                             "its own --out; then re-run the command")


def shard_vectors_shape(path) -> tuple:
    """The shape of a shard's ``vectors``, from its .npy header alone (no data read)."""
    import zipfile
    with zipfile.ZipFile(path) as z, z.open("vectors.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        return read(f)[0]


def file_stamp(st: os.stat_result) -> list:
    """[size, mtime_ns, ctime_ns]: what tells a replaced file from the one a result was made of, without reading
    it. ctime because `cp -p` (or a restore from a backup) writes other pixels of the same size under the old
    mtime, and only the inode's change time moves (git's index compares it too). Its cost: a data folder copied
    or restored with its times kept still reads as changed, so its features are extracted again."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def changed_on_disk(recorded: dict, paths=None) -> list:
    """Those of ``paths`` (default: every path of ``recorded``, a manifest's ``files``) whose file on disk is not the
    version ``recorded`` stamped (`file_stats`): replaced, edited or gone."""
    now = file_stats(recorded if paths is None else paths)
    return [p for p, st in now.items() if not same_stamp(recorded.get(p), st)]


def same_stamp(was, now) -> bool:
    """Whether a recorded stamp names the same file version; a stamp from before session 38 holds [size,
    mtime_ns] only and is compared on those."""
    if was is None or now is None:
        return was is None and now is None
    return list(was) == list(now)[:len(was)]


def file_stats(paths) -> dict:
    """{path: file_stamp} of each distinct path (None where it cannot be stat'ed): what a resume compares to tell
    a replaced image from the one a shard was made of. One stat per image, no read: cheap for 10^5."""
    out = {}
    for p in paths:
        if p not in out:
            try:
                out[p] = file_stamp(os.stat(p))
            except OSError:
                out[p] = None
    return out


def _changed_files(old: dict, manifest: dict) -> set[str]:
    """The image paths both manifests record whose file changed between them (size, mtime or ctime); none when
    either has no ``files`` (a store from before they were recorded cannot tell)."""
    was, now = old.get("files"), manifest.get("files")
    if was is None or now is None:
        return set()
    return {p for p, v in now.items() if p in was and not same_stamp(was[p], v)}


def _stale_shards(folder: Path, old: dict, manifest: dict) -> set[int]:
    """Shards on disk that hold an image whose file changed (size, mtime or ctime) since the store recorded it, named in a
    warning. A store from before ``files`` was recorded cannot tell: taken as it is."""
    changed = _changed_files(old, manifest)
    if not changed:
        return set()
    size, hit = manifest["settings"]["shard_size"], {}
    for j, it in enumerate(manifest["items"]):
        if it["path"] in changed:
            hit.setdefault(j // size, set()).add(it["path"])
    stale = {i for i in hit if (folder / shard_name(i)).exists()}   # one not written yet is extracted anyway
    if stale:
        names = sorted(set().union(*(hit[i] for i in stale)))
        warnings.warn(f"{folder}: {len(names)} image(s) changed since their features were extracted (size, "
                      f"modification or change time): {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}; "
                      f"{', '.join(shard_name(i) for i in sorted(stale))} extracted again")
    return stale


def _retiled(old: dict, manifest: dict) -> list[str]:
    """The images that two manifests of one model and settings disagree on, everything else the same: images added
    or removed (a new image in the folder; one `--skip-bad` skipped, now mended) and images whose number of tiles
    differs, each a file changed since (a picture replaced by a larger one). A resume keeps the shards before the
    first of them (`_resume_retiled`): it was refused ("another image list"), and every finished shard was lost for
    one image (an audit, session 53). Else [], also when most of the stored images are left out (another folder),
    or any left out is still on disk (another selection: the store is not cut down to it)."""
    same = ("source", "settings", "vector_names", "schema_version", "tile_score", *CALIBRATION_KEYS)
    if any(old.get(k) != manifest.get(k) for k in same) or not old.get("files"):
        return []

    def tiles(m) -> dict:   # path -> its number of items, in the store's order
        n: dict = {}
        for it in m["items"]:
            n[it["path"]] = n.get(it["path"], 0) + 1
        return n
    was, now = tiles(old), tiles(manifest)
    retiled = [p for p in now if p in was and was[p] != now[p]]
    if not set(retiled) <= _changed_files(old, manifest):
        return []   # another number of tiles from an unchanged file: not this store's extraction
    removed = [p for p in was if p not in now]
    if 2 * len(removed) > len(was):   # most of its images gone: another image list (another --data), whose store
        return []                     # this would replace, not the same folder grown or mended
    if any(os.path.exists(p) for p in removed):   # still there: another selection of them (a subset --split-csv, a
        return []   # --group), whose store this would cut down, not images taken out (a review, session 53)
    return [*removed, *(p for p in now if p not in was), *retiled]


def _resume_retiled(folder: Path, old: dict, manifest: dict, names: list[str], by_group: bool) -> set[int]:
    """Resume a tiled store some of whose images changed size (`_retiled`): its rows shift from the first such
    image on, so the shards before it that hold no changed image (``by_group``: nor a regrouped item, whose score
    takes its group's position offsets) are kept, re-stamped with the new fingerprint
    (an old `--shard i/n` process must not add rows of the old layout), and the rest are extracted again. It
    was refused ("choose a new --out"), which lost every finished shard for one replaced picture. Returns the
    kept shard ids. A kill part-way is resumed by the same command: the old manifest is replaced last."""
    size = manifest["settings"]["shard_size"]
    was, now = old["items"], manifest["items"]
    moved = ("path", "tile", "group") if by_group else ("path", "tile")
    cut = next((j for j, (a, b) in enumerate(zip(was, now)) if any(a.get(k) != b.get(k) for k in moved)),
               min(len(was), len(now)))
    changed = _changed_files(old, manifest)
    keep = {i for i in range(cut // size) if not any(it["path"] in changed for it in now[i * size:(i + 1) * size])}
    found, kept = list(folder.glob("shard-*.npz")), {shard_name(i) for i in keep}
    for q in found:   # every other shard, also past either manifest's count
        if q.name not in kept:
            q.unlink(missing_ok=True)
    (folder / "complete").unlink(missing_ok=True)
    # a kept shard is the old store's (or, after a kill part-way through this, already re-stamped)
    ours, done = shard_fingerprints(old) | {manifest["fingerprint"]}, set()
    for i in sorted(keep):
        q = folder / shard_name(i)
        try:
            with np.load(q) as z:
                arrays = {k: z[k] for k in z.files if k != SHARD_FP}
                fp = str(z[SHARD_FP]) if SHARD_FP in z.files else None
        except Exception:   # noqa: BLE001 - missing or unreadable: extracted again
            q.unlink(missing_ok=True)
            continue
        if fp is not None and fp not in ours:   # another extraction's (a race): extracted again
            q.unlink()
            continue
        if fp != manifest["fingerprint"]:
            write_shard(folder, i, arrays, fingerprint=manifest["fingerprint"])
        done.add(i)
    warnings.warn(f"{folder}: {len(names)} image(s) were added, removed or changed size since the store's features "
                  f"were extracted (e.g. {', '.join(names[:3])}), so the rows from the first of them on moved; "
                  f"{len(done)} of the {len(found)} finished shard(s) kept, the rest extracted again")
    atomic_write_text(folder / "manifest.json", json.dumps(manifest))
    return done


def _recalibrated(old: dict, manifest: dict) -> bool:
    """Whether the calibration alone tells two manifests apart (same model, settings and images), so that the
    refusal names it rather than "another model": a `calibrate` between two extracts is the likely cause."""
    if "calibration_sha256" not in old or all(old.get(k) == manifest.get(k) for k in CALIBRATION_KEYS):
        return False
    def what(m):   # the run's folder aside: the fingerprint names the model by its sha256, not where it is
        return ({k: v for k, v in (m.get("source") or {}).items() if k != "run"}, m.get("settings"),
                [i["path"] for i in m.get("items", [])])
    return what(old) == what(manifest)


def read_manifest(mpath: Path, fix: str) -> dict:
    """A store's manifest.json, refused (naming it and ``fix``) unless it is one: JSON that is not ours (another
    tool's manifest.json) or a damaged one (a list, no ``items``) was an AttributeError / KeyError traceback."""
    m = read_json(mpath, fix)
    if not isinstance(m, dict) or m.get("schema") != SCHEMA:
        raise BadInputError("this manifest.json is not a feature store's (its schema is not "
                             f"{SCHEMA!r})", path=mpath, fix=fix)
    if not isinstance(m.get("items"), list) or not all(isinstance(i, dict) for i in m["items"]) \
            or not isinstance(m.get("n_shards"), int):
        raise BadInputError("damaged feature-store manifest (no item list or shard count)", path=mpath, fix=fix)
    return m


def start_store(folder: Path, manifest: dict, legacy=(), by_group: bool = False) -> set[int]:
    """Create or re-open a store; returns the shard ids already finished. ``legacy``: the fingerprints older
    versions gave the same extraction, also accepted (a store is not refused for a change of the fingerprint's
    recipe). A finished shard that holds an image changed since (the manifest's ``files``) is removed to be redone:
    the fingerprint names the images by path alone; with ``by_group`` (the scores take the item's group's position
    offsets) so is one holding an item whose group changed."""
    folder.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(folder)   # shards (or a manifest) a killed writer left half-written
    mpath = folder / "manifest.json"
    started = any(folder.glob("shard-*.npz"))   # a store that failed before its first shard is started over
    # never written over: another tool's manifest.json in --out, nor a damaged store's
    old = read_manifest(mpath, "delete the feature folder and extract again (or choose a new --out)") \
        if mpath.exists() else None
    if old is not None and started:
        # the fingerprint names the model, settings and images, not the columns: a store of an older schema (or
        # other columns) of the same extraction must not be resumed, its shards are narrower than this manifest
        same = old.get("fingerprint") in (manifest["fingerprint"], *legacy)
        other_columns = old.get("vector_names", manifest.get("vector_names")) != manifest.get("vector_names")
        if not same or other_columns:
            was, now = old.get("schema_version", 1), manifest.get("schema_version")
            if now is not None and was < now:
                what = f"features of an older version (feature schema {was}, now {now})"
            elif same:
                what = "features with other columns"
            elif _recalibrated(old, manifest):
                what = ("features made with another calibration of the run (its calibration.json changed since, "
                        "e.g. by `uninet-feat calibrate`: other scores and map features)")
            elif names := _retiled(old, manifest):
                return _resume_retiled(folder, old, manifest, names, by_group)
            else:
                what = "features of another model, settings or image list"
            raise BadInputError(f"feature folder holds {what}", path=folder,
                                fix="choose a new --out, or delete the folder to start over")
        # the same images' features, but their labels / splits / groups are the caller's now: a relabelled or
        # re-split CSV must reach train-head and index (a stale split would put test images in a kNN bank)
        meta = ("label", "split", "group", "is_normal")
        pairs = list(zip(old.get("items", []), manifest["items"]))
        regrouped = {j for j, (a, b) in enumerate(pairs) if a.get("group") != b.get("group")} if by_group else set()
        kept = {b["path"] for j, (a, b) in enumerate(pairs)
                if j not in regrouped and any(a.get(k) != b.get(k) for k in meta)}
        if kept:
            warnings.warn(f"{folder}: {len(kept)} image(s) have another label, split or group than when their "
                          "features were extracted; the store now records the new ones (its features are unchanged)")
        size = manifest["settings"]["shard_size"]
        moved = {j // size for j in regrouped if (folder / shard_name(j // size)).exists()}
        if moved:
            names = sorted({manifest["items"][j]["path"] for j in regrouped if j // size in moved})
            warnings.warn(f"{folder}: {len(names)} image(s) have another group than when their features were "
                          f"extracted, and the run scores tiles less their group's position offsets: "
                          f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''}; "
                          f"{', '.join(shard_name(i) for i in sorted(moved))} extracted again")
        stale = _stale_shards(folder, old, manifest) | moved
        for i in stale:   # before the manifest takes the new stats: a kill in between still redoes them (another
            (folder / shard_name(i)).unlink(missing_ok=True)   # `--shard i/n` process may have removed it first)
        if stale:
            (folder / "complete").unlink(missing_ok=True)
        # resumed under an older fingerprint recipe: its shards (and those of earlier ones) stay the store's own
        was = {*old.get("resumed_from", []), old["fingerprint"]} - {manifest["fingerprint"]}
        if was:
            manifest = {**manifest, "resumed_from": sorted(was)}
        if old != manifest:
            atomic_write_text(mpath, json.dumps(manifest))
        done = set()
        for i in range(manifest["n_shards"]):
            p = folder / shard_name(i)
            if p.exists():
                try:
                    with np.load(p) as z:
                        z["vectors"]
                        other = shard_writer(z, manifest)
                except Exception:
                    p.unlink()  # a shard that cannot be read is redone
                    continue
                if other is None:
                    done.add(i)
                else:   # written by a process with other settings (`check_writer` missed the race): redone
                    warnings.warn(f"{p}: written by an extraction with other settings; extracted again")
                    p.unlink()
        return done
    atomic_write_text(mpath, json.dumps(manifest))
    return set()


class FeatureStore:
    """Read a finished (or partial, with ``allow_partial``) feature folder."""

    def __init__(self, folder, allow_partial: bool = False):
        self.folder = Path(folder)
        mpath = self.folder / "manifest.json"
        if not mpath.exists():
            raise BadInputError("not a feature folder (no manifest.json)", path=self.folder,
                                fix="run `uninet-feat extract --out FOLDER` first")
        self.manifest = read_manifest(mpath, "extract again into a new --out")
        if self.manifest.get("schema_version", 0) > SCHEMA_VERSION:
            raise BadInputError("unknown feature schema", path=mpath, fix="re-extract with this version")
        if not allow_partial and not (self.folder / "complete").exists():
            raise BadInputError("extraction did not finish", path=self.folder,
                                fix="re-run the same `uninet-feat extract` command to resume it")
        self.items = self.manifest["items"]
        self._check_width()

    def _check_width(self, width: int | None = None, shard: int | None = None) -> None:
        """Refuse vectors whose width is not the manifest's number of column names. A schema-2 store resumed by a
        schema-3 extract (before that was refused) kept its 203-column shards under 259 names: its columns were read
        under other columns' names, and only `distributed.validate_store` said so. ``width``: of shard ``shard``'s
        vectors, read already; without, the first shard's, from its header alone (no data read)."""
        names = self.manifest.get("vector_names")
        if names is None:
            return
        if width is None:
            first = next((i for i in range(self.manifest["n_shards"]) if (self.folder / shard_name(i)).exists()), None)
            if first is None:
                return
            try:
                shape = shard_vectors_shape(self.folder / shard_name(first))
            except Exception:   # noqa: BLE001 - an unreadable shard is named when it is read
                return
            if len(shape) != 2:
                return
            width, shard = shape[1], first
        if width != len(names):
            raise BadInputError(f"{shard_name(shard)} holds vectors of {width} columns, but the manifest names "
                                f"{len(names)} (a store written partly by another version, or with other columns: "
                                "its columns cannot be told apart)", path=self.folder,
                                fix="extract again into a new folder (a new --out)")

    def _shards(self, key: str):
        """(shard id, its ``key`` array or None where it has none) for each shard on disk. A shard that cannot be
        read (truncated by a full disk or a cut-short copy) is named, not left to zipfile's traceback. The fix says
        to delete it: extract redoes a missing shard, but keeps one whose vectors still read (all it checks)."""
        for i in range(self.manifest["n_shards"]):
            p = self.folder / shard_name(i)
            if not p.exists():
                continue
            try:
                with np.load(p) as z:
                    a = z[key] if key in z.files else None
                    other = shard_writer(z, self.manifest)
            except Exception as e:   # noqa: BLE001 - BadZipFile, a CRC error, a short read, a bad .npy header
                raise BadInputError(f"unreadable feature shard ({type(e).__name__}: {e})", path=p,
                                    fix=f"delete {p.name}, then re-run the same `uninet-feat extract` command (it "
                                        "redoes missing shards)") from e
            if other is not None:
                raise BadInputError("feature shard written by an extraction with other settings than the "
                                    "manifest's (two `--shard i/n` processes started with different arguments)",
                                    path=p, fix=f"delete {p.name}, then re-run the manifest's `uninet-feat extract` "
                                                "command (it redoes missing shards)")
            yield i, a

    def _short(self, key: str, n_rows: int) -> BadInputError:
        gone = [shard_name(i) for i in range(self.manifest["n_shards"]) if not (self.folder / shard_name(i)).exists()]
        why = f" ({len(gone)} missing: {', '.join(gone[:3])}{', ...' if len(gone) > 3 else ''})" if gone else ""
        return BadInputError(f"the shards hold {n_rows} '{key}' rows for {len(self.items)} items{why}",
                             path=self.folder, fix="re-run the same `uninet-feat extract` to finish or repair the store")

    def array(self, key: str) -> np.ndarray:
        """``key`` of every item, in item order; refused unless there is exactly one row per item (a deleted shard
        would shift every later row onto another item's record)."""
        parts = []
        for i, a in self._shards(key):
            if a is not None:
                parts.append(a)
                if key == "vectors":   # every shard's width, not only the first's
                    self._check_width(a.shape[1], i)
        if not parts:
            raise BadInputError(f"no '{key}' in this feature store", path=self.folder,
                                fix="re-extract with --patches" if key == "patches" else None)
        out = np.concatenate(parts)
        if len(out) != len(self.items):
            raise self._short(key, len(out))
        return out

    def rows(self, key: str, keep, dtype=np.float32) -> np.ndarray:
        """The rows of ``key`` where the boolean ``keep`` (one per item) holds, as one ``dtype`` array read shard by
        shard: the peak is the result plus one shard, where ``array(key)[keep].astype(dtype)`` held the whole
        store, its kept rows and their copy (a patch bank of 100,000 images at 256 px: about 100 GB)."""
        keep = np.asarray(keep, bool)
        if len(keep) != len(self.items):   # checked first: a short mask could end at a shard's border unseen
            raise BadInputError(f"{len(keep)} row flags for the store's {len(self.items)} items", path=self.folder,
                                fix="pass one flag per item of the store (its manifest's items)")
        out, start, pos = None, 0, 0
        for i, a in self._shards(key):
            if a is None:
                continue
            if key == "vectors":
                self._check_width(a.shape[1], i)
            sel = keep[start:start + len(a)]
            if out is None:
                out = np.empty((int(keep.sum()),) + a.shape[1:], dtype)
            if len(sel) != len(a):
                break
            out[pos:pos + int(sel.sum())] = a[sel]
            start, pos = start + len(a), pos + int(sel.sum())
        if out is None:
            raise BadInputError(f"no '{key}' in this feature store", path=self.folder,
                                fix="re-extract with --patches" if key == "patches" else None)
        if start != len(keep):
            raise self._short(key, start)
        return out

    @property
    def vectors(self) -> np.ndarray:
        return self.array("vectors")

    @property
    def scores(self) -> np.ndarray:
        return self.array("scores")

    def image_table(self):
        """One row per image (tiles aggregated by ``aggregate_tiles``) and its record; ``score``: its tiles' scores
        reduced by the run's ``tile_score``; ``top_tile``: the box of the tile whose vector is the row's first half
        (None for an untiled image, or without scores)."""
        keys = [it["path"] for it in self.items]
        sc = self.scores   # read once from the shards, for the rows and the records
        # the image's score as evaluate and predict give it (the run's tile_score); stores before session 37: max
        from .data.tiling import tile_score_reducer
        reduce = tile_score_reducer(self.manifest.get("tile_score", "max"))
        X, order = aggregate_tiles(self.vectors, sc, keys)
        recs = []
        for path, idx in order:
            rec = dict(self.items[idx[0]])
            rec.pop("tile", None)
            s = sc[idx]
            scored = bool(np.isfinite(s).any())
            rec["score"] = float(reduce(s[np.isfinite(s)])) if scored else float("nan")
            rec["n_tiles"] = len(idx)
            rec["top_tile"] = self.items[idx[int(np.nanargmax(s))]].get("tile") if scored and len(idx) > 1 else None
            recs.append(rec)
        return X, recs


def head_columns(vector_names) -> list[str]:
    """A head's column names: the top tile's vector, then the mean over tiles (`aggregate_tiles`)."""
    return [f"top_{n}" for n in vector_names] + [f"mean_{n}" for n in vector_names]


def without_twin_half(X: np.ndarray, names: list) -> tuple[np.ndarray, list]:
    """(X, names) less the mean half when every row's mean over tiles equals its top tile (an untiled store, or
    one image a tile): the same numbers twice cost LightGBM twice the time for the same trees (`train-head` on
    magnetic tile's 392 defect rows: 218.6 s against 116.6 s, the same out-of-fold figures, docs/results.md) and
    split each column's importance in two.
    `predict` finds a head's columns by name, so such a head is read as any other."""
    d = X.shape[1] // 2
    if X.shape[1] % 2 == 0 and len(X) and np.array_equal(X[:, :d], X[:, d:], equal_nan=True):
        return X[:, :d], list(names[:d])
    return X, list(names)


def aggregate_tiles(vectors: np.ndarray, scores: np.ndarray, keys) -> tuple[np.ndarray, list]:
    """Per image: [vector of its highest-scoring tile, mean vector over its tiles] (2D columns).

    The top tile carries the defect when there is one, the mean carries the fabric's overall look.
    Without scores (plain backbone features have no anomaly score) the first half is the elementwise
    maximum over the tiles instead, which still sees a defect in any tile, where a fixed tile (the
    first: background on some fabric strips) would not. Single-tile images give [v, v].
    Returns (X, [(key, item indices)] in first-seen order).
    """
    groups: dict = {}
    for j, k in enumerate(keys):
        groups.setdefault(k, []).append(j)
    rows = []
    for k, idx in groups.items():
        v, s = vectors[idx], scores[idx]
        first = v[int(np.nanargmax(s))] if np.isfinite(s).any() else v.max(0)
        rows.append(np.concatenate([first, v.mean(0)]))
    return np.stack(rows).astype(np.float32), list(groups.items())
