"""The stable split of split-less layouts: the same however --data is spelled; older runs keep theirs."""
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from uninet_feat.config import load_config
from uninet_feat.errors import BadInputError
from uninet_feat.runs import load_samples, train_val_samples

from _tiny import register_tiny

register_tiny()


@pytest.fixture
def lf(tmp_path):
    """tmp/audit/lf with 30 good and 3 hole images (plain label folders: no split of their own)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "audit" / "lf"
    for label, n in (("good", 30), ("hole", 3)):
        (root / label).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / label / f"{i:03d}.png")
    return root


def _split(samples, root):
    return {s.path.relative_to(Path(root)).as_posix(): s.split for s in samples}


def _val(cfg, root):
    return sorted(s.path.relative_to(Path(root)).as_posix() for s in train_val_samples(load_samples(cfg), cfg)[1])


def test_split_and_validation_do_not_depend_on_how_data_is_spelled(lf, tmp_path, monkeypatch):
    link = tmp_path / "elsewhere_link"
    link.symlink_to(lf)
    spellings = ["lf", "./lf/", str(lf), "../audit/lf", str(link)]
    monkeypatch.chdir(lf.parent)
    splits, vals = [], []
    for typed in spellings:
        cfg = load_config(None, {"data": typed, "val_fraction": 0.2})
        splits.append(_split(load_samples(cfg), typed))
        vals.append(_val(cfg, typed))
    assert all(s == splits[0] for s in splits[1:]) and all(v == vals[0] for v in vals[1:])
    assert set(splits[0].values()) == {"train", "test"} and len(splits[0]) == 33 and len(vals[0]) >= 3
    assert not set(vals[0]) & {k for k, v in splits[0].items() if v == "test"}


def test_a_config_without_split_hash_keeps_the_legacy_split(lf, monkeypatch):
    """A run trained before `split_hash` existed hashed the path as typed; its config lacks the key."""
    monkeypatch.chdir(lf.parent)
    legacy = {k: v for k, v in load_config(None, {"data": "lf"}).items() if k != "split_hash"}
    got = {str(s.path): s.split for s in load_samples(legacy)}
    want = {p: ("test" if "hole" in p or int(hashlib.sha1(p.encode()).hexdigest()[:8], 16) % 5 == 0 else "train")
            for p in got}
    assert got == want
    new = _split(load_samples(load_config(None, {"data": "lf"})), "lf")
    assert new != {os.path.relpath(p, "lf"): v for p, v in got.items()}
    with pytest.raises(BadInputError, match="split_hash"):
        load_samples({**legacy, "split_hash": "random"})


def test_train_saves_absolute_data_and_evaluate_runs_elsewhere(lf, tmp_path, monkeypatch):
    from uninet_feat.evaluate import evaluate
    from uninet_feat.train import train
    monkeypatch.chdir(lf.parent)
    cfg = load_config(None, {"data": "lf", "backbone": "tiny", "weights": "random", "image_size": 32, "epochs": 1,
                             "batch_size": 8, "channels_last": False, "val_fraction": 0.2})
    train(cfg, "run", quiet=True)
    saved = yaml.safe_load((lf.parent / "run" / "config.yaml").read_text())
    assert saved["data"] == str(lf.resolve()) and saved["split_hash"] == "relative"
    expected_test = {k for k, v in _split(load_samples(cfg), "lf").items() if v == "test"}
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    for data in (None, "../audit/lf"):          # the saved path, and the same folder spelled another way
        rep = evaluate(lf.parent / "run", data=data, quiet=True)
        got = {os.path.relpath(os.path.abspath(r["path"]), lf) for r in rep["_rows"]}
        assert got == expected_test
