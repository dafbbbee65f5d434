"""Feature-store edges: a replaced weights file, a random-init backbone, a 2-level run with --patches, a killed
writer's temp files, a damaged or foreign manifest.json."""
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from uninet_feat import featstore
from uninet_feat.errors import BadInputError
from uninet_feat.extract import Extractor, _fingerprint
from uninet_feat.featstore import FeatureStore

from _tiny import TinyBackbone, register_tiny, write_texture_set

register_tiny()


def _images(root, n=4, size=64):
    from PIL import Image
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(root / f"{i:03d}.png")
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(paths[-1])
    return paths


class _Killed(Exception):
    pass


def _kill_after_first(k):
    if k == 0:
        raise _Killed


def _save_weights(path, seed):
    torch.manual_seed(seed)
    torch.save(TinyBackbone().state_dict(), path)


def test_a_replaced_weights_file_is_not_resumed_onto_the_old_files_features(tmp_path):
    """Plain features fingerprinted a weights file by its path alone: a file replaced at the same path resumed
    onto the old file's shards and predict's parts. Stores from before its sha256 was recorded still resume."""
    ps, w = _images(tmp_path / "img"), tmp_path / "w.pt"
    _save_weights(w, 0)
    ex = Extractor(backbone="tiny", weights=str(w), image_size=64)
    with pytest.raises(_Killed):
        ex.extract_to(ps, tmp_path / "f", shard_size=2, on_shard=_kill_after_first)
    assert ex.extract(ps, parts=tmp_path / "parts")["resumed"] == 0
    _save_weights(w, 1)   # replaced between the kill and the resume
    ex = Extractor(backbone="tiny", weights=str(w), image_size=64)
    with pytest.raises(BadInputError, match="another model, settings or image list"):
        ex.extract_to(ps, tmp_path / "f", shard_size=2)
    assert ex.extract(ps, parts=tmp_path / "parts")["resumed"] == 0   # scored again with the new file
    # a store written before the file's sha256 was in its fingerprint: resumed as before (it cannot tell)
    f = tmp_path / "old"
    ex.extract_to(ps, f, shard_size=2)
    m = json.loads((f / "manifest.json").read_text())
    del m["source"]["weights_sha256"]
    m["fingerprint"] = _fingerprint({k: v for k, v in m["source"].items() if k != "run"}, m["settings"],
                                    [i["path"] for i in m["items"]])
    (f / "manifest.json").write_text(json.dumps(m))
    (f / "shard-00001.npz").unlink()
    assert ex.extract_to(ps, f, shard_size=2) is not None
    assert ex.source["weights_sha256"] == featstore.file_sha256(w)
    assert json.loads((f / "manifest.json").read_text())["source"]["weights_sha256"] == featstore.file_sha256(w)


def test_a_random_init_backbone_is_the_same_in_every_process_and_leaves_the_callers_rng(tmp_path):
    """`--weights random` plain features built another random network in every run, resume and --shard process:
    one store held two networks' features."""
    ps = _images(tmp_path / "img")
    a, b = [(torch.manual_seed(seed), Extractor(backbone="tiny", weights="random", image_size=64))[1]
            for seed in (1, 2)]   # two processes: their RNGs in other states
    assert a.extract_to(ps, tmp_path / "f", shard_size=2, shard=(0, 2)) is None
    st = b.extract_to(ps, tmp_path / "f", shard_size=2, shard=(1, 2))
    np.testing.assert_allclose(st.vectors, a.extract(ps)["vectors"], rtol=1e-5, atol=1e-6)
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    Extractor(backbone="tiny", weights="random", image_size=64)
    assert torch.equal(torch.rand(3), want)   # the caller's RNG is not drawn from


def _two_levels(name, weights="random", levels=None, **_):
    m = TinyBackbone((8, 16), (4, 8))
    m.levels, m.name = (1, 2), "tiny2"
    return m


