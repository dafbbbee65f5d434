"""open_clip ViT backbone (clip:) and zero-shot text scoring (uninet_feat.vlm), on tiny random configs."""
import argparse
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import uninet_feat  # noqa: F401  (before open_clip/timm)
from uninet_feat.backbones import create_backbone
from uninet_feat.backbones.clip import build_clip_model
from uninet_feat.errors import BadInputError

P14 = {"embed_dim": 16, "vision_cfg": {"image_size": 56, "layers": 3, "width": 32, "head_width": 16, "patch_size": 14},
       "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
P32 = {"embed_dim": 16, "vision_cfg": {"image_size": 64, "layers": 3, "width": 32, "head_width": 16, "patch_size": 32},
       "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name,kw,size,strides", [
    ("clip:tiny", {}, 64, (4, 8, 16)), ("clip:tiny", {}, 96, (4, 8, 16)),          # patch 16, two resolutions
    ("clip:tiny-p8", {}, 64, (2, 4, 8)), ("clip:tiny-p8", {}, 40, (2, 4, 8)),       # patch 8
    ("clip:p32", {"model_cfg": P32}, 64, (8, 16, 32)), ("clip:p32", {"model_cfg": P32}, 128, (8, 16, 32)),
    ("clip:p14", {"model_cfg": P14}, 112, (4, 8, 16)),                               # patch 14: resampled
])
def test_pyramid_shapes_and_strides(name, kw, size, strides):
    bb = create_backbone(name, **kw)
    assert bb.strides == strides and bb.channels == (bb.width,) * 3 and bb.finetunable
    w = size + bb.size_multiple  # not square
    feats = bb(torch.randn(2, 3, size, w))
    assert [tuple(f.shape) for f in feats] == [(2, bb.width, size // s, w // s) for s in strides]
    assert all(torch.isfinite(f).all() for f in feats)


def test_real_model_geometry_known_without_weights():
    with torch.device("meta"):  # nothing allocated, nothing downloaded
        b16, l14, b32 = (create_backbone(f"clip:{n}") for n in ("ViT-B-16", "ViT-L-14", "ViT-B-32"))
    assert (b16.levels, b16.strides, b16.channels, b16.size_multiple) == ((3, 6, 9), (4, 8, 16), (768,) * 3, 16)
    assert (l14.levels, l14.strides, l14.channels, l14.size_multiple) == ((6, 12, 18), (4, 8, 16), (1024,) * 3, 112)
    assert (b32.strides, b32.size_multiple) == ((8, 16, 32), 32)
    assert b16.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_input_not_a_multiple_is_refused_with_working_sizes():
    bb = create_backbone("clip:tiny")
    with pytest.raises(BadInputError, match=r"multiples of 16.*got 70×64.*image_size 64 or 80"):
        bb(torch.randn(1, 3, 70, 64))
    p14 = create_backbone("clip:p14", model_cfg=P14)
    with pytest.raises(BadInputError, match="multiples of 112"):
        p14(torch.randn(1, 3, 56, 56))  # a multiple of the patch, but not of the stride-16 level


def test_levels_and_strides_options():
    bb = create_backbone("clip:tiny", levels="0,1,3", strides=(2, 4, 8))
    assert bb.levels == (0, 1, 3) and bb.strides == (2, 4, 8)
    assert [f.shape[-1] for f in bb(torch.randn(1, 3, 64, 64))] == [32, 16, 8]
    for bad in ((1, 1, 2), (0, 2, 4), (3, 2, 1)):
        with pytest.raises(BadInputError, match="levels"):
            create_backbone("clip:tiny", levels=bad)
    with pytest.raises(BadInputError, match="strides"):
        create_backbone("clip:tiny", strides=(4, 12, 16))


def test_matches_open_clip_and_file_round_trip(tmp_path):
    clip = build_clip_model("tiny")
    torch.save(clip.state_dict(), tmp_path / "clip.pt")          # the whole open_clip model
    bb = create_backbone("clip:tiny", weights=str(tmp_path / "clip.pt")).eval()
    x = torch.randn(2, 3, 64, 64)                                 # native size: no pos-embed interpolation
    with torch.no_grad():
        ref = clip.visual.forward_intermediates(x, indices=[1, 2, 3], output_fmt="NCHW")["image_intermediates"]
        f = bb(x)
        torch.testing.assert_close(f[2], ref[2])
        torch.testing.assert_close(f[1], F.interpolate(ref[1], scale_factor=2, mode="bilinear"))
        torch.testing.assert_close(f[0], F.interpolate(ref[0], scale_factor=4, mode="bilinear"))
        torch.testing.assert_close(bb.embed(x)["image_embedding"], clip.encode_image(x, normalize=True))
    # the backbone's own state dict (image tower only), through a {'state_dict': ...} wrapper
    torch.save({"state_dict": bb.state_dict()}, tmp_path / "bb.pth")
    again = create_backbone("clip:tiny", weights=str(tmp_path / "bb.pth")).eval()
    y = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        for a, b in zip(bb(y), again(y)):
            assert torch.equal(a, b)
    # config() rebuilds the same architecture (random weights)
    rebuilt = create_backbone(**bb.config())
    assert rebuilt.config() == bb.config()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in bb.state_dict().items()}


def test_bad_weight_files_refused(tmp_path):
    sd = build_clip_model("tiny").state_dict()
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pt")
    with pytest.raises(BadInputError, match="refusing to load"):
        create_backbone("clip:tiny", weights=str(tmp_path / "pickled.pt"))
    torch.save(build_clip_model("tiny-p8").state_dict(), tmp_path / "p8.pt")
    with pytest.raises(BadInputError, match="wrong shape"):
        create_backbone("clip:tiny", weights=str(tmp_path / "p8.pt"))
    with pytest.raises(BadInputError, match="not found"):
        create_backbone("clip:tiny", weights=str(tmp_path / "missing.pt"))
    with pytest.raises(BadInputError, match="pretrained tag"):  # checked offline, before any download
        create_backbone("clip:ViT-B-16", weights="imagenet")


def test_nan_weights_refused(tmp_path):
    """NaN weights make every feature and text score NaN: refused by the backbone and the whole-model loader."""
    sd = build_clip_model("tiny").state_dict()
    sd["visual.conv1.weight"] = torch.full_like(sd["visual.conv1.weight"], float("nan"))
    torch.save(sd, tmp_path / "nan.pt")
    with pytest.raises(BadInputError, match=r"nan\.pt.*NaN or infinite.*conv1\.weight"):
        create_backbone("clip:tiny", weights=str(tmp_path / "nan.pt"))
    with pytest.raises(BadInputError, match=r"nan\.pt.*NaN or infinite.*visual\.conv1\.weight"):
        build_clip_model("tiny", str(tmp_path / "nan.pt"))


def test_unsupported_models_explained():
    with pytest.raises(BadInputError, match="did you mean"):
        create_backbone("clip:ViT-B-61")
    with pytest.raises(BadInputError, match="ModifiedResNet"):
        create_backbone("clip:RN50")
    with pytest.raises(BadInputError, match="timm image tower"):
        create_backbone("clip:ViT-B-16-SigLIP")


def test_importing_backbones_does_not_import_open_clip():
    code = "import sys, uninet_feat.backbones as b; assert 'clip:' in b.list_backbones(); " \
           "assert 'open_clip' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_uninet_trains_and_scores_on_clip(tmp_path):
    from uninet_feat.checkpoint import build_from_checkpoint, save_checkpoint
    from uninet_feat.config import DEFAULT_CONFIG
    from uninet_feat.model import UniNet
    model = UniNet(create_backbone("clip:tiny", levels=(1, 2, 3)), decoder_depths=(1, 1, 1))
    before = {k: v.clone() for k, v in model.source.state_dict().items()}
    g = model.trainable_groups()
    opts = [torch.optim.AdamW(g["student"], lr=1e-3), torch.optim.AdamW(g["target"], lr=1e-4)]
    x = torch.randn(2, 3, 64, 64)
    model.train()
    for _ in range(2):
        loss = model.loss(model(x))["loss"]
        assert torch.isfinite(loss)
        for o in opts:
            o.zero_grad()
        loss.backward()
        assert model.target.visual.conv1.weight.grad is not None
        for o in opts:
            o.step()
    assert all(torch.equal(v, before[k]) for k, v in model.source.state_dict().items())
    assert not torch.equal(model.target.visual.conv1.weight, model.source.visual.conv1.weight)
    model.eval()
    maps, scores = model.predict(x)
    assert maps.shape == (2, 64, 64) and scores.shape == (2,) and torch.isfinite(scores).all()
    cfg = {**DEFAULT_CONFIG, "backbone": "clip:tiny", "decoder_depths": [1, 1, 1]}
    save_checkpoint(tmp_path / "model.pt", model, cfg)
    again, _ = build_from_checkpoint(tmp_path / "model.pt")
    torch.testing.assert_close(again.eval().predict(x)[1], scores)


# ---------------------------------------------------------------- text side
def test_text_scorer_shapes_and_features():
    from uninet_feat.vlm import FEATURE_NAMES, TextScorer
    bb = create_backbone("clip:tiny")
    ts = TextScorer(bb)
    assert ts.text_embeddings.shape == (2, 32) and len(ts.normal_prompts) > 10 and len(ts.defect_prompts) > 10
    assert "a photo of a flawless fabric." in ts.normal_prompts
    x = torch.randn(3, 3, 64, 96)
    s, p, f = ts.image_scores(x), ts.patch_scores(x), ts.features(x)
    assert s.shape == (3,) and p.shape == (3, 4, 6) and f.shape == (3, len(FEATURE_NAMES)) == (3, 4)
    assert ts.patch_scores(x, out_size=(64, 96)).shape == (3, 64, 96)
    assert all(torch.isfinite(t).all() and (t >= 0).all() and (t <= 1).all() for t in (s, p, f))
    torch.testing.assert_close(f[:, 0], s)
    torch.testing.assert_close(f[:, 1], p.flatten(1).amax(1))
    value = TextScorer(bb, patch_mode="value", text_model=build_clip_model("tiny"))
    assert value.patch_scores(x).shape == (3, 4, 6)
    # value mode shares blocks 0..L-2 between the image and the patch side: same as two full passes
    fv = value.features(x)
    pv = value.patch_scores(x).flatten(1)
    torch.testing.assert_close(fv[:, 0], value.image_scores(x))
    torch.testing.assert_close(fv[:, 1:3], torch.stack([pv.amax(1), pv.mean(1)], 1))
    assert not torch.allclose(pv, p.flatten(1))   # and the value end differs from the token end
    with pytest.raises(BadInputError, match="patch size"):
        ts.image_scores(torch.randn(1, 3, 60, 64))


@pytest.mark.parametrize("mode,levels", [("tokens", None), ("value", (0, 1, 2)), ("tokens", (0, 1, 2))])
def test_text_side_reuses_the_teachers_tower_pass(tmp_path, mode, levels):
    """extract --text: the text columns come from the backbone's own pass (one tower run per batch, not
    two), equal to a separate `TextScorer.features`; the pyramid is unchanged by keeping the tokens."""
    import warnings
    from PIL import Image
    from uninet_feat.extract import Extractor
    from uninet_feat.vlm import TextScorer
    bb = create_backbone("clip:tiny", levels=levels).eval()
    ts = TextScorer(bb, patch_mode=mode, text_model=build_clip_model("tiny")).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        plain = bb(x)
        with bb.keep_tower_output() as passes:
            kept = bb(x)
        assert len(passes) == 1 and all(torch.equal(a, b) for a, b in zip(plain, kept))
        torch.testing.assert_close(ts.features_from_tower(passes[0]), ts.features(x), rtol=1e-5, atol=1e-6)
        assert bb(x)[0].shape == plain[0].shape and getattr(bb, "_tower_out", None) is None  # off again
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy()).save(paths[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = Extractor(backbone="clip:tiny", weights="random", image_size=64, text=True, batch_size=2)
    ex.text_scorer.patch_mode = mode
    if levels:
        ex.backbone.levels = levels
    runs = []
    ex.backbone.visual.conv1.register_forward_hook(lambda *a: runs.append(1))
    got = ex.extract(paths)["vectors"][:, -4:]
    assert len(runs) == 3                                   # 5 images in batches of 2: one pass each
    batch = torch.stack([ex._dataset(paths)[1][i]["image"] for i in range(5)])
    np.testing.assert_allclose(got, ex.text_scorer.features(batch).numpy(), rtol=1e-5, atol=1e-6)


def test_prompts_longer_than_the_text_context_are_refused_not_cut(tmp_path):
    """The tokenizer cut prompts at the text tower's context, silently: a normal and a defect prompt that differed
    only past the cut embedded alike and every score was exactly 0.5 (an audit, session 52)."""
    from uninet_feat.vlm import TextScorer
    clip = build_clip_model("tiny")
    ctx = int(clip.context_length)
    long = "a close-up of woven fabric " * ctx   # far past any context
    with pytest.raises(BadInputError, match=rf"1 prompt\(s\) are longer than the text tower's {ctx}-token context"):
        TextScorer(clip, [long + "without flaws"], ["a photo of torn fabric."])
    fits = " ".join(["fabric"] * (ctx - 2))   # exactly the context, start and end tokens included
    TextScorer(clip, [fits], ["a photo of torn fabric."])


def test_a_half_precision_text_scorer_scores_as_the_fp32_one():
    """`TextScorer(...).half()` made its text buffer fp16 beside the fp32 image embedding: a dtype RuntimeError at the
    first score (an audit, session 52)."""
    from uninet_feat.vlm import TextScorer
    torch.manual_seed(0)
    bb = create_backbone("clip:tiny").eval()
    ts = TextScorer(bb, text_model=build_clip_model("tiny")).eval()
    x = torch.randn(2, 3, 64, 64)
    want = ts.image_scores(x)
    got = ts.half().image_scores(x.half())
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=2e-2)


def test_prompts_are_editable(tmp_path):
    from uninet_feat.vlm import TextScorer, dump_prompts, load_prompts
    clip = build_clip_model("tiny")
    ts = TextScorer(clip, ["a photo of perfect denim."], ["a photo of torn denim.", "ripped {}"], obj="denim",
                    templates=("a {} close-up.",))
    assert ts.normal_prompts == ["a photo of perfect denim."]
    assert ts.defect_prompts == ["a photo of torn denim.", "a ripped denim close-up."]
    f = dump_prompts(tmp_path / "prompts.yaml")
    f.write_text(f.read_text().replace("object: fabric", "object: silk"))
    assert all("silk" in p for p in load_prompts(f)["defect"])
    from_file = TextScorer(clip, prompt_file=f)
    assert from_file.defect_prompts == load_prompts(f)["defect"]
    assert not torch.allclose(from_file.text_embeddings, ts.text_embeddings)
    (tmp_path / "bad.yaml").write_text("normals: [x]\n")
    with pytest.raises(BadInputError, match="keys"):
        load_prompts(tmp_path / "bad.yaml")
    # templates and prompts str.format cannot fill, an empty list, one template as a string (session-24 audit)
    for text, match in (("templates: ['a {} photo of {}.']\n", "exactly one '{}'"),
                        ("defect: ['{obj} is {}']\n", r"prompt '\{obj\} is \{\}' or a template cannot be filled"),
                        ("defect: ['{0} and {}']\n", "cannot be filled"),
                        ("normal: []\n", "the 'normal' prompt list is empty")):
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(BadInputError, match=match) as e:
            load_prompts(tmp_path / "bad.yaml")
        assert "bad.yaml" in str(e.value) and "fix:" in str(e.value)
    (tmp_path / "one.yaml").write_text("templates: 'a photo of {}.'\ndefect: ['torn {}']\n")
    assert load_prompts(tmp_path / "one.yaml")["defect"] == ["a photo of torn fabric."]


def test_zero_shot_ranking_on_constructed_text_embeddings():
    """Monkeypatched text embeddings: 'defect' = image B's embedding, 'normal' = image A's → B ranks above A;
    at patch level, 'defect' = one patch's embedding, 'normal' = its negation → that patch scores highest."""
    from uninet_feat.model import UniNet
    from uninet_feat.vlm import TextScorer
    bb = create_backbone("clip:tiny").eval()
    ts = TextScorer(UniNet(bb, decoder_depths=(1, 1, 1)))   # a UniNet: scored with its frozen source teacher
    assert ts.visual is bb.visual
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        e = bb.embed(x)["image_embedding"]
        ts.text_embeddings.copy_(torch.stack([e[0], e[1]]))
        s = ts.image_scores(x)
        assert s[1] > 0.5 > s[0]
        pe = bb.patch_embeddings(x[:1])                      # (1, D, 4, 4)
        d = pe[0, :, 2, 1]
        ts.text_embeddings.copy_(torch.stack([-d, d]))
        p = ts.patch_scores(x[:1])[0]
    assert divmod(int(p.argmax()), p.shape[1]) == (2, 1)


@pytest.mark.filterwarnings("ignore")  # tracing warnings: the archive only carries the weights
def test_openai_style_torchscript_archive_loads(tmp_path):
    clip = build_clip_model("tiny")
    x = torch.randn(1, 3, 64, 64)
    traced = torch.jit.trace(clip, (x, torch.zeros(1, 32, dtype=torch.long)), check_trace=False)
    traced.save(str(tmp_path / "ViT-tiny.pt"))
    bb = create_backbone("clip:tiny", weights=str(tmp_path / "ViT-tiny.pt"))
    with torch.no_grad():
        torch.testing.assert_close(bb.embed(x)["image_embedding"], clip.encode_image(x, normalize=True))


def test_text_tower_comes_from_the_backbone_weights(tmp_path):
    from uninet_feat.vlm import TextScorer
    clip = build_clip_model("tiny")
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    bb = create_backbone("clip:tiny", weights=str(tmp_path / "clip.pt"))
    torch.testing.assert_close(TextScorer(bb).text_embeddings, TextScorer(clip).text_embeddings)
    torch.testing.assert_close(TextScorer(bb).logit_scale, float(clip.logit_scale.detach().exp()))
    torch.save(bb.state_dict(), tmp_path / "visual_only.pt")
    with pytest.raises(BadInputError, match="only an image tower"):
        TextScorer(create_backbone("clip:tiny", weights=str(tmp_path / "visual_only.pt")))


def test_zero_shot_takes_any_multiple_of_the_patch_not_of_the_pyramids_stride():
    """A patch-14 ViT takes multiples of 112 under UniNet (patch and the stride-16 level), but zero-shot builds no
    pyramid: 56 (its native size here; 378 for ViT-H-14-378) was refused."""
    from uninet_feat.workflows import zero_shot_step
    p14 = create_backbone("clip:p14", model_cfg=P14)
    assert p14.size_multiple == 112 and zero_shot_step(p14) == 14
    assert zero_shot_step(create_backbone("clip:tiny")) == 16


@pytest.mark.parametrize("text, said", [("normal: 5\n", "'normal' must be a sentence or a list of sentences"),
                                        ("templates: 5\n", "'templates' must be a sentence"),
                                        ("defect: {a: b}\n", "'defect' must be a sentence"),
                                        ("templates: []\n", "the 'templates' list is empty"),
                                        ("object: null\n", "'object' must be a non-empty word"),
                                        ("object: [a, b]\n", "'object' must be a non-empty word")])
def test_prompt_files_of_the_wrong_shape_are_named(tmp_path, text, said):
    """A number was a TypeError traceback after the weights loaded, a mapping's keys were read as prompts, an
    empty template list as the defaults, and `object: null` made 'a photo of a None.'."""
    from uninet_feat.vlm import load_prompts
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(BadInputError, match=said) as e:
        load_prompts(tmp_path / "p.yaml")
    assert e.value.path == str(tmp_path / "p.yaml")


OPENAI = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def test_a_local_file_takes_open_clips_normalisation_for_its_model_name():
    """A local weights file carries no preprocessing, and every file got OpenAI's mean/std: open_clip's own factory
    does the same unless told `image_mean`/`image_std`, but it knows each pretrained tag's (`get_pretrained_cfg`),
    and CLIPA's checkpoints (ImageNet's) or ViT-L-14's laion2b_s32b_b82k (0.5 / 0.5) were fed other inputs than they
    were trained on, silently. From open_clip's registry alone (nothing downloaded): the tag the path names, else
    the one all the model's tags share, else OpenAI's with a warning that names the others and the fix."""
    import warnings
    from uninet_feat.backbones.clip import file_normalisation
    hub = "/cache/huggingface/hub/models--laion--CLIP-ViT-L-14-laion2B-s32B-b82K/snapshots/0a1b/open_clip_model.bin"
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # none of these is ambiguous
        assert file_normalisation("ViT-L-14", hub)[:2] == ((0.5,) * 3, (0.5,) * 3)
        assert file_normalisation("ViT-L-14", r"C:\w\ViT-L-14-laion2b_s32b_b82k.safetensors")[:2] == ((0.5,) * 3,) * 2
        assert file_normalisation("ViT-L-14", "/w/vit_l_14-laion400m_e31-69988bb6.pt")[:2] == OPENAI
        mean, std, why = file_normalisation("ViT-L-14-CLIPA", "/w/clipa.bin")   # every tag: ImageNet's
        assert (mean, std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) and "each of the model's" in why
        assert file_normalisation("ViT-B-16", "/w/b16.bin")[:2] == OPENAI
    with pytest.warns(UserWarning, match=r"/w/l14.bin: a weights file of ViT-L-14.*taking mean \[0.48145466.*"
                                         r"laion2b_s32b_b82k.*--mean 0.5 0.5 0.5 --std 0.5 0.5 0.5"):
        assert file_normalisation("ViT-L-14", "/w/l14.bin")[:2] == OPENAI


def test_a_builtin_models_file_is_normalised_as_open_clip_knows_it_given_values_win_and_are_checked(tmp_path,
                                                                                                   monkeypatch):
    """The backbone takes `file_normalisation` for a file of a built-in open_clip model (here a stand-in: the tiny
    config under an open_clip name, whose two tags differ), `mean=`/`std=` over it (no warning), and records what it
    used, so a checkpoint's config rebuilds it with no lookup. A hub `open_clip_config.json` registered as a config
    keeps its `preprocess_cfg` (it was dropped with the model config). Values that cannot normalise are refused."""
    import json
    import warnings
    import open_clip
    from uninet_feat.backbones.clip import _CONFIGS, register_clip_config
    tiny = dict(_CONFIGS["tiny"])
    tags = {"half": {"mean": (0.5,) * 3, "std": (0.5,) * 3, "hf_hub": "org/tiny-half/"}, "openai": {}}
    monkeypatch.setattr(open_clip, "get_model_config", lambda n: dict(tiny) if n == "Tiny-OC" else None)
    monkeypatch.setattr(open_clip, "list_pretrained_tags_by_model", lambda n: list(tags) if n == "Tiny-OC" else [])
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda n, t: tags.get(t, {}) if n == "Tiny-OC" else {})
    torch.save(build_clip_model("tiny").state_dict(), tmp_path / "tiny-half.bin")   # named like the tag's repository
    bb = create_backbone("clip:Tiny-OC", weights=str(tmp_path / "tiny-half.bin"))
    assert (bb.mean, bb.std) == ((0.5,) * 3, (0.5,) * 3) and "tag half" in bb.normalisation_source
    assert bb.config()["mean"] == [0.5] * 3 and "model_cfg" not in bb.config()   # a built-in name: no config copy
    (tmp_path / "other.bin").write_bytes((tmp_path / "tiny-half.bin").read_bytes())
    with pytest.warns(UserWarning, match="differ in their input normalisation"):
        assert (create_backbone("clip:Tiny-OC", weights=str(tmp_path / "other.bin")).mean,) == (OPENAI[0],)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        given = create_backbone("clip:Tiny-OC", weights=str(tmp_path / "other.bin"), mean=(0.4, 0.5, 0.6),
                                std=(0.2, 0.25, 0.3))
        assert (given.mean, given.std, given.normalisation_source) == ((0.4, 0.5, 0.6), (0.2, 0.25, 0.3), "given")
        again = create_backbone(**given.config())   # as a checkpoint rebuilds it (random weights, recorded values)
        assert (again.mean, again.std) == (given.mean, given.std)
    hub = {"model_cfg": tiny, "preprocess_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(hub))
    register_clip_config("tiny-hub", tmp_path / "open_clip_config.json")
    assert create_backbone("clip:tiny-hub").mean == (0.1, 0.2, 0.3)
    for mean, std, said in (((0.5, 0.5), (0.5,) * 3, "mean must be 3 numbers"), ((0.5,) * 3, (0.5, 0, 0.5), "std"),
                            ((127.0,) * 3, (0.5,) * 3, r"each in \[0, 1\]"), ((0.5,) * 3, (float("nan"),) * 3, "std")):
        with pytest.raises(BadInputError, match=said):
            create_backbone("clip:tiny", mean=mean, std=std)


def test_a_local_file_of_openai_weights_by_its_name_gets_quickgelu(tmp_path, monkeypatch):
    """OpenAI's CLIP weights were trained with QuickGELU; open_clip's plain names (ViT-B-16) build GELU, so a local
    copy of them gave other features, silently, unless the user knew to write `-quickgelu`. A path that names a
    tag trained with it (OpenAI's download `ViT-B-16.pt`, timm's `..._clip_224.openai` hub folder) now switches it
    on; a path that names another tag, or none, keeps the name's own activation; given, `quick_gelu=` wins."""
    import open_clip
    from uninet_feat.backbones.clip import _CONFIGS, file_quick_gelu
    hub = "/cache/hub/models--timm--vit_base_patch16_clip_224.openai/snapshots/0a1b/open_clip_pytorch_model.bin"
    assert file_quick_gelu("ViT-B-16", "/w/ViT-B-16.pt") and file_quick_gelu("ViT-B-16", hub)
    assert not file_quick_gelu("ViT-B-16", "/w/b16-laion2b_s34b_b88k.bin") and not file_quick_gelu("ViT-B-16", "/w/x.bin")
    assert not file_quick_gelu("ViT-B-16", "/work/openai_tests/x.bin")   # a word in a folder's name is not a tag
    assert not file_quick_gelu("ViT-B-16", "/m/ViT-B-16.pth")   # a download's name is a whole name, not a word
    from uninet_feat.backbones.clip import file_normalisation   # a folder named as the tag names it
    assert file_normalisation("ViT-L-14", "/w/laion2b_s32b_b82k/open_clip_pytorch_model.bin")[:2] == ((0.5,) * 3,) * 2
    tiny = dict(_CONFIGS["tiny"])
    tags = {"openai": {"quick_gelu": True, "hf_hub": "timm/tiny.openai/"}, "half": {"hf_hub": "org/tiny-half/"}}
    monkeypatch.setattr(open_clip, "get_model_config", lambda n: dict(tiny) if n == "Tiny-OC" else None)
    monkeypatch.setattr(open_clip, "list_pretrained_tags_by_model", lambda n: list(tags) if n == "Tiny-OC" else [])
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda n, t: tags.get(t, {}) if n == "Tiny-OC" else {})
    sd = build_clip_model("tiny").state_dict()
    for name, quick in (("tiny.openai.bin", True), ("tiny-half.bin", False), ("mine.bin", False)):
        torch.save(sd, tmp_path / name)
        bb = create_backbone("clip:Tiny-OC", weights=str(tmp_path / name))
        assert bb.quick_gelu is quick and bb.config()["quick_gelu"] is quick, name
        acts = {type(m).__name__ for m in bb.visual.modules()}
        assert ("QuickGELU" in acts) is quick, name
    assert create_backbone("clip:Tiny-OC", weights=str(tmp_path / "tiny.openai.bin"), quick_gelu=False).quick_gelu is False
