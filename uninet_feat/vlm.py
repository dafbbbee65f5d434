"""Zero-shot text scoring with a CLIP model (the VLM variant), WinCLIP-style prompt ensembles.

``TextScorer(model, normal_prompts, defect_prompts)`` embeds two prompt sets once with the CLIP text tower
(each prompt L2-normalised, averaged per set, re-normalised) and then scores images without any training
image:

* ``image_scores(x) -> (N,)``: P(defect) = softmax(logit_scale · [cos(img, normal), cos(img, defect)])[1],
  the image embedding being ``encode_image(normalize=True)`` and ``logit_scale`` the model's learnt
  temperature (exp, clamped at 100 as in CLIP).
* ``patch_scores(x) -> (N, h, w)`` on the patch grid (or ``(N, H, W)`` with ``out_size``): the same softmax
  for every patch, whose embedding is the final patch token through the tower's ``ln_post`` and visual
  projection (``patch_mode='tokens'``, the default), or, with ``patch_mode='value'``, the token from a last
  block whose attention map is replaced by the identity (MaskCLIP-style; CLIP's final-layer patch tokens
  are only loosely aligned with text, so this often localises better — not validated here on real weights).
  This is not WinCLIP's sliding-window CLS scoring (which re-runs the tower per window).
* ``features(x) -> (N, 4)``: image score, patch-score max / mean / 0.99-quantile — extra columns for a
  LightGBM head (names in ``feature_names``).

``x`` is a batch normalised with the backbone's ``mean``/``std`` (as every backbone input), each side a
multiple of the patch size; CLIP is most reliable at its native resolution (224 px for ViT-B/L).

Prompts: plain lists of sentences, or phrases containing ``{}`` (the object, e.g. "scratched {}") that are
expanded with every template; ``load_prompts(path)`` reads the same from a YAML file (``dump_prompts`` writes
the defaults as a starting point).
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import BadInputError

log = logging.getLogger(__name__)

OBJECT = "fabric"
TEMPLATES = (
    "a photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of the {}.",
    "a photo of the {} for visual inspection.",
    "a macro photo of a {}.",
    "a photo of {} on a production line.",
    "a textile surface: {}.",
)
NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "clean {}",
    "evenly woven {}",
    "{} without defect",
    "{} without damage",
    "{} without flaw",
)
DEFECT_STATES = (
    "damaged {}",
    "defective {}",
    "{} with a defect",
    "{} with a hole",
    "{} with a stain",
    "{} with a broken thread",
    "{} with a knot",
    "{} with a missing yarn",
    "torn {}",
    "{} with an irregular weave",
)
FEATURE_NAMES = ("clip_image_score", "clip_patch_max", "clip_patch_mean", "clip_patch_q99")


def check_templates(templates) -> tuple[str, ...]:
    """``templates`` as a tuple, each with exactly one ``{}``; a single string is one template (as in a prompt
    file), not a sequence of one-letter templates."""
    templates = (templates,) if isinstance(templates, str) else tuple(templates)
    if not templates:
        raise BadInputError("templates is empty", fix="give at least one, e.g. templates=['a photo of {}.']")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise BadInputError(f"template {t!r} needs exactly one '{{}}' placeholder (where the phrase goes)",
                                fix="e.g. templates=['a photo of {}.'] (one template may be given as a string)")
    return templates


def expand_prompts(items, templates=TEMPLATES, obj: str = OBJECT) -> list[str]:
    """Phrases with ``{}`` → one sentence per template (``{}`` filled with ``obj``); other items as they are."""
    templates = check_templates(templates)
    if isinstance(items, str):
        items = [items]
    out = []
    for it in items:
        if not isinstance(it, str) or not it.strip():
            raise BadInputError(f"prompts must be non-empty strings, got {it!r}")
        try:
            if "{}" in it:
                out += [t.format(it.format(obj)) for t in templates]
            else:
                out.append(it)
        except (IndexError, KeyError, ValueError) as e:   # str.format: "{} {}", "{obj}", "{0} {}"
            raise BadInputError(f"prompt {it!r} or a template cannot be filled ({type(e).__name__}: {e})",
                                fix="give each prompt and template exactly one '{}' and no other braces") from e
    if not out:
        raise BadInputError("a prompt set is empty", fix="give at least one prompt per set")
    return list(dict.fromkeys(out))  # de-duplicated, order kept


def default_prompts(obj: str = OBJECT, templates=TEMPLATES) -> dict[str, list[str]]:
    return {"normal": expand_prompts(NORMAL_STATES, templates, obj),
            "defect": expand_prompts(DEFECT_STATES, templates, obj)}


def load_prompts(path) -> dict[str, list[str]]:
    """YAML ``{object: fabric, templates: [...], normal: [...], defect: [...]}`` → sentences per set.

    ``object`` and ``templates`` are optional (defaults: "fabric" and `TEMPLATES`); a missing ``normal`` or
    ``defect`` list keeps the default states."""
    import yaml
    from .io import user_yaml
    p = Path(path).expanduser()
    try:
        d = user_yaml(p.read_text(encoding="utf-8"), p) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise BadInputError(f"cannot read prompts ({type(e).__name__}: {e})", path=p,
                            fix="pass a UTF-8 YAML file with normal/defect lists (`uninet-feat prompts --out FILE` "
                                "writes one)") from e
    return prompts_from_mapping(d, path=p)


def prompts_from_mapping(d, path=None) -> dict[str, list[str]]:
    """`load_prompts` of a mapping already read (``path``: the file it came from, for the messages). Shared so that
    zero-shot's ``--config`` ``prompts:`` mapping is checked and expanded as a prompt file is (its ``object``,
    ``templates`` and unknown keys were ignored); sentences without ``{}`` (the expanded ones a zero-shot
    config.yaml records) pass unchanged, so a recorded config re-runs with the same prompts."""
    p = path
    keys = {"object", "templates", "normal", "defect"}
    if not isinstance(d, dict) or set(d) - keys:
        extra = f" (unknown: {sorted(map(str, set(d) - keys))})" if isinstance(d, dict) else ""
        raise BadInputError(f"prompts are a mapping with keys object, templates, normal, defect{extra}",
                            path=p, fix="use only those keys, e.g. normal: [...], defect: [...]")
    for k in ("templates", "normal", "defect"):   # a number or a mapping was a TypeError, or its keys read as prompts
        v = d.get(k)
        if v is not None and not (isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))):
            raise BadInputError(f"{k!r} must be a sentence or a list of sentences, got {v!r}", path=p,
                                fix=f"e.g. {k}: ['...', '...']")
    if "templates" in d and not d["templates"]:   # an empty list read as the defaults hid a mistake
        raise BadInputError("the 'templates' list is empty", path=p, fix="give at least one, or remove the key")
    obj = d.get("object", OBJECT)
    if not isinstance(obj, str) or not obj.strip():
        raise BadInputError(f"'object' must be a non-empty word or phrase, got {obj!r}", path=p,
                            fix="e.g. object: woven fabric")
    templates = d.get("templates") or TEMPLATES
    templates = (templates,) if isinstance(templates, str) else tuple(templates)   # one template as a string
    if any(not isinstance(t, str) or t.count("{}") != 1 for t in templates):
        raise BadInputError("every template needs exactly one '{}' placeholder", path=p,
                            fix="e.g. templates: ['a photo of {}.']")
    for k in ("normal", "defect"):
        if k in d and not d[k]:   # an empty list read as "the defaults" hid a mistake
            raise BadInputError(f"the {k!r} prompt list is empty", path=p,
                                fix=f"give at least one {k} prompt, or remove the key for the defaults")
    try:
        return {"normal": expand_prompts(d.get("normal") or NORMAL_STATES, templates, obj),
                "defect": expand_prompts(d.get("defect") or DEFECT_STATES, templates, obj)}
    except BadInputError as e:   # named with the file it came from
        raise BadInputError(e.reason, path=p, fix=e.fix) from e


def dump_prompts(path, obj: str = OBJECT) -> Path:
    """Write the default prompt file (to edit). An existing file is refused unless it holds just that: it may be
    an edited one (it was overwritten silently); ``obj`` is checked as `load_prompts` checks ``object`` (an
    empty one was written, and refused only when the file was used)."""
    import yaml
    from .io import atomic_write_text
    p = Path(path).expanduser()
    if p.is_dir() or str(path).endswith(("/", os.sep)):   # `--out new/`: Path drops the slash, a file "new" was written
        raise BadInputError("--out names a folder; prompts are written to a YAML file", path=path,
                            fix=f"e.g. --out {p / 'prompts.yaml'}")
    d = {"object": obj, "templates": list(TEMPLATES), "normal": list(NORMAL_STATES), "defect": list(DEFECT_STATES)}
    if not isinstance(obj, str) or not obj.strip():
        raise BadInputError(f"the object must be a non-empty word or phrase, got {obj!r}",
                            fix="e.g. --object 'woven fabric' (obj= in Python)")
    text = yaml.safe_dump(d, sort_keys=False)
    if p.exists() and not (p.is_file() and p.read_bytes() == text.encode("utf-8")):
        raise BadInputError("this file exists (perhaps edited prompts) and is not overwritten", path=p,
                            fix="give another --out, or delete the file first to write the defaults again")
    return atomic_write_text(p, text)


@contextlib.contextmanager
def seeded():
    """Build under seed 0, the caller's RNG untouched, as `Extractor` builds the image tower: a random text tower
    (``--weights random``) gave other text columns and zero-shot scores in every process, ``--shard`` part and
    resume."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def _resolve(model, text_model, tokenizer, clip_name):
    """(visual tower, open_clip model with a text tower, tokenizer)."""
    from .backbones.clip import _RANDOM, ClipViT, _is_file_spec, build_clip_model
    if hasattr(model, "source") and isinstance(getattr(model, "source"), ClipViT):
        model = model.source  # a UniNet: its frozen source teacher is the unadapted CLIP tower
    if isinstance(model, ClipViT):
        visual = model.visual
        clip_name = clip_name or (model.clip_name if model._model_cfg is None else None)  # open_clip built-in
        if text_model is None:
            src = model.weights_source   # a run's model: the weights file it was trained from (its config's)
            if src not in _RANDOM and _is_file_spec(src) and not Path(src).expanduser().is_file():
                raise BadInputError(f"{model.name}: the CLIP weights file its text tower comes from is not here",
                                    path=src, fix="restore the file at that path, or pass text_model=<the open_clip "
                                                  "model of those weights, both towers>")
            if src in _RANDOM:
                log.warning("TextScorer: %s has random weights, so its text tower is random too; scores are "
                            "meaningless (load open_clip weights for zero-shot use)", model.name)
            try:
                with seeded():
                    text_model = build_clip_model(model.clip_name, model.weights_source, model._model_cfg,
                                                  model.quick_gelu)
            except (TypeError, RuntimeError, ImportError) as e:   # CoCa's multimodal config, NLLB's transformers
                raise BadInputError(f"{model.name}: its text tower cannot be built here ({type(e).__name__}: {e})",
                                    fix="use an open_clip model with its own text tower (e.g. clip:ViT-B-32, "
                                        "clip:ViT-B-16, clip:ViT-L-14)") from e
    elif hasattr(model, "visual") and hasattr(model, "encode_text"):
        visual, text_model = model.visual, text_model or model
        if not hasattr(visual, "patch_size"):   # ModifiedResNet (RN50, ...), a timm tower: no patch tokens to score
            raise BadInputError(f"TextScorer: the open_clip model's image tower is a {type(visual).__name__}; ResNet "
                                "(and timm) CLIP image towers are not supported, only ViT ones",
                                fix="use a ViT CLIP model, e.g. open_clip.create_model('ViT-B-16', pretrained=...)")
    else:
        raise BadInputError(f"TextScorer needs a clip: backbone, a UniNet built on one, or an open_clip model; "
                            f"got {type(model).__name__}")
    if tokenizer is None:
        model_cfg = model._model_cfg if isinstance(model, ClipViT) and not clip_name else None   # a name given wins
        tokenizer = _tokenizer(text_model, model_cfg, clip_name)
    return visual, text_model, tokenizer