@pytest.mark.filterwarnings("ignore:the default threshold")   # one validation normal: fine here
def test_patches_of_a_two_level_run_are_refused_before_any_extraction(tmp_path, capsys):
    """Patch vectors are levels 2 and 3 on the level-2 grid: `extract --run R --patches` of a 2-level run
    (train --levels 2,3) died with an IndexError in `export.patch_vectors`."""
    from uninet_feat.backbones import register_backbone
    from uninet_feat.cli import main
    from uninet_feat.config import load_config
    from uninet_feat.train import train
    try:
        register_backbone("tiny2", _two_levels)
    except Exception:
        pass   # already registered in this process
    data = write_texture_set(tmp_path / "d", n_train=4, n_good=1, n_bad=1)
    run = tmp_path / "run"
    train(load_config(None, {"data": str(data)}, base={"backbone": "tiny2", "weights": "random", "image_size": 64,
                                                       "decoder_depths": [1, 1], "epochs": 1, "batch_size": 4,
                                                       "channels_last": False}), run, quiet=True)
    with pytest.raises(BadInputError, match="levels 2 and 3, and this run has 2 level") as e:
        Extractor(run=run, patches=True)
    assert str(run) in str(e.value) and "drop --patches" in str(e.value)
    with pytest.raises(BadInputError, match="backbone tiny2 has 2 level"):
        Extractor(backbone="tiny2", patches=True)
    capsys.readouterr()
    out = tmp_path / "f"
    assert main(["extract", "--data", str(data), "--run", str(run), "--patches", "--quiet", "--out", str(out)]) == 2
    assert "Traceback" not in capsys.readouterr().err and not (out / "manifest.json").exists()
    assert Extractor(run=run).extract(sorted((data / "train" / "good").glob("*.png")))["vectors"].shape[0] == 4


# atomic_write in a child process killed mid-write (SIGKILL: no cleanup runs)
_KILLED_WRITER = ("import os, signal, sys; from uninet_feat.io import atomic_write\n"
                  "def w(tmp):\n    open(tmp, 'wb').write(b'x' * 1000); os.kill(os.getpid(), signal.SIGKILL)\n"
                  "atomic_write(sys.argv[1], w)")


def _killed_write(path):
    r = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path)], timeout=120)
    assert r.returncode == -signal.SIGKILL


def test_a_killed_writers_temp_files_are_removed_when_the_store_or_parts_are_reopened(tmp_path):
    """A SIGKILL while a shard or part was written left its .tmp file for ever; a live writer's is kept."""
    ps, f, parts = _images(tmp_path / "img"), tmp_path / "f", tmp_path / "parts"
    _killed_write(f / "shard-00001.npz")
    _killed_write(parts / "part-00000.npz")
    (dead,), (dead_part,) = f.glob(".shard-00001.npz.*.tmp"), parts.glob(".part-*.tmp")
    # the same writer's name, but this process's: a writer still alive
    live = f / re.sub(r"-pid\d+\.", f"-pid{os.getpid()}.", dead.name).replace("shard-00001", "shard-00000")
    live.write_bytes(b"x")
    ex = Extractor(backbone="tiny", weights="random", image_size=64)
    assert ex.extract_to(ps, f, shard_size=2) is not None
    assert not dead.exists() and [p.name for p in f.glob(".*.tmp")] == [live.name]
    ex.extract(ps, parts=parts)
    assert not dead_part.exists() and not list(parts.glob(".*.tmp"))


@pytest.mark.parametrize("manifest", [[], {"schema": featstore.SCHEMA},
                                      {"schema": featstore.SCHEMA, "items": [], "schema_version": 3}],
                         ids=["a list", "no items", "no shard count"])
def test_a_damaged_manifest_is_named_not_a_traceback(tmp_path, manifest):
    ps, f = _images(tmp_path / "img"), tmp_path / "f"
    ex = Extractor(backbone="tiny", weights="random", image_size=64)
    ex.extract_to(ps, f, shard_size=2)
    (f / "manifest.json").write_text(json.dumps(manifest))
    for open_it in (lambda: FeatureStore(f), lambda: ex.extract_to(ps, f, shard_size=2)):
        with pytest.raises(BadInputError) as e:
            open_it()
        assert str(f / "manifest.json") in str(e.value) and "new --out" in str(e.value)


def test_a_manifest_json_that_is_not_a_stores_is_not_written_over(tmp_path):
    ps, f = _images(tmp_path / "img"), tmp_path / "f"
    f.mkdir()
    theirs = json.dumps({"name": "my-app", "version": "1.0"})
    (f / "manifest.json").write_text(theirs)
    with pytest.raises(BadInputError, match="not a feature store's") as e:
        Extractor(backbone="tiny", weights="random", image_size=64).extract_to(ps, f, shard_size=2)
    assert "new --out" in str(e.value)
    assert (f / "manifest.json").read_text() == theirs and not list(f.glob("shard-*"))


