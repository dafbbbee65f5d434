"""Edges of the clip: backbone and its text side: the tokenizer a model config names, weights-file names read from
relative and linked paths, zero-shot re-runs, position-embedding interpolation as open_clip's, single templates."""
import json
import os

import pytest
import torch

import uninet_feat  # noqa: F401  (before open_clip/timm)
from uninet_feat.backbones import create_backbone
from uninet_feat.backbones.clip import _CONFIGS, build_clip_model
from uninet_feat.errors import BadInputError

from _tiny import write_texture_set

# a tiny CLIPA / MetaCLIP-2-worldwide-like text side: its own vocabulary, pooled at its eos token (id 2)
_HF_TEXT = {"context_length": 32, "vocab_size": 50000, "width": 32, "heads": 2, "layers": 1,
            "hf_tokenizer_name": "facebook/xlm-v-base", "tokenizer_kwargs": {"strip_sep_token": True},
            "pool_type": "eos", "eos_id": 2}
_HF_CFG = {"embed_dim": 32, "text_cfg": _HF_TEXT, "vision_cfg": dict(_CONFIGS["tiny"]["vision_cfg"])}


class _FakeHF:
    """Stands in for open_clip's HFTokenizer (no transformers, no download): ids 3.. per character, eos 2."""

    def __init__(self, name, context_length=77, tokenizer_mode=None, **kwargs):
        self.name, self.context_length, self.kwargs = name, context_length, kwargs

    def __call__(self, texts):
        out = torch.ones(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [0] + [3 + ord(c) % 1000 for c in t][:self.context_length - 2] + [2]
            out[i, :len(ids)] = torch.tensor(ids)
        return out


def test_the_tokenizer_the_model_config_names_is_used(tmp_path, monkeypatch):
    """A config naming a Hugging Face tokenizer (CLIPA, MetaCLIP-2 worldwide) got CLIP's SimpleTokenizer: its ids
    never hold the eos id, so an eos-pooled text tower embedded every prompt alike and every score was exactly 0.5,
    silently. From model_cfg=, register_clip_config or clip_name= the config's HFTokenizer is built (its context
    length and tokenizer_kwargs); an open_clip model alone with a vocabulary not CLIP's is refused with the fix."""
    import open_clip
    from uninet_feat.vlm import TextScorer
    monkeypatch.setattr(open_clip.tokenizer, "HFTokenizer", _FakeHF)
    torch.manual_seed(0)
    clip = build_clip_model("hf-like", model_cfg=_HF_CFG)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    bb = create_backbone("clip:hf-like", weights=str(tmp_path / "clip.pt"), model_cfg=_HF_CFG).eval()
    ts = TextScorer(bb, ["flawless fabric"], ["torn fabric with a hole"])
    assert isinstance(ts.tokenizer, _FakeHF) and ts.tokenizer.name == "facebook/xlm-v-base"
    assert ts.tokenizer.context_length == 32 and ts.tokenizer.kwargs == {"strip_sep_token": True}
    assert not torch.allclose(ts.text_embeddings[0], ts.text_embeddings[1])   # one embedding for both: all 0.5
    assert (ts.image_scores(torch.randn(2, 3, 64, 64)) - 0.5).abs().max() > 1e-4
    _CONFIGS.pop("hf-like-reg", None)
    from uninet_feat.backbones.clip import register_clip_config
    register_clip_config("hf-like-reg", _HF_CFG)
    try:
        assert isinstance(TextScorer(create_backbone("clip:hf-like-reg"), ["a"], ["b"]).tokenizer, _FakeHF)
        assert isinstance(TextScorer(clip, ["a"], ["b"], clip_name="hf-like-reg").tokenizer, _FakeHF)
    finally:
        _CONFIGS.pop("hf-like-reg", None)
    with pytest.raises(BadInputError, match="50000 tokens, not CLIP's 49408") as e:
        TextScorer(clip, ["a"], ["b"])   # nothing names its tokenizer
    assert "tokenizer=" in e.value.fix
    assert isinstance(TextScorer(clip, ["a"], ["b"], tokenizer=_FakeHF("x", 32)).tokenizer, _FakeHF)
    plain = TextScorer(build_clip_model("tiny"), ["a"], ["b"])   # CLIP's vocabulary: CLIP's tokenizer, as before
    assert type(plain.tokenizer).__name__ == "SimpleTokenizer" and plain.tokenizer.context_length == 32


@pytest.mark.parametrize("error,said", [(ModuleNotFoundError("No module named 'transformers'"), "pip install "
                                                                                                 "transformers"),
                                        (OSError("We couldn't connect to 'https://huggingface.co'"), "HF_HOME")])
def test_a_hugging_face_tokenizer_that_cannot_load_is_a_bad_input_error(monkeypatch, error, said):
    """A built-in CLIPA name raised a raw ModuleNotFoundError ('transformers') from open_clip.get_tokenizer, and an
    offline machine an OSError; both now say what is needed."""
    import open_clip
    from uninet_feat.vlm import TextScorer

    def fail(*a, **k):
        raise error
    monkeypatch.setattr(open_clip.tokenizer, "HFTokenizer", fail)
    with torch.device("meta"):   # nothing allocated: the tokenizer is built before any weight is used
        bb = create_backbone("clip:ViT-L-14-CLIPA")
        with pytest.raises(BadInputError, match="bert-base-uncased") as e:
            TextScorer(bb)
    assert said in e.value.fix and "tokenizer=" in e.value.fix


def _tiny_oc(monkeypatch):
    """`clip:Tiny-OC`, a built-in model to open_clip's registry whose tag `openai` has QuickGELU and 0.5 / 0.5."""
    import open_clip
    tiny = dict(_CONFIGS["tiny"])
    tags = {"openai": {"quick_gelu": True, "mean": (0.5,) * 3, "std": (0.5,) * 3, "hf_hub": "timm/tiny.openai/"},
            "half": {"hf_hub": "org/tiny-half/"}}
    monkeypatch.setattr(open_clip, "get_model_config", lambda n: dict(tiny) if n == "Tiny-OC" else None)
    monkeypatch.setattr(open_clip, "list_pretrained_tags_by_model", lambda n: list(tags) if n == "Tiny-OC" else [])
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda n, t: tags.get(t, {}) if n == "Tiny-OC" else {})


