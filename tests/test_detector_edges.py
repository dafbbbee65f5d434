"""Detector edges: skip_bad over whole chunks, integer PIL modes, in-memory frames named as the caller knows them;
export-model's misspelt group."""
import warnings

import numpy as np
import pytest
from PIL import Image

from uninet_feat.config import load_config
from uninet_feat.detector import Detector
from uninet_feat.errors import BadInputError
from uninet_feat.train import train

from _tiny import register_tiny, write_texture_set

register_tiny()
BASE = {"backbone": "tiny", "weights": "random", "image_size": 64, "epochs": 1, "batch_size": 4,
        "val_fraction": 0.3, "channels_last": False, "seed": 3}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("detector_edges")
    data = write_texture_set(root / "set", n_train=8, n_good=2, n_bad=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # its few validation normals are warned about
        train(load_config(None, {"data": str(data)}, base=BASE), root / "run", quiet=True)
    broken = root / "broken.png"
    broken.write_bytes(b"not a png")
    return root / "run", sorted((data / "test" / "good").glob("*.png")), broken


def _texts(record):
    return [str(w.message) for w in record]


def test_skip_bad_scores_past_a_chunk_of_only_unreadable_images(run):
    """A chunk with no readable image stopped the call ("none of the 1 images is readable") and the chunks after it,
    though skip_bad promises a NaN score for each."""
    r, (good, good2), broken = run
    det = Detector(r, skip_bad=True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = list(det.iter_score([good, broken, good2], chunk=1))
        alone = det.score(broken)
        frame = det.score(np.zeros((4, 64), np.uint8))   # a frame too small to score, alone
    assert [d.path for d in got] == [str(good), str(broken), str(good2)]
    assert np.isfinite(got[0].score) and np.isfinite(got[2].score) and got[1].score != got[1].score
    assert got[1].flagged is None and got[1].map is None
    assert len(alone) == 1 and alone[0].score != alone[0].score and alone[0].path == str(broken)
    assert frame[0].path == "<image 0>" and frame[0].score != frame[0].score
    assert any(t.startswith(f"skipping {broken}") for t in _texts(rec))   # each still warned of
    with pytest.raises(BadInputError, match="1 of 1 images is unreadable"):   # without skip_bad: refused
        Detector(r).score(broken)


def test_the_overlay_of_a_skipped_image_says_it_was_unreadable(run):
    """Its map is None because skip_bad skipped it, not because maps=False was asked for, which the error said."""
    r, (good, _), broken = run
    det = Detector(r, skip_bad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the skip is warned of
        ok, bad = det.score([good, broken])
    assert det.overlay(ok).shape[-1] == 3
    with pytest.raises(BadInputError, match="could not be read, so skip_bad skipped it") as e:
        det.overlay(bad)
    assert str(broken) in str(e.value) and "maps=False" not in str(e.value)


def test_integer_pil_modes_score_as_their_files(run, tmp_path):
    """Mode I (32-bit) and I;16L went to PNG, which Pillow cannot write, and were refused with a convert() fix that
    clips 32-bit values; as TIFF they score as their file does."""
    r, _, _ = run
    det = Detector(r)
    rng = np.random.default_rng(0)
    i32 = (rng.random((60, 70)) * 2**31).astype(np.int32)
    Image.fromarray(i32, mode="I").save(tmp_path / "i32.tif")
    want = det.score(tmp_path / "i32.tif")[0]
    for img in (Image.open(tmp_path / "i32.tif"), Image.fromarray(i32, mode="I")):
        d = det.score(img)[0]
        assert d.path == "<image 0>" and d.score == want.score
        np.testing.assert_array_equal(d.map, want.map)
    u16 = (rng.random((60, 70)) * 65535).astype(np.uint16)
    little = Image.frombytes("I;16L", (70, 60), u16.astype("<u2").tobytes())
    assert det.score(little)[0].score == det.score(u16)[0].score   # as the same pixels' 16-bit array
    with pytest.raises(BadInputError, match="mode I;16N") as e:   # neither container holds it: no clipping fix
        det.score(Image.new("I;16N", (40, 40)))
    assert "convert" not in e.value.fix and "np.asarray(image)" in e.value.fix


def test_in_memory_frames_are_named_as_the_caller_knows_them(run):
    """Errors and warnings named a frame by its temporary file (deleted by then), not ``<image k>``."""
    r, _, _ = run
    frames = [np.full((64, 64, 3), 128, np.uint8), np.zeros((4, 64), np.uint8)]
    with pytest.raises(BadInputError) as e:
        Detector(r).score(frames)
    assert "<image 1>: image is 64x4 px" in str(e.value) and "uninet-feat-frames" not in str(e.value)
    with pytest.warns(UserWarning) as rec:   # re-emitted: the caller's filters see them
        got = Detector(r, skip_bad=True).score(frames)
    assert [d.path for d in got] == ["<image 0>", "<image 1>"] and got[1].score != got[1].score
    texts = _texts(rec)
    assert any(t.startswith("skipping <image 1>: image is 64x4 px") for t in texts)
    assert any("left out of scoring: ['<image 1>']" in t for t in texts)
    assert not [t for t in texts if "uninet-feat-frames" in t]


def test_a_frames_error_with_a_path_is_renamed_whole():
    """An error naming one file (``path``) names the frame in its path, text and fix, and keeps its own fields."""
    from uninet_feat.detector import _named_frames
    names = {"/tmp/uninet-feat-frames-x/000003.tif": "<image 3>"}
    err = BadInputError("cannot read /tmp/uninet-feat-frames-x/000003.tif", path="/tmp/uninet-feat-frames-x/000003.tif",
                        fix="re-export /tmp/uninet-feat-frames-x/000003.tif")
    err.of_mask = True
    with pytest.raises(BadInputError) as e, _named_frames(names):
        raise err
    assert e.value.path == "<image 3>" and e.value.reason == "cannot read <image 3>"
    assert e.value.fix == "re-export <image 3>" and e.value.of_mask is True
    assert "uninet-feat-frames" not in str(e.value)


def test_export_names_a_misspelt_group_first(tmp_path):
    """A tiled run with place offsets of two groups, exported for a misspelt one: it was told to pass --input-size
    (the group's record of sizes is empty), and only with it was the group named."""
    from uninet_feat.deploy import export_model
    for i, g in enumerate(("lineA", "lineB")):
        write_texture_set(tmp_path / "data" / g, n_train=4, n_good=1, n_bad=1, size=32, seed=i, wide=True)
    cfg = load_config(None, {"data": str(tmp_path / "data"), "image_size": 32, "val_fraction": 0.5, "tile": 32,
                             "tile_overlap": 8, "tile_norm": "position"}, base=BASE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg, tmp_path / "run", quiet=True)
    for size in (None, (96, 32)):
        with pytest.raises(BadInputError, match=r"--group 'lineC': the run knows no such group; its groups are "
                                                r"lineA, lineB") as e:
            export_model(tmp_path / "run", tmp_path / "m", group="lineC", input_size=size, check=False)
        assert "--input-size" not in str(e.value) and "pass --group as one of" in e.value.fix
    assert not (tmp_path / "m" / "model.onnx").exists()


def test_paths_as_a_numpy_array_are_a_list_of_paths(run):
    """A pandas column's `.values` (a 1-D array of path strings) was refused as "a <U29 array is not an image"."""
    r, (good, good2), _ = run
    det = Detector(r)
    want = [d.score for d in det.score([good, good2], maps=False)]
    for paths in (np.array([str(good), str(good2)]), np.array([str(good), str(good2)], dtype=object)):
        got = det.score(paths, maps=False)
        assert [d.path for d in got] == [str(good), str(good2)] and [d.score for d in got] == want


def test_predict_refuses_a_group_the_run_was_not_trained_on_as_a_detector_does(tmp_path):
    """A run trained with --group catA: Detector(group='catB'), evaluate and --ensemble refuse catB, while predict
    --group catB scored it silently with catA's model and threshold."""
    from uninet_feat.predict import predict_cmd
    for i, g in enumerate(("catA", "catB")):
        write_texture_set(tmp_path / "data" / g, n_train=4, n_good=1, n_bad=1, size=32, seed=i)
    cfg = load_config(None, {"data": str(tmp_path / "data"), "group": "catA", "image_size": 32}, base=BASE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg, tmp_path / "run", quiet=True)
    with pytest.raises(BadInputError) as want:
        Detector(tmp_path / "run", group="catB")
    assert "trained on group 'catA' only" in want.value.reason
    # named without the run's training data folder (it named that, not what was given) and for any command
    assert want.value.path is None and want.value.fix.startswith("use a run trained on 'catB'")
    with pytest.raises(BadInputError) as got:
        predict_cmd(tmp_path / "run", tmp_path / "data" / "catB" / "test", tmp_path / "p", group="catB", quiet=True)
    assert (got.value.reason, got.value.fix) == (want.value.reason, want.value.fix)
    assert not (tmp_path / "p").exists()


def test_a_generator_of_frames_is_scored_chunk_by_chunk_not_read_to_its_end(run):
    """iter_score listed its input first: a camera's generator was read to its end (every frame held), an
    endless one never yielded a result."""
    r, _, _ = run
    pulled = []

    def camera():   # long (an endless one would hang the old code, not fail it)
        for k in range(1000):
            pulled.append(k)
            yield np.full((64, 64), 100 + k % 50, np.uint8)
    it = Detector(r).iter_score(camera(), maps=False, chunk=3)
    first = next(it)
    assert first.path == "<image 0>" and len(pulled) == 3
    assert [next(it).path for _ in range(3)] == ["<image 1>", "<image 2>", "<image 3>"] and len(pulled) == 6
    with pytest.raises(BadInputError, match="no images to score"):
        list(Detector(r).iter_score(x for x in []))


def test_frames_the_reader_cannot_take_and_overlays_of_another_size_are_named(run):
    """A bfloat16 or sparse tensor was a TypeError from .numpy(); an empty PIL image was told to convert itself;
    overlay stretched the map over a frame of another size without a word."""
    import torch
    r, (good, _), _ = run
    det = Detector(r)
    for frame, match in ((torch.zeros(64, 64, dtype=torch.bfloat16), "bfloat16 tensor"),
                         (torch.zeros(64, 64, dtype=torch.uint8).to_sparse(), "sparse_coo"),
                         (Image.new("L", (0, 0)), r"size \(0, 0\) has no pixels")):
        with pytest.raises(BadInputError, match=match):
            det.score(frame)
    frame = np.full((64, 64), 90, np.uint8)
    d = det.score(frame)[0]
    assert det.overlay(d, image=frame).shape == (64, 64, 3)
    with pytest.raises(BadInputError, match=r"scored at 64x64 \(HxW\), the image given is 30x50"):
        det.overlay(d, image=np.full((30, 50), 90, np.uint8))


def test_a_callers_module_filter_holds_for_frames_too_and_a_float64_default_builds_float32(run):
    """Warnings about in-memory frames were re-emitted without their module, so a filter by module="uninet_feat"
    silenced a path's warning but not the same pixels' as an array; a host program's float64 default dtype
    built float64 weights that every image then crashed on."""
    import torch
    r, _, _ = run
    frames = [np.full((64, 64, 3), 128, np.uint8), np.zeros((4, 64), np.uint8)]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", module="uninet_feat")
        Detector(r, skip_bad=True).score(frames)
    assert not _texts(rec)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        det = Detector(r)
        assert {p.dtype for p in det.model.parameters()} == {torch.float32}
        assert np.isfinite(det.score(np.full((64, 64), 90, np.uint8))[0].score)
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(prev)


def test_a_detector_takes_a_runs_model_pt_as_the_cli_does_and_refuses_its_checkpoint(run):
    """`--run RUN/model.pt` was taken by every command while `Detector("RUN/model.pt")` said "no such run folder"."""
    r, (good, _), _ = run
    by_file = Detector(r / "model.pt").score(good, maps=False)[0]
    assert by_file.score == Detector(r).score(good, maps=False)[0].score
    with pytest.raises(BadInputError, match="run folder .or its model.pt.") as e:
        Detector(r / "checkpoint.pt")
    assert "checkpoint.pt" in str(e.value) and "--checkpoint" in str(e.value)


def test_a_closed_pil_image_and_a_big_endian_array_are_scored_or_named(run, tmp_path):
    """`with Image.open(p) as im: pass` then scoring im raised PIL's bare AssertionError; a uint16 array in big-endian
    order (np.frombuffer(raw, ">u2")) was refused as "not an image this reads" with a fix asking for uint16
    (an audit, session 52)."""
    r, (good, _), _ = run
    det = Detector(r)
    with Image.open(good) as im:
        pass
    with pytest.raises(BadInputError, match="closed before its pixels were read") as e:
        det.score(im)
    assert "image.load()" in e.value.fix
    u16 = (np.random.default_rng(1).random((60, 70)) * 65535).astype(np.uint16)
    big = np.frombuffer(u16.astype(">u2").tobytes(), ">u2").reshape(u16.shape)
    assert det.score(big)[0].score == det.score(u16)[0].score


def test_an_unsigned_32bit_tiff_over_2_to_the_31_is_read_not_refused_as_signed(tmp_path):
    """PIL opens it as int32, so values from 2^31 wrapped negative and the image was refused as "signed integer
    image with negative values" (an audit, session 52)."""
    tifffile = pytest.importorskip("tifffile")
    from uninet_feat.data import load_image
    full = np.tile(np.array([0, 2 ** 31, 2 ** 32 - 1], np.uint32), (8, 4))
    tifffile.imwrite(tmp_path / "u32.tif", full)
    np.testing.assert_allclose(load_image(tmp_path / "u32.tif")[0, :3, 0], [0, 2 ** 31 / (2 ** 32 - 1), 1.0],
                               rtol=1e-6)
    tifffile.imwrite(tmp_path / "i32.tif", np.array([[-5, 7]] * 8, np.int32))   # a signed file's negatives: refused
    with pytest.raises(BadInputError, match="negative values"):
        load_image(tmp_path / "i32.tif", min_side=1)