def test_two_shard_processes_with_other_settings_do_not_mix_one_store(tmp_path):
    """`extract --shard 0/2` and `--shard 1/2` started with other settings into one --out: the second, starting
    before any shard existed, wrote its manifest over the first's, and both filled the store — one 'complete'
    store of two image sizes' features. The first now stops at its next shard; a shard written in the race
    (after that check) is named when read and redone by a resume."""
    ps, f = _images(tmp_path / "img", n=8), tmp_path / "f"
    a = Extractor(backbone="tiny", weights="random", image_size=64)
    b = Extractor(backbone="tiny", weights="random", image_size=48)
    run_a = a._run
    def a_run(ds, rows):   # process b starts while a is busy with its first shard
        if not (f / "shard-00001.npz").exists():
            b.extract_to(ps, f, shard_size=2, shard=(1, 2))
        return run_a(ds, rows)
    a._run = a_run
    with pytest.raises(BadInputError, match="other settings .* has taken over") as e:
        a.extract_to(ps, f, shard_size=2, shard=(0, 2))
    assert str(f) in str(e.value) and "same arguments" in str(e.value)
    assert sorted(p.name for p in f.glob("shard-*")) == ["shard-00001.npz", "shard-00003.npz"]
    st = b.extract_to(ps, f, shard_size=2)   # b's remaining shards: a store of b's features alone
    np.testing.assert_allclose(st.vectors, b.extract(ps)["vectors"], rtol=1e-5, atol=1e-6)
    # the race past the check: a shard of a's on disk under b's manifest
    a._run = run_a
    with np.load(f / "shard-00002.npz") as z:
        arrays = {k: z[k] for k in z.files}
    featstore.write_shard(f, 2, {**arrays, "vectors": arrays["vectors"] + 1}, fingerprint="another extraction's")
    with pytest.raises(BadInputError, match="other settings than the manifest's") as e:
        FeatureStore(f).vectors
    assert "shard-00002.npz" in str(e.value)
    with pytest.warns(UserWarning, match="shard-00002.npz: written by an extraction with other settings"):
        st = b.extract_to(ps, f, shard_size=2)
    np.testing.assert_allclose(st.vectors, b.extract(ps)["vectors"], rtol=1e-5, atol=1e-6)