def _tokenizer(text_model, model_cfg: dict | None, clip_name: str | None):
    """The tokenizer of the model config (``model_cfg``, else ``clip_name``'s): its ``hf_tokenizer_name`` (MetaCLIP-2
    worldwide, CLIPA) or CLIP's SimpleTokenizer. CLIP's on another vocabulary gave token ids the model never
    learnt (an ``eos`` pool never found its end token: every score exactly 0.5, silently)."""
    import open_clip
    from .backbones.clip import _CONFIGS
    if model_cfg is None and clip_name in _CONFIGS:   # register_clip_config's: open_clip does not know it
        model_cfg = _CONFIGS[clip_name]
    if model_cfg is None and clip_name and (":" in clip_name or "/" in clip_name):   # hf-hub:, local-dir:
        return _hf_guard(lambda: open_clip.get_tokenizer(clip_name), clip_name)
    if model_cfg is None and clip_name:
        model_cfg = open_clip.get_model_config(clip_name)
    ctx = getattr(text_model, "context_length", 77)
    if model_cfg is None:   # an open_clip model alone: nothing says its tokenizer; CLIP's only fits CLIP's vocabulary
        vocab = getattr(text_model, "vocab_size", None)
        if vocab is not None and vocab != 49408:
            raise BadInputError(f"TextScorer: the open_clip model's text vocabulary has {vocab} tokens, not CLIP's "
                                "49408, so CLIP's tokenizer does not fit it and nothing names its own",
                                fix="pass tokenizer=open_clip.get_tokenizer('<its model name>') (or clip_name=)")
        return open_clip.tokenizer.SimpleTokenizer(context_length=ctx)
    text_cfg = model_cfg.get("text_cfg") or {}
    ctx = text_cfg.get("context_length") or ctx
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    name = text_cfg.get("hf_tokenizer_name")
    if not name:
        return open_clip.tokenizer.SimpleTokenizer(context_length=ctx, **kwargs)
    if text_cfg.get("tokenizer_mode"):   # only where set: older open_clip's HFTokenizer has no such argument
        kwargs["tokenizer_mode"] = text_cfg["tokenizer_mode"]
    return _hf_guard(lambda: open_clip.tokenizer.HFTokenizer(name, context_length=ctx, **kwargs), name)


