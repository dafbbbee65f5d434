"""Library edges: a run's TextScorer, the caller's RNG, tensor frames and small bad inputs to Detector / TextScorer."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from uninet_feat.config import load_config
from uninet_feat.detector import Detector
from uninet_feat.errors import BadInputError
from uninet_feat.train import train

from _tiny import register_tiny, tiny_run, write_texture_set

register_tiny()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """A clip:tiny run trained from a whole CLIP weights file (both towers): (run, weights file)."""
    from uninet_feat.backbones.clip import build_clip_model
    root = tmp_path_factory.mktemp("cliprun")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(build_clip_model("tiny", "random", text=True).state_dict(), root / "tiny_clip.pt")
    tex = write_texture_set(root / "tex", n_train=6, n_good=1, n_bad=1, size=64)
    train(load_config(None, {"data": str(tex), "backbone": "clip:tiny", "weights": str(root / "tiny_clip.pt"),
                             "image_size": 64, "epochs": 1, "batch_size": 4, "channels_last": False,
                             "val_fraction": 0.3}), root / "run", quiet=True)
    return root / "run", root / "tiny_clip.pt"


def test_text_scorer_of_a_loaded_run_uses_the_runs_weights(clip_run):
    from uninet_feat.backbones import create_backbone
    from uninet_feat.calibration import load_run
    from uninet_feat.extract import Extractor
    from uninet_feat.vlm import TextScorer
    run, weights = clip_run
    model, _, _ = load_run(run)
    assert model.source.weights_source == str(weights)
    own = TextScorer(create_backbone("clip:tiny", weights=str(weights))).text_embeddings
    assert torch.allclose(TextScorer(model).text_embeddings, own)
    assert torch.allclose(Extractor(run=run, text=True).text_scorer.text_embeddings, own)   # as extract --text


def test_text_scorer_of_a_run_whose_weights_file_is_gone_names_text_model(clip_run):
    from uninet_feat.calibration import load_run
    from uninet_feat.vlm import TextScorer
    run, weights = clip_run
    model, _, _ = load_run(run)
    moved = weights.with_suffix(".away")
    os.rename(weights, moved)
    try:
        with pytest.raises(BadInputError, match="text_model="):
            TextScorer(model)
    finally:
        os.rename(moved, weights)


def test_detector_leaves_the_callers_torch_rng_alone_when_built(run):
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    Detector(run[0])
    assert torch.equal(torch.rand(3), want)


def test_detector_score_leaves_the_callers_torch_rng_alone(run):
    det = Detector(run[0])
    img = sorted((run[1] / "test").rglob("*.png"))[0]
    first = det.score([img])[0].score
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    again = det.score([img])[0].score
    assert torch.equal(torch.rand(3), want)
    assert again == first


def test_detector_scores_a_torch_tensor_as_one_image(run):
    det = Detector(run[0])
    arr = np.asarray(Image.open(sorted((run[1] / "test").rglob("*.png"))[0]).convert("RGB"))   # (32, 32, 3)
    want = det.score(arr)[0]
    hwc = torch.from_numpy(arr.copy())
    chw = hwc.permute(2, 0, 1).contiguous()   # torchvision.io.decode_image's layout
    for t in (hwc, chw, hwc[..., 0]):
        got = det.score(t)
        assert len(got) == 1 and got[0].map.shape == (32, 32)
    assert det.score(chw)[0].score == want.score and np.array_equal(det.score(chw)[0].map, want.map)
    batch = det.score(torch.stack([chw, chw]))   # (N, C, H, W): a batch, as a 4-D array (N, H, W, C) is
    assert [d.score for d in batch] == pytest.approx([want.score] * 2, rel=1e-5)   # batched: float rounding
    assert [d.score for d in det.score(np.stack([arr, arr]))] == pytest.approx([want.score] * 2, rel=1e-5)


@pytest.mark.parametrize("bad, said", [(np.zeros((0, 0), np.uint8), "no pixels"), (None, "NoneType is not an image"),
                                       (5, "int is not an image"), (b"\x89PNG\r\n\x1a\n", "encoded image bytes"),
                                       ([None], "NoneType is not an image")],
                         ids=["empty", "None", "int", "bytes", "list-of-None"])
def test_detector_refuses_what_is_no_image_with_a_fix(run, bad, said):
    with pytest.raises(BadInputError, match=f"{said}.*fix:"):
        Detector(run[0]).score(bad)


def test_text_scorer_refuses_a_resnet_clip_tower():
    import open_clip
    from uninet_feat.backbones.clip import _TEXT_TINY
    from uninet_feat.vlm import TextScorer
    rn = open_clip.model.CLIP(embed_dim=32, vision_cfg={"layers": (1, 1, 1, 1), "width": 8, "image_size": 64},
                              text_cfg=dict(_TEXT_TINY))   # a tiny ModifiedResNet tower, as RN50's
    with pytest.raises(BadInputError, match="ResNet"):
        TextScorer(rn)


@pytest.mark.parametrize("key", ["normal_prompts", "defect_prompts"])
def test_text_scorer_refuses_an_explicitly_empty_prompt_list(key):
    from uninet_feat.backbones import create_backbone
    from uninet_feat.vlm import TextScorer
    with pytest.raises(BadInputError, match=f"{key} is empty"):
        TextScorer(create_backbone("clip:tiny"), **{key: []})


def test_train_builds_float32_under_a_callers_float64_default_and_leaves_it(tmp_path):
    """`Detector` and `build_from_checkpoint` built float32 under a host's float64 default, `train` did not: its
    float64 model met float32 images at the first step (a RuntimeError, with config.yaml already written)."""
    data = write_texture_set(tmp_path / "tex", n_train=4, n_good=1, n_bad=1, size=32)
    cfg = load_config(None, {"data": str(data), "backbone": "tiny", "weights": "random", "image_size": 32,
                             "epochs": 1, "batch_size": 2, "channels_last": False, "val_fraction": 0.3})
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        path = train(cfg, tmp_path / "run", quiet=True)
        assert torch.get_default_dtype() == torch.float64   # the caller's default, as it was
    finally:
        torch.set_default_dtype(before)
    from uninet_feat.checkpoint import read_checkpoint
    weights = read_checkpoint(path)["state_dict"]
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}


def test_a_run_of_an_older_versions_config_yaml_re_creates_that_run(tmp_path):
    """A run's config.yaml holds the keys that existed when it trained; `train --config OLD/config.yaml` filled
    today's defaults for the others (a student without the ReLU, another split hash, the data's own validation
    split), so the re-run was another run. The keys it lacks now take what they meant then, said in a warning."""
    import yaml
    from uninet_feat.checkpoint import read_checkpoint
    from uninet_feat.cli import main
    from uninet_feat.runs import load_samples
    data = write_texture_set(tmp_path / "tex", n_train=10, n_good=2, n_bad=2, size=32)
    old = tmp_path / "old"
    assert main(["train", "--data", str(data), "--backbone", "tiny", "--weights", "random", "--image-size", "32",
                 "--epochs", "1", "--batch-size", "2", "--quiet", "--out", str(old)]) == 0
    saved = yaml.safe_load((old / "config.yaml").read_text())
    for k in ("student_relu", "split_hash", "val_split"):   # as an older version wrote it
        saved.pop(k)
    (old / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.warns(UserWarning, match=r"trained by an older version, without student_relu, split_hash, "
                                         r"val_split: they take the values that run trained with"):
        assert main(["train", "--config", str(old / "config.yaml"), "--quiet", "--out", str(tmp_path / "new")]) == 0
    new = yaml.safe_load((tmp_path / "new" / "config.yaml").read_text())
    assert (new["split_hash"], new["val_split"]) == ("path", "drawn")
    assert read_checkpoint(tmp_path / "new" / "model.pt")["student_relu"] == [True, True, True]
    split = lambda c: [(str(s.path), s.split) for s in load_samples(c)]   # noqa: E731
    assert split(new) == split(saved)   # what the old run's own commands read
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(saved))   # not beside a run: today's defaults, no word
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(tmp_path / "mine.yaml")["split_hash"] == "relative"
