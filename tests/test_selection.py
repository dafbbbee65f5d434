"""Label-free model selection (select: synthetic): the synthetic set, its scoring, and the training loop."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from uninet_feat.checkpoint import read_checkpoint
from uninet_feat.config import load_config
from uninet_feat.data.dataset import ImageDataset
from uninet_feat.data.layouts import discover
from uninet_feat.errors import BadInputError
from uninet_feat.data.surface import SURFACE_DEFECTS, texture_patch
from uninet_feat.data.synthetic import DEFECTS
from uninet_feat.selection import MIN_CHANGED, VISIBLE, SyntheticValidation, parse_kinds, synthetic_defect
from uninet_feat.train import train

from _tiny import register_tiny, write_texture_set

register_tiny()
BASE = {"backbone": "tiny", "weights": "random", "image_size": 64, "epochs": 3, "batch_size": 4,
        "val_fraction": 0.3, "channels_last": False, "seed": 7}


@pytest.fixture(scope="module")
def texture(tmp_path_factory):
    return write_texture_set(tmp_path_factory.mktemp("tex"))


def _cfg(data, **kw):
    return load_config(None, {"data": str(data), **kw}, base=BASE)


def _val_set(texture, copies=2, seed=0):
    goods = [s for s in discover(texture) if s.is_normal][:3]
    return SyntheticValidation(ImageDataset(goods, image_size=64), copies=copies, seed=seed)


@pytest.mark.parametrize("kind", DEFECTS + SURFACE_DEFECTS)
def test_synthetic_defect_mask_is_exactly_the_visible_change(kind):
    """Every kind, `texture_patch` too: its soft-edged blend changed pixels outside its mask by up to 21 grey
    levels, labelled normal in the label-free choices (the fabric kinds restore them themselves)."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[:96, :96]
    img = np.repeat((128 + 60 * np.sin(x / 1.5) * np.sin(y / 1.5)).astype(np.uint8)[..., None], 3, -1)
    for _ in range(10):
        out, mask = synthetic_defect(img, rng, kinds=(kind,))
        diff = np.abs(out.astype(int) - img.astype(int)).max(-1)
        assert mask.sum() >= MIN_CHANGED
        assert (diff[mask] >= VISIBLE).all()          # nothing invisible is called a defect
        assert (diff[~mask] == 0).all()               # and nothing outside the mask changes


@pytest.mark.parametrize("kind", DEFECTS + SURFACE_DEFECTS)
def test_a_grey_picture_gets_grey_defects_and_a_colour_one_its_coloured_ones(kind):
    """select: synthetic and denoise get (H, W, 3) images, a grey line as three equal channels: a stain or oil line
    drawn on the three came out tinted (up to 23 grey levels between channels), a defect no image of that line can
    show. A grey picture's defect is drawn on one channel and repeated; a colour picture's is drawn as before."""
    from uninet_feat.data.synthetic import add_defect, render_fabric
    from uninet_feat.selection import STRENGTH
    grey = np.repeat(render_fabric((64, 64), "plain", np.random.default_rng(1))[..., None], 3, -1)
    colour = render_fabric((64, 64), "plain", np.random.default_rng(1), color=True)
    nearly = grey.copy()   # a grey picture put back to uint8 after per-channel ImageNet statistics and a resize: a
    odd = np.random.default_rng(9).random(nearly.shape[:2]) < 0.05   # few pixels one level apart (session 53)
    nearly[..., 1][odd] = np.clip(nearly[..., 1][odd].astype(int) + 1, 0, 255)
    for seed in range(6):
        out, mask = synthetic_defect(grey, np.random.default_rng(seed), kinds=(kind,))
        assert mask.any() and (out == out[..., :1]).all()   # every pixel still grey
        out, mask = synthetic_defect(nearly, np.random.default_rng(seed), kinds=(kind,))
        spread = out.max(-1).astype(int) - out.min(-1)
        assert mask.any() and spread[mask].max() <= 1, spread[mask].max()   # not tinted: grey within its one level
        if kind in SURFACE_DEFECTS:
            continue
        out, mask = synthetic_defect(colour, np.random.default_rng(seed), kinds=(kind,))
        rng = np.random.default_rng(seed)   # the colour path by hand: the same draws on the image as it is
        rng.integers(1)
        want, m = add_defect(colour, kind, rng)
        base = colour.astype(np.float64)
        want = np.clip(base + rng.uniform(*STRENGTH) * (want - base) + 0.5, 0, 255).astype(np.uint8)
        m &= np.abs(want.astype(np.int16) - colour.astype(np.int16)).max(-1) >= VISIBLE
        assert np.array_equal(mask, m) and np.array_equal(out, np.where(m[..., None], want, colour))