def test_a_tiled_store_whose_image_changed_size_resumes_from_that_image(tmp_path, monkeypatch):
    """An image replaced by a larger one has more tiles, so the store's rows move from it on. The resume was refused
    ("choose a new --out"), losing every finished shard; it now keeps the shards before that image, re-stamped with
    the new fingerprint, extracts the rest, and gives the store a fresh extraction gives. A kill before the new
    manifest is written is resumed by the same command."""
    import io
    from PIL import Image
    rng = np.random.default_rng(0)
    ps = [tmp_path / "img" / f"{i}.png" for i in range(4)]
    ps[0].parent.mkdir()
    for p in ps:
        Image.fromarray(rng.integers(0, 256, (64, 192, 3), dtype=np.uint8)).save(p)
    make = lambda: Extractor(backbone="tiny", weights="random", image_size=64, tile=64)  # noqa: E731
    f = tmp_path / "f"
    assert len(make().extract_to(ps, f, shard_size=4).items) == 12   # 3 shards of 4 tiles
    kept = {i: (f / featstore.shard_name(i)).read_bytes() for i in (0, 1)}
    Image.fromarray(rng.integers(0, 256, (64, 256, 3), dtype=np.uint8)).save(ps[3])   # 4 tiles now: items 9..12
    ex = make()
    real_write, calls = featstore.atomic_write_text, []
    def killed_at_manifest(path, text):   # a kill after the shards were sorted out, before the new manifest
        if path.name == "manifest.json" and not calls:
            calls.append(path)
            raise _Killed
        return real_write(path, text)
    monkeypatch.setattr(featstore, "atomic_write_text", killed_at_manifest)
    with pytest.warns(UserWarning, match=r"1 image\(s\) were added, removed or changed size .*3\.png.*2 of the 3 "
                                         r"finished shard"), \
            pytest.raises(_Killed):
        ex.extract_to(ps, f, shard_size=4)
    assert sorted(q.name for q in f.glob("shard-*")) == ["shard-00000.npz", "shard-00001.npz"]
    rows, run = [], ex._run
    ex._run = lambda ds, r, *a: rows.append(list(r)) or run(ds, r, *a)
    with pytest.warns(UserWarning, match="2 of the 2 finished shard"):
        st = ex.extract_to(ps, f, shard_size=4)
    assert rows == [[8, 9, 10, 11], [12]]   # shards 0 and 1 (images 0-2's first tiles) were not extracted again
    fresh = make().extract_to(ps, tmp_path / "fresh", shard_size=4)
    assert st.manifest["fingerprint"] == fresh.manifest["fingerprint"] and len(st.items) == 13
    assert [i["tile"] for i in st.items] == [i["tile"] for i in fresh.items]
    np.testing.assert_allclose(st.vectors, fresh.vectors, rtol=1e-5, atol=1e-6)
    for i, old in kept.items():   # the kept shards: the same arrays under the new fingerprint
        with np.load(f / featstore.shard_name(i)) as z, np.load(io.BytesIO(old)) as o:
            assert str(z["fingerprint"]) == fresh.manifest["fingerprint"] != str(o["fingerprint"])
            np.testing.assert_array_equal(z["vectors"], o["vectors"])
    # an image fewer still on disk: another selection (a subset CSV), refused, the store not cut down to it; one
    # taken out of the folder: the same resume, from the first image the lists disagree on (session 53)
    with pytest.raises(BadInputError, match="another model, settings or image list"):
        make().extract_to(ps[:3], f, shard_size=4)
    ps[3].unlink()
    with pytest.warns(UserWarning, match=r"1 image\(s\) were added, removed or changed size .*3\.png"):
        st = make().extract_to(ps[:3], f, shard_size=4)
    assert len(st.items) == 9
    np.testing.assert_allclose(st.vectors, make().extract(ps[:3])["vectors"], rtol=1e-5, atol=1e-6)


def test_a_store_resumes_after_an_image_was_added_or_a_skipped_one_mended(tmp_path):
    """A store killed after its first shards, then an image added to the folder (or one that --skip-bad skipped,
    then mended, back in the list): the same command was refused ("another model, settings or image list"), and
    every finished shard was lost (an audit, session 53). The shards before the first new image are kept."""
    ps = _images(tmp_path / "img", n=6)
    ex = Extractor(backbone="tiny", weights="random", image_size=64)
    with pytest.raises(_Killed):
        ex.extract_to(ps, tmp_path / "f", shard_size=2, on_shard=_kill_after_first)
    first = (tmp_path / "f" / "shard-00000.npz").read_bytes()
    from PIL import Image
    added = tmp_path / "img" / "zz.png"   # sorts last
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(added)
    rows, run = [], ex._run
    ex._run = lambda ds, r, *a: rows.append(list(r)) or run(ds, r, *a)
    with pytest.warns(UserWarning, match=r"1 image\(s\) were added, removed .*zz\.png.*1 of the 1 finished shard"):
        st = ex.extract_to([*ps, added], tmp_path / "f", shard_size=2)
    assert rows == [[2, 3], [4, 5], [6]]   # shard 0 kept, not extracted again
    np.testing.assert_allclose(st.vectors, ex.extract([*ps, added])["vectors"], rtol=1e-5, atol=1e-6)
    with np.load(tmp_path / "f" / "shard-00000.npz") as z, np.load(__import__("io").BytesIO(first)) as o:
        np.testing.assert_array_equal(z["vectors"], o["vectors"])
    other = _images(tmp_path / "other", n=7)   # another folder: refused, its store not replaced
    with pytest.raises(BadInputError, match="another model, settings or image list"):
        ex.extract_to(other, tmp_path / "f", shard_size=2)