def test_a_weights_files_tag_is_read_from_its_absolute_and_linked_path(tmp_path, monkeypatch):
    """The tag a hub cache folder names (`models--timm--...openai`) set QuickGELU and mean/std for the absolute
    path only: the same file given relative to its snapshot folder got GELU and OpenAI's. The path is now read
    made absolute, and where its links lead."""
    from uninet_feat.backbones.clip import file_normalisation, file_quick_gelu
    _tiny_oc(monkeypatch)
    cache = tmp_path / "hub" / "models--timm--tiny.openai"
    (cache / "blobs").mkdir(parents=True)
    torch.save(build_clip_model("tiny").state_dict(), cache / "blobs" / "9f3c1e")
    snap = cache / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "open_clip_pytorch_model.bin").symlink_to(os.path.join("..", "..", "blobs", "9f3c1e"))
    mine = tmp_path / "elsewhere" / "mine.bin"   # a link of another name to the cached file
    mine.parent.mkdir()
    mine.symlink_to(cache / "blobs" / "9f3c1e")
    monkeypatch.chdir(snap)
    for w in ("open_clip_pytorch_model.bin", "./open_clip_pytorch_model.bin", str(snap / "open_clip_pytorch_model.bin"),
              os.path.relpath(mine)):
        assert file_quick_gelu("Tiny-OC", w), w
        assert file_normalisation("Tiny-OC", w)[:2] == ((0.5,) * 3, (0.5,) * 3), w
        bb = create_backbone("clip:Tiny-OC", weights=w)
        assert bb.quick_gelu is True and bb.mean == (0.5,) * 3, w
    assert not file_quick_gelu("Tiny-OC", str(tmp_path / "plain.bin"))   # names no tag: the name's own