def test_flat_image_refused_with_a_clear_error():
    with pytest.raises(BadInputError, match="no visible synthetic defect"):
        synthetic_defect(np.zeros((64, 64, 3), np.uint8), np.random.default_rng(0), tries=3)


class _WithFlat:
    """A dataset of real texture items with one blank (white) item, like an AITEX margin tile."""

    def __init__(self, ds, flat_at=1):
        self.ds, self.flat_at, self.mean, self.std = ds, flat_at, ds.mean, ds.std

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, j):
        item = dict(self.ds[j])
        if j == self.flat_at:
            item["image"] = (torch.ones_like(item["image"]) - self.mean) / self.std
        return item


def test_flat_items_keep_their_normal_and_are_counted(texture):
    goods = [s for s in discover(texture) if s.is_normal][:3]
    ds = _WithFlat(ImageDataset(goods, image_size=64))
    with pytest.warns(UserWarning, match="2 of 6 defective copies skipped"):
        sv = SyntheticValidation(ds, copies=2, seed=0, kinds="texture_patch")
    assert sv.skipped == 2 and len(sv) == 7                  # 3 normals, 2 + 2 defective copies
    assert sv.labels.tolist() == [0, 1, 1, 0, 0, 1, 1]
    assert (sv.images[3] == 255).all() and not sv.masks[3].any()   # the blank item stays, as a normal
    # the items before the blank one are drawn exactly as without it
    plain = SyntheticValidation(ImageDataset(goods, image_size=64), copies=2, seed=0, kinds="texture_patch")
    assert torch.equal(sv.images[:3], plain.images[:3]) and plain.skipped == 0
    only_flat = _WithFlat(ImageDataset(goods[:1], image_size=64), flat_at=0)
    with pytest.raises(BadInputError, match="no visible synthetic defect of kinds"):
        SyntheticValidation(only_flat, copies=2, seed=0, kinds="texture_patch")


def test_set_is_seeded_and_leaves_torch_rng_alone(texture):
    state = torch.get_rng_state()
    a = _val_set(texture, seed=1)
    assert torch.equal(state, torch.get_rng_state())
    b, c = _val_set(texture, seed=1), _val_set(texture, seed=2)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert len(a) == 9 and a.labels.tolist() == [0, 1, 1] * 3


class _Oracle(torch.nn.Module):
    """Scores each image by its distance to the clean normal it was made from: a perfect detector."""

    def __init__(self, sv, copies):
        super().__init__()
        clean = sv.images[::copies + 1].float()
        self.ref = clean.repeat_interleave(copies + 1, 0)
        self.mean, self.std, self.seen = sv.mean, sv.std, 0

    def predict(self, x):
        raw = (x * self.std + self.mean) * 255
        pix = (raw - self.ref[self.seen:self.seen + len(x)]).abs().amax(1)
        self.seen += len(x)
        return pix, pix.flatten(1).amax(1)


def test_score_aligns_images_masks_and_labels(texture):
    sv = _val_set(texture, copies=2)
    v = sv.score(_Oracle(sv, 2), batch_size=4)
    assert v["image_auroc"] == 1.0 and v["pixel_auroc"] == 1.0 and v["score"] == 1.0
    flat = sv.score(type("Flat", (torch.nn.Module,), {
        "predict": lambda self, x: (torch.zeros(len(x), 64, 64), torch.zeros(len(x)))})())
    assert flat["image_auroc"] == 0.5 and flat["pixel_auroc"] == 0.5