def test_an_image_replaced_while_a_sharded_extraction_runs_is_extracted_again(tmp_path):
    """`--shard 0/2` read an image; it was replaced (same size) and `--shard 1/2` started, found no shard of it to
    call stale and recorded the new file; then 0/2 wrote the old pixels' shard, which every re-run kept (an audit,
    session 53). A writer now leaves a shard unwritten when one of its images changed since it started."""
    from PIL import Image
    ps = _images(tmp_path / "img", n=6)
    ex = Extractor(backbone="tiny", weights="random", image_size=64)
    f, real, said = tmp_path / "f", ex._run, []

    def run(ds, span, *a):
        out = real(ds, span, *a)
        if 4 in span and not said:   # 0/2 has read shard 2's images: one is replaced, then 1/2 runs whole
            said.append(1)
            Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(ps[4])
            ex._run = real
            ex.extract_to(ps, f, shard_size=2, shard=(1, 2))
            ex._run = run
        return out
    ex._run = run
    with pytest.warns(UserWarning, match=r"1 image\(s\) changed while they were extracted .*004\.png"):
        assert ex.extract_to(ps, f, shard_size=2, shard=(0, 2)) is None
    assert not (f / "shard-00002.npz").exists()
    ex._run = real
    st = ex.extract_to(ps, f, shard_size=2, shard=(0, 2))   # the re-run the warning names
    np.testing.assert_allclose(st.vectors, ex.extract(ps)["vectors"], rtol=1e-5, atol=1e-6)


def test_a_folder_grown_between_two_shard_processes_is_said_as_such(tmp_path):
    """`--shard 0/2` ran; an image was added and `--shard 1/2` started with the same arguments: 0/2 stopped with
    "another extract with other settings ... give every process the same arguments", which they had (an audit,
    session 53). It now names the changed folder, and the re-run it advises gives a fresh extraction's store."""
    from PIL import Image
    ps = _images(tmp_path / "img", n=6)
    ex = Extractor(backbone="tiny", weights="random", image_size=64)
    f, real, said = tmp_path / "f", ex._run, []
    added = tmp_path / "img" / "zz.png"

    def run(ds, span, *a):
        if 4 in span and not said:   # 0/2 has written shard 0: the folder grows and 1/2 starts
            said.append(1)
            Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(added)
            ex._run = real
            with pytest.warns(UserWarning, match="were added, removed or changed size"):
                ex.extract_to([*ps, added], f, shard_size=2, shard=(1, 2))
            ex._run = run
        return real(ds, span, *a)
    ex._run = run
    with pytest.raises(BadInputError, match=r"the data folder changed since this extraction started.*zz\.png") as e:
        ex.extract_to(ps, f, shard_size=2, shard=(0, 2))
    assert "re-run the command" in e.value.fix
    ex._run = real
    st = ex.extract_to([*ps, added], f, shard_size=2, shard=(0, 2))
    np.testing.assert_allclose(st.vectors, ex.extract([*ps, added])["vectors"], rtol=1e-5, atol=1e-6)


def test_a_writer_parses_the_manifest_again_only_once_it_was_replaced(tmp_path, monkeypatch):
    """Every shard's writer check parsed the whole manifest: 0.36 s a shard at 10^5 images, hours at 10^6 (an
    audit, session 53). It is parsed again only when another process replaced it."""
    from uninet_feat import featstore
    ps = _images(tmp_path / "img", n=8)
    real, calls = featstore.read_manifest, []
    monkeypatch.setattr(featstore, "read_manifest", lambda *a: calls.append(1) or real(*a))
    Extractor(backbone="tiny", weights="random", image_size=64).extract_to(ps, tmp_path / "f", shard_size=1)
    assert len(calls) <= 2   # 8 shards: one parse for the writer's checks, not 8


def test_a_shard_given_to_every_torchrun_process_is_refused(tmp_path, monkeypatch):
    """`torchrun ... extract --shard 0/2`: every rank took shard 0/2, so 0/2 was extracted twice and 1/2 never,
    each printing "complete": false without a word (an audit, session 53)."""
    from uninet_feat.workflows import extract_cmd
    ps = _images(tmp_path / "img", n=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(BadInputError, match=r"--shard 0/2 under torchrun's 2 processes") as e:
        extract_cmd(str(ps[0].parent), str(tmp_path / "f"), backbone="tiny", weights="random", image_size=64,
                    shard="0/2", quiet=True, batch=True)
    assert "drop --shard under torchrun" in e.value.fix and not (tmp_path / "f").exists()
