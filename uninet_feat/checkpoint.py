"""Checkpoints that rebuild the whole model and load with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors and primitives: the format tag, the library version,
the resolved run config (backbone name, levels, model options…), the backbone's own config, the
model state dict and — for resumable training checkpoints — optimiser states, the epoch and the
split (no RNG state: the loader order and denoising edits are re-seeded from ``seed`` each epoch).
Pickled objects are never loaded: a file that needs ``weights_only=False`` is refused.
"""
from __future__ import annotations

import contextlib
import io
import json
import pickle
import zipfile
from pathlib import Path

import torch

from .errors import BadInputError
from .io import atomic_write_bytes

FORMAT = "uninet-feat/checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path, model, cfg: dict, **extra) -> Path:
    """Write ``model`` with the run config ``cfg`` to ``path`` (atomically). The UniNet options saved are the
    model's own (``model.cfg``), whatever ``cfg`` says of them: they rebuild the model, and a ``cfg`` made apart
    from it (a library user's `load_config()`) would otherwise rebuild another one (other α, depths...)."""
    from .model.uninet import DEFAULTS
    own = {k: model.cfg[k] for k in DEFAULTS if k != "student_relu"}   # student_relu: resolved, saved below
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION,
               "library_version": __import__("uninet_feat").__version__,
               # through JSON, keys sorted: a config whose values share string objects (one made in a process, not
               # read from YAML) pickled them as back-references, and its key order was the caller's, so the same run
               # trained again from its config.yaml gave another model.pt's bytes (its indices and heads refused)
               "config": json.loads(json.dumps(_plain({**cfg, **own}), sort_keys=True)),
               "backbone": json.loads(json.dumps(_plain(model.source.config()), sort_keys=True)),
               "student_relu": [bool(r) for r in model.cfg["student_relu"]],
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               **{k: _on_cpu(v) for k, v in extra.items()}}   # optimiser states of a GPU run too: loads anywhere
    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write_bytes(path, buf.getvalue())


def _on_cpu(v):
    """``v`` with every tensor in it (dicts, lists, tuples) on the CPU."""
    if torch.is_tensor(v):
        return v.detach().cpu()
    if isinstance(v, dict):
        return {k: _on_cpu(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_on_cpu(x) for x in v)
    return v


def read_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BadInputError("checkpoint not found", path=path, fix="pass the model.pt of a finished run")
    if not zipfile.is_zipfile(path):   # torch.load says "pickle" of any bytes; what it is not is more useful
        raise BadInputError("not a torch checkpoint: not in torch's zip format (a corrupt or truncated file, "
                            "another kind of file, or one saved by torch < 1.6)", path=path,
                            fix="pass the model.pt of a finished `uninet-feat train` run, or restore the file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise BadInputError("refusing a pickle-based checkpoint (it would run arbitrary code on load)",
                            path=path, fix="re-save it as a state dict of tensors, or retrain") from e
    except Exception as e:  # truncated/corrupt zip, not a torch file at all
        raise BadInputError(f"not a readable checkpoint ({type(e).__name__}: {e})", path=path,
                            fix="the file is corrupt or not a uninet-feat checkpoint; retrain or restore it") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise BadInputError("not a uninet-feat checkpoint (no format tag)", path=path,
                            fix="pass a model.pt written by `uninet-feat train`")
    missing = [k for k in ("config", "backbone", "state_dict") if k not in ckpt]
    if missing:   # a KeyError traceback in build_from_checkpoint before
        raise BadInputError(f"the checkpoint lacks {', '.join(missing)}", path=path,
                            fix="pass a model.pt written by `uninet-feat train` (an edited or another tool's file?)")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise BadInputError(f"checkpoint format {ckpt['format_version']} is newer than this library "
                            f"understands ({FORMAT_VERSION})", path=path, fix="upgrade uninet-feat")
    return ckpt


def checkpoint_config(ckpt: dict) -> dict:
    """The run config with the model options as resolved when the checkpoint was written.

    ``student_relu``: checkpoints from before that option existed always ended the student in a ReLU."""
    return {**ckpt["config"], "student_relu": ckpt.get("student_relu", True)}


def epochs_trained(ckpt: dict):
    """The epochs a run trained: a selected model.pt (`select: synthetic`) keeps its best epoch's number in
    ``epoch`` and the run's length in ``selection``; a last-epoch model.pt has only ``epoch``."""
    return (ckpt.get("selection") or {}).get("epochs_trained", ckpt.get("epoch"))


@contextlib.contextmanager
def float32_default():
    """Build modules in float32 whatever the host program's ``torch.set_default_dtype``: a float64 default gave
    float64 weights that every float32 image then crashed on (and the caller's default is restored after)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def build_from_checkpoint(path, weights: str = "random"):
    """Rebuild a UniNet exactly as trained (backbone weights come from the checkpoint itself), in eval mode: in
    training mode a plain ``model(x)`` would score on batch statistics and overwrite the trained running ones."""
    from .backbones import create_backbone
    from .config import model_options
    from .model import UniNet

    ckpt = read_checkpoint(path)
    cfg = ckpt["config"]
    bb_cfg = dict(ckpt["backbone"])
    with float32_default():
        backbone = create_backbone(**{**bb_cfg, "weights": weights})
        if hasattr(backbone, "weights_source"):   # its weights are the run's (loaded below), not `weights`: a clip:
            backbone.weights_source = str(cfg.get("weights") or weights)   # TextScorer builds the text tower from it
        model = UniNet(backbone, **model_options(checkpoint_config(ckpt)))
    state = ckpt["state_dict"]
    if cfg.get("mem") == "multiscale" and any(".fused." in k for k in state):
        model.eval().reparameterize()
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches: weights of another backbone or another size
        first = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)
        raise BadInputError(f"checkpoint does not match its model ({first})", path=path,
                            fix="the weights belong to another backbone/levels than its config says; retrain") from e
    if missing or unexpected:
        raise BadInputError(f"checkpoint does not match its model: {len(missing)} missing keys "
                            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})",
                            path=path, fix="it was written by another version or edited; retrain")
    bad = nonfinite_keys(state)
    if bad:   # every score would be NaN, and NaN is never above a threshold: every image would pass as good
        raise BadInputError(f"checkpoint holds NaN or infinite weights in {len(bad)} tensor(s) (e.g. {bad[:3]})",
                            path=path, fix="the file is damaged, or training diverged before it was written; restore "
                                           "it or retrain (e.g. with a lower --lr)")
    return model.eval(), ckpt


def nonfinite_keys(state: dict) -> list[str]:
    """The keys of ``state``'s floating tensors that hold NaN or Inf (a state dict: a checkpoint's, or a training
    model's before it is saved); one host-device sync when all are finite (tensors on one device)."""
    floats = {k: v for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}
    if not floats or bool(torch.stack([v.isfinite().all() for v in floats.values()]).all()):
        return []
    return [k for k, v in floats.items() if not v.isfinite().all()]


def _plain(v):
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)
