"""The library leaves a caller's objects and process as documented: UniNet's modes from its construction on,
`train()`'s process-wide settings restored, a backbone's mean/std given together or not at all."""
import os
import random

import numpy as np
import pytest
import torch

import uninet_feat  # noqa: F401  (before open_clip/timm)
from uninet_feat.backbones import create_backbone
from uninet_feat.config import load_config
from uninet_feat.errors import BadInputError
from uninet_feat.model import UniNet
from uninet_feat.train import train

from _tiny import TinyBackbone, register_tiny, write_texture_set


# ------------------------------------------------------------------ UniNet's modes
def test_frozen_target_keeps_bn_statistics_from_the_first_step():
    """The documented loop `model.loss(model(x))` straight after `UniNet(bb)`: a frozen target's BN is kept."""
    bb = TinyBackbone()
    bb.finetunable = False
    model = UniNet(bb)
    assert not model.source.training and not model.target.training
    before = model.running_stats()
    model.loss(model(torch.randn(2, 3, 64, 64)))["loss"].backward()
    after = model.running_stats()
    for k in before:
        if k.startswith(("source.", "target.")):
            assert torch.equal(before[k], after[k]), k


@pytest.mark.parametrize("backbone_mode", [True, False])
def test_uninet_starts_in_the_modes_train_gives(backbone_mode):
    """`UniNet(bb.eval())` trains its target in train mode, as after `model.train()`: the backbone's mode is not kept."""
    model = UniNet(TinyBackbone().train(backbone_mode))
    modes = {n: m.training for n, m in model.named_modules()}
    model.train()
    assert modes == {n: m.training for n, m in model.named_modules()}
    assert model.target.training and not model.source.training


# ------------------------------------------------------------------ train() restores process-wide state
def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


@pytest.mark.filterwarnings("ignore:the default threshold")
def test_library_train_restores_process_state(tmp_path, monkeypatch):
    register_tiny()
    data = write_texture_set(tmp_path / "tex", n_train=8, n_good=2, n_bad=2)
    cfg = load_config(None, {"data": str(data), "backbone": "tiny", "weights": "random", "image_size": 32,
                             "threads": 2, "epochs": 1, "batch_size": 3, "channels_last": False, "val_fraction": 0.25})
    det, warn_only, threads = (torch.are_deterministic_algorithms_enabled(),
                               torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_num_threads())
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(1)
        for seed in (random.seed, np.random.seed, torch.manual_seed):
            seed(123)
        want = _draws()
        for seed in (random.seed, np.random.seed, torch.manual_seed):
            seed(123)
        train(cfg, tmp_path / "run", quiet=True)
        assert (tmp_path / "run" / "model.pt").is_file()
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.get_num_threads() == 1
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        assert _draws() == want   # the caller's RNG streams continue as if train() had not run
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.set_num_threads(threads)


# ------------------------------------------------------------------ backbone mean/std
BACKBONES = ["resnet18", "clip:tiny"]


def _backbone(name, **kw):
    if name.startswith("clip:"):
        pytest.importorskip("open_clip")
    return create_backbone(name, weights="random", **kw)


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("given", ["mean", "std"])
def test_backbone_refuses_mean_or_std_alone(name, given):
    """One alone would pair with the other's default, which belongs to another normalisation."""
    with pytest.raises(BadInputError, match=f"{given} is given without") as e:
        _backbone(name, **{given: (0.5, 0.5, 0.5)})
    assert e.value.fix and "both" in e.value.fix


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("kind", [np.array, tuple, list])
def test_backbone_takes_mean_std_as_arrays_or_sequences(name, kind):
    bb = _backbone(name, mean=kind([0.4, 0.5, 0.6]), std=kind([0.25, 0.5, 0.75]))
    assert bb.mean == (0.4, 0.5, 0.6) and bb.std == (0.25, 0.5, 0.75)
    if name.startswith("clip:"):
        assert bb.normalisation_source == "given"