def test_selection_keeps_the_best_epoch_and_does_not_change_training(texture, tmp_path):
    sel, last = tmp_path / "sel", tmp_path / "last"
    train(_cfg(texture, select="synthetic"), sel, quiet=True)
    train(_cfg(texture), last, quiet=True)
    log = [json.loads(x) for x in (sel / "train_log.jsonl").read_text().splitlines()]
    scores = [r["val_synthetic_score"] for r in log]
    best_epoch = int(np.argmax(scores)) + 1           # argmax: the first of equal scores, as the rule says
    model, best = read_checkpoint(sel / "model.pt"), read_checkpoint(sel / "best.pt")
    assert model["epoch"] == best["epoch"] == best_epoch
    assert model["selection"]["score"] == pytest.approx(max(scores))
    assert all(torch.equal(model["state_dict"][k], best["state_dict"][k]) for k in best["state_dict"])
    # validating between epochs leaves the trajectory alone: the last epoch equals a select: last run
    a, b = read_checkpoint(sel / "checkpoint.pt")["state_dict"], read_checkpoint(last / "checkpoint.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "val_synthetic_score" not in (last / "train_log.jsonl").read_text()


def test_resumed_selection_matches_uninterrupted(texture, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(_cfg(texture, select="synthetic", epochs=4), full, quiet=True)
    train(_cfg(texture, select="synthetic", epochs=2), cut, quiet=True)
    (cut / "model.pt").unlink()                        # as if killed after epoch 2's checkpoint
    train(_cfg(texture, select="synthetic", epochs=4), cut, resume=True, quiet=True)   # the run's own settings
    a, b = read_checkpoint(full / "model.pt"), read_checkpoint(cut / "model.pt")
    assert a["epoch"] == b["epoch"] and a["selection"]["score"] == b["selection"]["score"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_val_every_and_bad_settings(texture, tmp_path):
    train(_cfg(texture, select="synthetic", val_every=2), tmp_path / "r", quiet=True)
    log = [json.loads(x) for x in (tmp_path / "r" / "train_log.jsonl").read_text().splitlines()]
    assert ["val_synthetic_score" in r for r in log] == [False, True, True]   # epoch 2, and the last
    with pytest.raises(BadInputError, match="val_fraction is 0"):
        train(_cfg(texture, select="synthetic", val_fraction=0.0), tmp_path / "a", quiet=True)
    with pytest.raises(BadInputError, match=r"keep_every must be an integer >= 0, got -2"):
        train(_cfg(texture, keep_every=-2), tmp_path / "c", quiet=True)
    with pytest.raises(BadInputError, match="unknown select"):
        train(_cfg(texture, select="best"), tmp_path / "b", quiet=True)


def test_kept_epochs_can_be_evaluated(texture, tmp_path):
    from uninet_feat.evaluate import evaluate
    run = tmp_path / "k"
    train(_cfg(texture, keep_every=2), run, quiet=True)
    assert sorted(p.name for p in (run / "epochs").iterdir()) == ["epoch_002.pt"]
    kept = evaluate(run, checkpoint=run / "epochs" / "epoch_002.pt", quiet=True)
    final = evaluate(run, quiet=True)
    assert kept["epoch"] == 2 and final["epoch"] == 3 and "selection" not in final
    assert [r["score"] for r in kept["_rows"]] != [r["score"] for r in final["_rows"]]
    # calibration.json belongs to model.pt: another epoch's model is calibrated on the same validation
    # normals, in memory, so its threshold is its own 0.99 quantile there and --max-fpr works on its scores
    from uninet_feat.calibration import calibration
    from uninet_feat.normals import validation_normals
    from uninet_feat.thresholds import threshold_at_fpr
    from uninet_feat.checkpoint import build_from_checkpoint
    cal_before = (run / "calibration.json").read_text()
    model2, ck2 = build_from_checkpoint(run / "epochs" / "epoch_002.pt")
    own = calibration(model2, validation_normals(dict(ck2["config"])), dict(ck2["config"]))
    assert kept["threshold"] == pytest.approx(own["threshold"]) and "epoch_002.pt" in kept["threshold_rule"]
    assert final["threshold"] == pytest.approx(json.loads(cal_before)["threshold"])
    assert kept["threshold"] != pytest.approx(final["threshold"])
    at = evaluate(run, checkpoint=run / "epochs" / "epoch_002.pt", quiet=True, overrides={"max_fpr": 0.0})
    assert at["threshold"] == pytest.approx(threshold_at_fpr(own["val_scores"], 0.0)) == max(own["val_scores"])
    assert (run / "calibration.json").read_text() == cal_before   # model.pt's calibration untouched
    given = evaluate(run, checkpoint=run / "epochs" / "epoch_002.pt", quiet=True, overrides={"threshold": 0.5})
    assert given["threshold"] == 0.5
    with pytest.raises(BadInputError, match="not both"):
        evaluate(run, checkpoint=run / "epochs" / "epoch_002.pt", quiet=True,
                 overrides={"threshold": 0.5, "max_fpr": 0.1})


def test_checkpoint_of_another_run_is_refused(texture, tmp_path):
    """--checkpoint from another run would bring that run's data, split and calibration along: refused,
    naming what differs; a model of the run itself (checkpoint.pt) is accepted."""
    from uninet_feat.evaluate import evaluate
    a, b = tmp_path / "a", tmp_path / "b"
    train(_cfg(texture, epochs=1), a, quiet=True)
    train(_cfg(texture, epochs=1, seed=8), b, quiet=True)
    with pytest.raises(BadInputError, match=r"not a model of the run .*seed 8 vs 7") as e:
        evaluate(a, checkpoint=b / "model.pt", quiet=True)
    assert str(e.value).count(str(b / "model.pt")) == 1            # the path once, not twice
    own = evaluate(a, checkpoint=a / "checkpoint.pt", quiet=True)
    assert own["epoch"] == 1 and f"scored with {a / 'checkpoint.pt'}, not {a / 'model.pt'}" in own["threshold_rule"]


def test_checkpoint_of_a_run_with_another_border_pad_is_refused(texture, tmp_path):
    """A run's checkpoints share its border_pad (`train --resume` keeps the checkpoint's), so a model trained with
    another pad on the same data, split and seed is another run's: evaluating it as one of this run's epochs mixed
    two runs' figures. Refused, naming the pads; a config written before the option (no key) means no pad."""
    import yaml
    from uninet_feat.evaluate import evaluate
    a, b = tmp_path / "a", tmp_path / "b"
    train(_cfg(texture, epochs=1), a, quiet=True)
    train(_cfg(texture, epochs=1, border_pad=16), b, quiet=True)
    with pytest.raises(BadInputError, match=r"not a model of the run .*border_pad 16 vs 0"):
        evaluate(a, checkpoint=b / "model.pt", quiet=True)
    cfg = yaml.safe_load((a / "config.yaml").read_text())
    cfg.pop("border_pad")   # an older run's config.yaml
    (a / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(BadInputError, match=r"border_pad 16 vs 0"):
        evaluate(a, checkpoint=b / "model.pt", quiet=True)
    assert evaluate(a, checkpoint=a / "checkpoint.pt", quiet=True)["epoch"] == 1


def test_checkpoint_of_a_run_with_another_width_or_recipe_is_refused(texture, tmp_path):
    """Same data, split, seed and pad, but another width and denoising recipe: another run's model, refused
    naming both; keys an older config lacks take their defaults, so they do not count as a difference."""
    import yaml
    from uninet_feat.evaluate import evaluate
    a, b = tmp_path / "a", tmp_path / "b"
    train(_cfg(texture, epochs=1), a, quiet=True)
    train(_cfg(texture, epochs=1, width=2, denoise=0.5), b, quiet=True)
    with pytest.raises(BadInputError, match=r"not a model of the run .*width 2(\.0)? vs 1(\.0)?.*denoise 0\.5 vs 0"):
        evaluate(a, checkpoint=b / "model.pt", quiet=True)
    cfg = yaml.safe_load((a / "config.yaml").read_text())
    for k in ("denoise", "denoise_kinds", "width", "stop_grad"):
        cfg.pop(k)   # an older run's config.yaml: the defaults
    (a / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert evaluate(a, checkpoint=a / "checkpoint.pt", quiet=True)["epoch"] == 1



def test_checkpoint_of_a_run_with_another_input_normalisation_is_refused(texture, tmp_path):
    """A model trained on inputs normalised with another --mean/--std was scored and reported as one of the run's
    epochs (an audit, session 52)."""
    from uninet_feat.evaluate import evaluate
    from _tiny import register_tiny_norm
    register_tiny_norm()
    a, b = tmp_path / "a", tmp_path / "b"
    train(_cfg(texture, epochs=1, backbone="tiny_norm"), a, quiet=True)
    train(_cfg(texture, epochs=1, backbone="tiny_norm", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]), b, quiet=True)
    with pytest.raises(BadInputError, match=r"not a model of the run .*mean \[0\.5, 0\.5, 0\.5\] vs None"):
        evaluate(a, checkpoint=b / "model.pt", quiet=True)
    assert evaluate(a, checkpoint=a / "checkpoint.pt", quiet=True)["epoch"] == 1


def test_checkpoint_of_a_run_without_validation_normals(texture, tmp_path):
    from uninet_feat.evaluate import evaluate
    run = tmp_path / "nv"
    train(_cfg(texture, keep_every=2, val_fraction=0.0), run, quiet=True)
    rep = evaluate(run, checkpoint=run / "epochs" / "epoch_002.pt", quiet=True)
    assert rep["threshold"] is None and rep["threshold_rule"].startswith("none") and "image_auroc" in rep
    with pytest.raises(BadInputError, match="val_fraction 0"):
        evaluate(run, checkpoint=run / "epochs" / "epoch_002.pt", quiet=True, overrides={"max_fpr": 0.1})


def test_checkpoint_report_colours_from_its_own_validation_maps(texture, tmp_path, monkeypatch):
    import uninet_feat.overlay as overlay
    from uninet_feat.calibration import calibration
    from uninet_feat.normals import validation_normals
    from uninet_feat.checkpoint import build_from_checkpoint
    from uninet_feat.evaluate import evaluate
    run = tmp_path / "k"
    train(_cfg(texture, keep_every=2), run, quiet=True)
    seen = []
    real = overlay.heatmap_overlay
    monkeypatch.setattr(overlay, "heatmap_overlay", lambda *a, **k: seen.append((k["vmin"], k["vmax"])) or real(*a, **k))
    evaluate(run, checkpoint=run / "epochs" / "epoch_002.pt", quiet=True, report_path=tmp_path / "r.html")
    model2, ck2 = build_from_checkpoint(run / "epochs" / "epoch_002.pt")
    own = calibration(model2, validation_normals(dict(ck2["config"])), dict(ck2["config"]))["map_range"]
    last = json.loads((run / "calibration.json").read_text())["map_range"]
    assert seen and all(v == pytest.approx(tuple(own)) for v in seen)
    assert tuple(own) != pytest.approx(tuple(last))


def test_selection_curve_reports_every_kept_epoch(texture, tmp_path):
    from benchmarks.selection_curve import curve
    run = tmp_path / "c"
    train(_cfg(texture, select="synthetic", keep_every=1, epochs=4), run, quiet=True)
    res = curve(run)
    assert [r["epoch"] for r in res["rows"][:-1]] == [1, 2, 3, 4]
    sel = res["selected"]
    twin = next(r for r in res["rows"][:-1] if r["epoch"] == sel["epoch"])
    assert {k: v for k, v in twin.items() if k != "model"} == {k: v for k, v in sel.items() if k != "model"}
    assert sel["synthetic"] == max(r["synthetic"] for r in res["rows"][:-1])
    assert set(res["spearman_synthetic_vs_test"]) == {"image_auroc", "pixel_auroc", "aupro"}
    assert "spearman_note" not in res
    for e in (3, 4):   # two kept epochs: no correlation, and the JSON says why (it was an empty {})
        (run / "epochs" / f"epoch_{e:03d}.pt").unlink()
    res = curve(run)
    assert res["spearman_synthetic_vs_test"] == {} and "needs >= 3 kept epochs" in res["spearman_note"]
    # a run whose calibrated map is not the method's: its selected row names it, the kept ones every level raw, so
    # the same weights' pixel figures are not read as the rule's doing (session 53)
    auto = tmp_path / "a"
    train(_cfg(texture, select="synthetic", keep_every=1, epochs=2, map_levels="3"), auto, quiet=True)
    res = curve(auto)
    assert res["selected"]["pixel_map"] != res["rows"][0]["pixel_map"] and all(r["pixel_map"] for r in res["rows"])


def test_val_every_without_synthetic_selection_warns(tmp_path):
    """--val-every only paces the synthetic validation; on its own it did nothing, silently."""
    from uninet_feat.cli import main
    with pytest.warns(UserWarning, match="--val-every has no effect without --select synthetic"):
        assert main(["train", "--data", str(tmp_path / "missing"), "--val-every", "5", "--out", str(tmp_path / "r")]) == 2


def test_pixel_auroc_of_holds_a_pixel_grid_when_the_maps_would_pass_the_memory_cap(texture):
    from uninet_feat import metrics
    from uninet_feat.model import UniNet
    from uninet_feat.scoring import anomaly_maps, level_pixel_map
    from uninet_feat.selection import pixel_step
    from _tiny import TinyBackbone
    assert [pixel_step(n, 100) for n in (100, 101, 400, 401, 900)] == [1, 2, 2, 3, 3]
    sv = _val_set(texture)
    torch.manual_seed(0)
    model = UniNet(TinyBackbone()).eval()
    cands = {"all": (None, None), "3": ([3], None)}
    full = sv.pixel_auroc_of(model, cands)
    nbytes = sv.masks.size * 4 * len(cands)
    capped = sv.pixel_auroc_of(model, cands, max_bytes=nbytes // 9)   # stride 3 in each direction
    with torch.no_grad():
        out = model(torch.cat(list(sv._inputs(8, False))))
    am = anomaly_maps(out.teachers, out.students)
    for k, (levels, norm) in cands.items():
        m = level_pixel_map(am, levels, sv.masks.shape[-2:], norm=norm).numpy()
        assert full[k] == pytest.approx(metrics.pixel_auroc(sv.masks, m), abs=1e-6)
        assert capped[k] == pytest.approx(metrics.pixel_auroc(sv.masks[:, ::3, ::3], m[:, ::3, ::3]), abs=1e-6)
    assert capped != full


def _stripes(n=96):
    y, x = np.mgrid[:n, :n]
    return np.repeat((128 + 60 * np.sin(x / 1.2) + 20 * np.sin(y / 7.0)).astype(np.uint8)[..., None], 3, -1)


def test_texture_patch_changes_the_texture_inside_its_region_only():
    img = _stripes()
    for seed in range(8):
        out, mask = texture_patch(img, np.random.default_rng(seed))
        again, mask2 = texture_patch(img, np.random.default_rng(seed))
        assert np.array_equal(out, again) and np.array_equal(mask, mask2)          # seeded
        diff = np.abs(out.astype(int) - img.astype(int)).max(-1)
        assert 0.01 < mask.mean() < 0.6
        assert diff[mask].mean() > 15                      # vertical stripes turned, flipped or rescaled
        far = ~ndi.binary_dilation(mask, iterations=12)    # past the soft edge the image is untouched
        assert far.any() and (diff[far] == 0).all()


def test_synthetic_kinds_parse_and_choose_what_is_drawn(texture, tmp_path):
    assert parse_kinds(None) == parse_kinds("fabric") == DEFECTS
    assert parse_kinds("all") == DEFECTS + ("texture_patch",)
    assert parse_kinds("hole, texture_patch") == parse_kinds(["hole", "texture_patch"]) == ("hole", "texture_patch")
    with pytest.raises(BadInputError, match="scratch"):
        parse_kinds("hole,scratch")
    goods = [s for s in discover(texture) if s.is_normal][:3]
    ds = ImageDataset(goods, image_size=64)
    fabric, default = SyntheticValidation(ds, seed=4, kinds="fabric"), SyntheticValidation(ds, seed=4)
    assert torch.equal(fabric.images, default.images)      # the default set is the fabric set, unchanged
    patch = SyntheticValidation(ds, seed=4, kinds="texture_patch")
    assert not torch.equal(patch.images, default.images)
    # a texture_patch-only set equals drawing texture_patch on the same normals with the same generator
    rng = np.random.default_rng([4, 0x5E1EC7])
    first = patch.images[0].permute(1, 2, 0).numpy()
    out, m = synthetic_defect(first, rng, kinds=("texture_patch",))
    assert np.array_equal(out, patch.images[1].permute(1, 2, 0).numpy()) and np.array_equal(m, patch.masks[1])
    with pytest.raises(BadInputError, match="unknown synthetic defect kinds"):   # refused before any epoch
        train(_cfg(texture, synthetic_kinds="stain,foo"), tmp_path / "r", quiet=True)
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_texture_patch_reaches_the_border_as_often_as_the_border_holds_area():
    """Defects reach a part's edges, where maps are weakest: the validation set must put its regions there too.
    The border (8 px of 128) holds 23 % of the area; centred in 0.2-0.8 the regions put 9 % of their pixels
    there, centred anywhere 17 % here (a region at the border is partly cut off, so fewer than 23 %)."""
    img = _stripes(128)
    inner = np.zeros((128, 128), bool)
    inner[8:-8, 8:-8] = True
    masks = np.stack([texture_patch(img, np.random.default_rng(s))[1] for s in range(120)])
    share = masks[:, ~inner].sum() / masks.sum()
    assert 0.15 < share < 1 - inner.mean(), share


def test_synthetic_compare_scores_runs_on_one_set_and_refuses_runs_on_other_normals(texture, tmp_path):
    """benchmarks.synthetic_compare, the label-free check behind adopting border_pad: with the runs' own seed it
    gives back each run's recorded choice and figures (so it scores as training's calibration does); a fresh
    seed draws another set, the same for every run; a run whose validation normals differ is refused, as the
    two would be scored on different images."""
    import json as _json
    from benchmarks.synthetic_compare import compare, main
    from uninet_feat.calibration import _label
    kw = dict(epochs=1, map_levels="auto", map_norm="auto")
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train(_cfg(texture, **kw), a, quiet=True)
    train(_cfg(texture, border_pad=16, **kw), b, quiet=True)
    res = compare([a, b])
    own = res["rows"]
    for run, row in zip((a, b), own):
        rec = _json.loads((run / "calibration.json").read_text())["pixel_map_choice"]
        assert row["candidates"] == pytest.approx(rec["synthetic_pixel_auroc"], abs=1e-9)
        levels = rec["levels"] or [int(v) for v in max(row["candidates"], key=len).split()[0].split(",")]
        assert row["chosen_map"] == _label((tuple(levels), rec["norm"]))      # the run's recorded choice
        assert row["pixel_auroc"] == row["candidates"][row["chosen_map"]]
    assert own[0]["candidates"] != own[1]["candidates"]           # the pad changes the model, not the set
    res31 = compare([a, a], seed=31)
    assert res31["normals"] == res["normals"] and len(res["normals"]) == 3   # the seed moves the set, not the split
    fresh = res31["rows"]
    assert fresh[0] == {**fresh[1]} and fresh[0]["n_images"] == own[0]["n_images"]
    assert fresh[0]["candidates"] != own[0]["candidates"]         # another seed, another set
    train(_cfg(texture, seed=8, **kw), c, quiet=True)
    with pytest.raises(BadInputError, match="other validation normals"):
        compare([a, c])
    assert main(["--runs", str(a), str(c)]) == 2
    out = tmp_path / "cmp.json"
    assert main(["--runs", str(a), str(b), "--seed", "31", "--json", str(out)]) == 0
    assert [r["run"] for r in _json.loads(out.read_text())["rows"]] == [str(a), str(b)]
    # a choice `calibrate` was told since training is the run's: it took config.yaml's auto (session 53)
    from uninet_feat.cli import main as cli
    assert cli(["calibrate", "--run", str(a), "--map-levels", "3", "--map-norm", "none", "--quiet"]) == 0
    assert compare([a])["rows"][0]["chosen_map"] == _label(((3,), "none"))


class _Killed(BaseException):
    """A stop of the process at one file write (BaseException: no `except Exception` in train catches it)."""


def _kill_at(monkeypatch, name: str, epoch: int):
    """Make train's write of ``name`` (a file name) for ``epoch`` stop the run before it is written."""
    import uninet_feat.train as train_mod
    real = train_mod.save_checkpoint

    def save(path, model, cfg, **extra):
        if Path(path).name == name and extra.get("epoch") == epoch:
            raise _Killed(name)
        return real(path, model, cfg, **extra)
    monkeypatch.setattr(train_mod, "save_checkpoint", save)


def _rising_score(self, model, batch_size=8, channels_last=False):
    """A validation score that rises with every training step (BatchNorm's step count, saved in the weights and
    restored on resume): each epoch is the best so far, deterministically."""
    n = max(int(b) for k, b in model.named_buffers() if k.endswith("num_batches_tracked"))
    return {"score": float(n), "image_auroc": 0.5, "pixel_auroc": 0.5}


def _same_model(a, b):
    a, b = read_checkpoint(a), read_checkpoint(b)
    assert a["epoch"] == b["epoch"] and a["selection"]["score"] == b["selection"]["score"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_a_stop_around_best_pt_never_gives_model_pt_another_epochs_weights(texture, tmp_path, monkeypatch):
    """best.pt was written before the log and checkpoint.pt: a stop between them left best.pt holding epoch 2
    while the log's best was epoch 1, and a resume that ended at epoch 1 gave model.pt epoch 2's weights labelled
    epoch 1. It is now written after checkpoint.pt, and a stop between those two is mended from checkpoint.pt."""
    monkeypatch.setattr(SyntheticValidation, "score", _rising_score)
    one, two = tmp_path / "one", tmp_path / "two"
    train(_cfg(texture, select="synthetic", epochs=1), one, quiet=True)
    train(_cfg(texture, select="synthetic", epochs=2), two, quiet=True)
    for name, resume_to, same_as in (("checkpoint.pt", 1, one), ("best.pt", 2, two)):
        run = tmp_path / f"stopped_at_{name}"
        with monkeypatch.context() as m:
            _kill_at(m, name, epoch=2)
            with pytest.raises(_Killed):
                train(_cfg(texture, select="synthetic", epochs=2), run, quiet=True)
        train(_cfg(texture, select="synthetic", epochs=resume_to), run, resume=True, quiet=True)
        _same_model(run / "model.pt", same_as / "model.pt")
        assert read_checkpoint(run / "best.pt")["epoch"] == resume_to
    # a best.pt of another epoch than the log's best (whose weights are gone) is refused, never relabelled
    (run / "model.pt").unlink()
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    log[1]["val_synthetic_score"] = -1.0   # the log's best is now epoch 1; best.pt holds epoch 2
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    with pytest.raises(BadInputError, match="best.pt holds epoch 2, but the log's best is epoch 1"):
        train(_cfg(texture, select="synthetic", epochs=2), run, resume=True, quiet=True)
    assert not (run / "model.pt").exists()


def test_a_stop_before_checkpoint_pt_keeps_the_kept_epoch(texture, tmp_path, monkeypatch):
    """epochs/epoch_NNN.pt (--keep-every) was written after checkpoint.pt: a stop between them lost it for good
    (the resume starts after that epoch). It is now written first, and the replayed epoch writes it again."""
    run, full = tmp_path / "stopped", tmp_path / "full"
    train(_cfg(texture, epochs=2, keep_every=1), full, quiet=True)
    with monkeypatch.context() as m:
        _kill_at(m, "epoch_002.pt", epoch=2)
        with pytest.raises(_Killed):
            train(_cfg(texture, epochs=2, keep_every=1), run, quiet=True)
    train(_cfg(texture, epochs=2, keep_every=1), run, resume=True, quiet=True)
    a, b = (read_checkpoint(r / "epochs" / "epoch_002.pt")["state_dict"] for r in (run, full))
    assert all(torch.equal(a[k], b[k]) for k in a)


_BY_EPOCH = {1: 0.0, 2: 1.0, 3: 5.0, 4: 3.0, 5: 2.0}


def _score_by_epoch(self, model, batch_size=8, channels_last=False):
    """A fixed score per epoch (the weights' step count: one step an epoch here): epoch 3 the best, then 4."""
    n = max(int(b) for k, b in model.named_buffers() if k.endswith("num_batches_tracked"))
    return {"score": _BY_EPOCH[n], "image_auroc": 0.5, "pixel_auroc": 0.5}


def _validated(run):
    return [r["epoch"] for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())
            if "val_synthetic_score" in r]


def test_a_resume_that_changes_epochs_selects_as_a_new_run_of_its_config(texture, tmp_path, monkeypatch):
    """select: synthetic at val_every > 1, resumed with another --epochs: the resume chose among the epochs the old
    schedule validated. Extended 3 -> 5, the old last epoch 3 (scored, the best) won, though a 5-epoch run scores
    2, 4 and 5 only; shortened to the epoch done (3 of 5), epoch 3 was never scored, and with none scored (2 of 6
    at val_every 3) model.pt had no selection and no best.pt. Now each equals a new run of its saved config.yaml."""
    monkeypatch.setattr(SyntheticValidation, "score", _score_by_epoch)

    def same_as_new_run(run):
        new = tmp_path / f"{run.name}_new"
        train(load_config(str(run / "config.yaml")), new, quiet=True)
        _same_model(run / "model.pt", new / "model.pt")
        return read_checkpoint(run / "model.pt")["epoch"], _validated(new)

    ext = tmp_path / "ext"
    train(_cfg(texture, select="synthetic", val_every=2, epochs=3), ext, quiet=True)
    assert _validated(ext) == [2, 3] and read_checkpoint(ext / "best.pt")["epoch"] == 3
    with pytest.warns(UserWarning, match="best.pt holds epoch 3, which a 5-epoch run at val_every 2 does not score"):
        train(_cfg(texture, select="synthetic", val_every=2, epochs=5), ext, resume=True, quiet=True)
    assert same_as_new_run(ext) == (4, [2, 4, 5])
    for val_every, epochs, done in ((2, 5, 3), (3, 6, 2)):
        run = tmp_path / f"short_{val_every}"
        with monkeypatch.context() as m:   # stopped before the checkpoint of epoch done + 1
            _kill_at(m, "checkpoint.pt", epoch=done + 1)
            with pytest.raises(_Killed):
                train(_cfg(texture, select="synthetic", val_every=val_every, epochs=epochs), run, quiet=True)
        train(_cfg(texture, select="synthetic", val_every=val_every, epochs=done), run, resume=True, quiet=True)
        assert same_as_new_run(run) == (done, _validated(run))
        assert read_checkpoint(run / "best.pt")["epoch"] == done


def test_calibrate_auto_on_the_denoising_students_kinds_is_warned_as_train_warns(texture, tmp_path):
    """`calibrate --map-levels auto --synthetic-kinds fabric` on a run whose denoising student learns the fabric
    kinds made the biased choice train warns about, without a word; a bad denoise_kinds named synthetic_kinds."""
    import warnings
    from uninet_feat.calibration import recalibrate
    cfg = _cfg(texture, epochs=1, denoise=1.0, synthetic_kinds="texture_patch")
    train(cfg, tmp_path / "run", quiet=True)
    with pytest.warns(UserWarning, match="denoising student is trained on"):
        recalibrate(tmp_path / "run", map_levels="auto", synthetic_kinds="fabric")
    with warnings.catch_warnings(record=True) as rec:   # disjoint kinds: no such warning
        warnings.simplefilter("always")
        recalibrate(tmp_path / "run", map_levels="auto", synthetic_kinds="texture_patch")
    assert not [w for w in rec if "denoising student" in str(w.message)]
    bad = {**cfg, "denoise_kinds": "scratch"}
    with pytest.raises(BadInputError, match="fix: denoise_kinds:"):
        train(bad, tmp_path / "bad", quiet=True)


def test_select_synthetic_with_no_finite_score_warns_and_says_model_pt_is_the_last_epoch(texture, tmp_path,
                                                                                          monkeypatch, capsys):
    """Every validation NaN (non-finite maps) left best epoch 0 and model.pt silently the last epoch, with no
    selection: as if select: last had been asked."""
    from uninet_feat.evaluate import print_report
    nan = {"image_auroc": float("nan"), "pixel_auroc": float("nan"), "score": float("nan")}
    monkeypatch.setattr(SyntheticValidation, "score", lambda self, *a, **k: dict(nan))
    with pytest.warns(UserWarning, match="scored no validated epoch .* model.pt is the last epoch, 2"):
        train(_cfg(texture, select="synthetic", epochs=2), tmp_path / "r", quiet=True)
    model = read_checkpoint(tmp_path / "r" / "model.pt")
    assert model["epoch"] == 2 and model["selection"]["score"] is None
    assert model["selection"]["rule"].startswith("last") and not (tmp_path / "r" / "best.pt").exists()
    print_report({"epoch": 2, "selection": model["selection"], "image_auroc": 0.5})
    assert "no finite synthetic validation score" in capsys.readouterr().out