def _hf_guard(make, name: str):
    """``make()``; a missing ``transformers`` or tokenizer download (a raw ModuleNotFoundError / OSError) said
    neither what was needed nor how to get it."""
    try:
        return make()
    except ImportError as e:
        raise BadInputError(f"the model's text tower uses the Hugging Face tokenizer {name!r}, which needs the "
                            f"transformers package ({type(e).__name__}: {e})",
                            fix="pip install transformers (and have the tokenizer in the Hugging Face cache), or "
                                "pass tokenizer=") from e
    except (OSError, ValueError) as e:   # offline, not in the cache (huggingface_hub's errors are OSErrors)
        raise BadInputError(f"cannot load the Hugging Face tokenizer {name!r} of the model's text tower "
                            f"({type(e).__name__}: {e})",
                            fix="download it once with internet access (it is then read from the Hugging Face "
                                "cache, HF_HOME), or pass tokenizer=") from e


class TextScorer(nn.Module):
    """Zero-shot defect scores from text prompts; see the module doc. ``text_embeddings`` (2, D): normal, defect."""

    def __init__(self, model, normal_prompts=None, defect_prompts=None, *, prompt_file=None, obj: str = OBJECT,
                 templates=TEMPLATES, patch_mode: str = "tokens", text_model=None, tokenizer=None,
                 clip_name: str | None = None):
        super().__init__()
        if patch_mode not in ("tokens", "value"):
            raise BadInputError(f"patch_mode must be 'tokens' or 'value', got {patch_mode!r}")
        templates = check_templates(templates)
        base = load_prompts(prompt_file) if prompt_file is not None else default_prompts(obj, templates)
        normal_prompts, defect_prompts = (p if p is None or isinstance(p, str) else list(p)
                                          for p in (normal_prompts, defect_prompts))
        for key, given in (("normal", normal_prompts), ("defect", defect_prompts)):
            if given is not None and not given:   # as `load_prompts`: an empty list read as the defaults hid a mistake
                raise BadInputError(f"{key}_prompts is empty",
                                    fix=f"give at least one {key} prompt, or leave {key}_prompts=None for the defaults")
        self.normal_prompts, self.defect_prompts = (base[k] if p is None else expand_prompts(p, templates, obj)
                                                    for k, p in (("normal", normal_prompts), ("defect", defect_prompts)))
        self.visual, text_model, self.tokenizer = _resolve(model, text_model, tokenizer, clip_name)
        self.patch_mode = patch_mode
        self.patch_size = int(self.visual.patch_size[0])
        self.feature_names = FEATURE_NAMES
        self.logit_scale = float(text_model.logit_scale.detach().exp().clamp(max=100).reshape(-1)[0])
        self.register_buffer("text_embeddings", torch.stack(
            [self._embed_set(text_model, self.normal_prompts), self._embed_set(text_model, self.defect_prompts)]))
        proj = getattr(self.visual, "proj", None)   # the image tower's embedding width, where it projects
        if proj is not None and self.text_embeddings.shape[-1] != proj.shape[-1]:   # a raw RuntimeError at scoring
            raise BadInputError(f"the text model embeds in {self.text_embeddings.shape[-1]} dimensions, the image "
                                f"tower in {proj.shape[-1]}: their similarities cannot be taken",
                                fix="pass the text tower of the same CLIP checkpoint as the image tower (text_model=)")

    @torch.no_grad()
    def _check_lengths(self, prompts: list[str]) -> None:
        """Refuse prompts longer than the text tower's context: the tokenizer cuts them, silently, and prompts that
        differ only past the cut embed alike (every score exactly 0.5; an audit, session 52). CLIP's own tokenizer
        is counted; a Hugging Face one truncates the same way but is not counted here."""
        import open_clip
        tok = self.tokenizer
        if not isinstance(tok, open_clip.tokenizer.SimpleTokenizer):
            return
        ctx = int(getattr(tok, "context_length", 77))
        long = [(p, len(tok.encode(p)) + 2) for p in prompts]   # + the start and end tokens
        long = [(p, n) for p, n in long if n > ctx]
        if long:
            p, n = long[0]
            raise BadInputError(f"{len(long)} prompt(s) are longer than the text tower's {ctx}-token context and "
                                f"would be cut, silently (e.g. {n} tokens: {p[:80]!r}{'...' if len(p) > 80 else ''})",
                                fix="shorten the prompts or their templates: what lies past the cut is never read, so "
                                    "normal and defect prompts that differ only there score alike")

    def _embed_set(self, text_model, prompts: list[str]) -> torch.Tensor:
        self._check_lengths(prompts)
        was = text_model.training
        text_model.eval()
        try:
            dev = next(text_model.parameters()).device
            embs = [text_model.encode_text(self.tokenizer(prompts[i:i + 64]).to(dev), normalize=True).float()
                    for i in range(0, len(prompts), 64)]
        finally:
            text_model.train(was)
        return F.normalize(F.normalize(torch.cat(embs), dim=-1).mean(0), dim=-1).cpu()

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise BadInputError(f"TextScorer needs (N, 3, H, W) with H, W multiples of the patch size "
                                f"{self.patch_size}; got {tuple(x.shape)}")

    def _probs(self, e: torch.Tensor) -> torch.Tensor:
        """P(defect) from L2-normalised embeddings (..., D)."""
        # in fp32 whatever the module's dtype: `.half()` made the text buffer fp16 beside an fp32 image embedding
        logits = self.logit_scale * e.float() @ self.text_embeddings.to(e.device, torch.float32).t()
        return logits.softmax(-1)[..., 1]

    @torch.no_grad()
    def image_scores(self, x: torch.Tensor) -> torch.Tensor:
        from .backbones.clip import pool_vit, project, run_vit
        self._check(x)
        _, t, _ = run_vit(self.visual, x)
        pooled, _ = pool_vit(self.visual, t)
        return self._probs(F.normalize(project(self.visual, pooled), dim=-1))

    @torch.no_grad()
    def _both(self, x: torch.Tensor):
        from .backbones.clip import run_vit, run_vit_two_ends
        self._check(x)
        if self.patch_mode == "value":   # blocks 0..L-2 once, the last block both ways
            t, tv, grid = run_vit_two_ends(self.visual, x)
        else:
            _, t, grid = run_vit(self.visual, x)
            tv = None
        return self._scores(t, tv, grid)

    def _scores(self, t: torch.Tensor, tv, grid):
        """(image P(defect) (N,), patch P(defect) (N, gh, gw)) from final tokens ``t`` (and the
        identity-attention ones ``tv`` in patch mode 'value')."""
        from .backbones.clip import pool_vit, project
        pooled, tok = pool_vit(self.visual, t)
        img = self._probs(F.normalize(project(self.visual, pooled), dim=-1))
        if tv is not None:
            _, tok = pool_vit(self.visual, tv)
        patch = self._probs(F.normalize(project(self.visual, tok), dim=-1)).reshape(t.shape[0], *grid)
        return img, patch

    @torch.no_grad()
    def patch_scores(self, x: torch.Tensor, out_size=None) -> torch.Tensor:
        """(N, H/p, W/p) per-patch P(defect); with ``out_size`` bilinearly resized to (N, *out_size)."""
        from .backbones.clip import pool_vit, project, run_vit
        self._check(x)
        _, t, (gh, gw) = run_vit(self.visual, x, value_last=self.patch_mode == "value")
        _, tok = pool_vit(self.visual, t)
        s = self._probs(F.normalize(project(self.visual, tok), dim=-1)).reshape(x.shape[0], gh, gw)
        if out_size is not None:
            size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
            s = F.interpolate(s[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return s

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 4) float32: image score, patch max, patch mean, patch 0.99-quantile (``feature_names``)."""
        return self._stats(*self._both(x))

    @torch.no_grad()
    def features_from_tower(self, out: dict) -> torch.Tensor:
        """`features` from a pass the backbone already ran (``ClipViT.keep_tower_output``): its
        final tokens, and in patch mode 'value' the last block again with identity attention."""
        from .backbones.clip import last_block
        tv = last_block(self.visual, out["pre_last"], value_last=True) if self.patch_mode == "value" else None
        return self._stats(*self._scores(out["final"], tv, out["grid"]))

    @staticmethod
    def _stats(img: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        flat = patch.flatten(1)
        return torch.stack([img, flat.amax(1), flat.mean(1), torch.quantile(flat, 0.99, dim=1)], 1).float()