def test_zero_shot_records_what_it_read_from_the_file_name_and_reruns_with_it(tmp_path, monkeypatch):
    """zero-shot recorded the weights file link-resolved and the mean/std only when given: for a link named as
    the tag (`tiny.openai.bin` -> `store/abc123`) a re-run with --config read no tag from the recorded path and
    scored with GELU and OpenAI's mean/std. It now records the path as given (absolute) and the mean/std used."""
    import yaml
    from uninet_feat.cli import main
    _tiny_oc(monkeypatch)
    data = write_texture_set(tmp_path / "d", n_train=2, n_good=1, n_bad=1)
    torch.manual_seed(0)
    (tmp_path / "store").mkdir()
    torch.save(build_clip_model("tiny").state_dict(), tmp_path / "store" / "abc123")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "tiny.openai.bin").symlink_to(tmp_path / "store" / "abc123")
    monkeypatch.chdir(tmp_path / "w")
    zs = tmp_path / "zs"
    assert main(["zero-shot", "--data", str(data), "--backbone", "clip:Tiny-OC", "--weights", "tiny.openai.bin",
                 "--image-size", "64", "--quiet", "--out", str(zs)]) == 0
    saved = yaml.safe_load((zs / "config.yaml").read_text())
    assert saved["weights"] == str(tmp_path / "w" / "tiny.openai.bin")
    assert (saved["mean"], saved["std"]) == ([0.5] * 3, [0.5] * 3) and saved["quick_gelu"] is True
    monkeypatch.chdir(tmp_path)
    assert main(["zero-shot", "--config", str(zs / "config.yaml"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    first, again = (json.loads((d / "scores.json").read_text()) for d in (zs, tmp_path / "again"))
    assert [r["clip_image_score"] for r in first] == [r["clip_image_score"] for r in again]
    # the activation can be given (--no-quick-gelu), is recorded, and a re-run of that config keeps it
    assert main(["zero-shot", "--data", str(data), "--backbone", "clip:Tiny-OC", "--weights",
                 str(tmp_path / "w" / "tiny.openai.bin"), "--image-size", "64", "--no-quick-gelu", "--quiet",
                 "--out", str(tmp_path / "gelu")]) == 0
    gelu = json.loads((tmp_path / "gelu" / "scores.json").read_text())
    assert len(gelu) == len(first) and gelu != first
    assert yaml.safe_load((tmp_path / "gelu" / "config.yaml").read_text())["quick_gelu"] is False
    assert main(["zero-shot", "--config", str(tmp_path / "gelu" / "config.yaml"), "--out", str(tmp_path / "g2"),
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "g2" / "scores.json").read_text()) == gelu


@pytest.mark.parametrize("size", [96, 128, 32])
def test_position_embeddings_are_interpolated_as_open_clip_does(size):
    """Larger inputs than native interpolated without antialiasing, open_clip's resize_pos_embed always with it:
    features differed (0.014 at 320 px for ViT-B-16)."""
    import open_clip
    from open_clip.model import resize_pos_embed
    from uninet_feat.backbones.clip import _pos_embed
    torch.manual_seed(0)
    v = create_backbone("clip:tiny").visual   # native 64 px: a 4 x 4 grid
    cfg = json.loads(json.dumps(_CONFIGS["tiny"]))
    cfg["vision_cfg"]["image_size"] = size
    sd = {"visual.positional_embedding": v.positional_embedding.detach().clone()}
    resize_pos_embed(sd, open_clip.model.CLIP(**cfg))
    torch.testing.assert_close(_pos_embed(v, size // 16, size // 16).detach(), sd["visual.positional_embedding"])


def test_a_single_template_string_is_one_template():
    """templates="a photo of {}." (a string, as a prompt file takes) was iterated by character: a misleading
    "Single '{'" error, and a brace-free string gave one-letter prompts. Each template needs exactly one {}."""
    from uninet_feat.vlm import TextScorer, expand_prompts
    bb = create_backbone("clip:tiny")
    ts = TextScorer(bb, templates="a close-up photo of {}.")
    assert ts.normal_prompts[:2] == ["a close-up photo of fabric.", "a close-up photo of flawless fabric."]
    assert all(p.startswith("a close-up photo of ") for p in ts.normal_prompts + ts.defect_prompts)
    assert expand_prompts(["torn {}"], templates="a photo of {}.") == ["a photo of torn fabric."]
    for bad in ("a photo of fabric", ["a {} and a {}"], ["a photo of {}.", 3]):
        with pytest.raises(BadInputError, match="needs exactly one") as e:
            expand_prompts(["flawless {}"], templates=bad)
        assert "a photo of {}." in e.value.fix
        with pytest.raises(BadInputError, match="needs exactly one"):   # whole prompts: the templates still checked
            TextScorer(bb, ["flawless fabric"], ["torn fabric"], templates=bad)
    with pytest.raises(BadInputError, match="templates is empty"):
        TextScorer(bb, templates=[])


def test_a_random_text_tower_is_the_same_whatever_the_callers_seed(tmp_path):
    """--weights random: the image tower was built under seed 0, the text tower (extract --text, TextScorer,
    zero-shot) under whatever the caller's RNG held, so text columns and zero-shot scores changed between
    processes, shards and resumes. Built under seed 0 too; the caller's RNG is left as it was."""
    import numpy as np
    from uninet_feat.extract import Extractor
    from uninet_feat.vlm import TextScorer
    from uninet_feat.workflows import zero_shot_cmd
    data = write_texture_set(tmp_path / "d", n_train=1, n_good=1, n_bad=1)
    paths = sorted(str(p) for p in data.rglob("*.png"))
    cols, embs, scores = [], [], []
    for seed in (100, 101):
        torch.manual_seed(seed)
        with pytest.warns(UserWarning, match="text tower is random"):
            ex = Extractor(backbone="clip:tiny", weights="random", image_size=64, text=True)
        cols.append(ex.extract(paths)["vectors"][:, -4:])
        torch.manual_seed(seed)
        bb = create_backbone("clip:tiny", weights="random")
        state = torch.get_rng_state()
        embs.append(TextScorer(bb).text_embeddings)
        assert torch.equal(state, torch.get_rng_state())   # the caller's RNG untouched
        torch.manual_seed(seed)
        zero_shot_cmd(data, tmp_path / f"zs{seed}", "clip:tiny", "random", image_size=64, quiet=True, device="cpu")
        scores.append([r["clip_image_score"] for r in json.loads((tmp_path / f"zs{seed}" / "scores.json").read_text())])
    np.testing.assert_array_equal(cols[0], cols[1])
    assert torch.equal(embs[0], embs[1])
    assert scores[0] == scores[1]


def test_a_text_model_of_another_width_is_refused_when_the_scorer_is_built():
    """`TextScorer(..., text_model=X)` took a text tower whose embedding width differs from the image tower's and
    failed at the first score with torch's "mat1 and mat2 shapes cannot be multiplied"."""
    from uninet_feat.backbones.clip import register_clip_config
    from uninet_feat.vlm import TextScorer
    cfg = {"embed_dim": 16, "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2,
                                         "layers": 1},
           "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "head_width": 32, "patch_size": 16}}
    register_clip_config("tiny16_test", cfg)
    bb = create_backbone("clip:tiny", weights="random")
    with pytest.raises(BadInputError, match=r"the text model embeds in 16 dimensions, the image tower in 32"):
        TextScorer(bb, text_model=build_clip_model("tiny16_test", "random"))
    same = build_clip_model("tiny", "random")
    assert TextScorer(bb, text_model=same).image_scores(torch.randn(1, 3, 64, 64)).shape == (1,)


def test_a_linked_weights_file_is_recorded_by_the_links_path_whose_name_says_its_activation(tmp_path, monkeypatch):
    """train recorded (and built from) a weights file with links followed: an OpenAI ViT-B-32.pt kept as a link
    into a hash-named store lost the name that says QuickGELU, and trained with GELU while extract and zero-shot
    read the link as QuickGELU."""
    from uninet_feat.runs import absolute_data_paths
    store = tmp_path / "objects" / "SHA256E-s1--3f2a9c.pt"
    store.parent.mkdir()
    store.write_bytes(b"x")
    link = tmp_path / "models" / "ViT-B-32-openai.pt"
    link.parent.mkdir()
    link.symlink_to(store)
    monkeypatch.chdir(tmp_path)
    assert absolute_data_paths({"weights": "models/ViT-B-32-openai.pt"})["weights"] == str(link)
