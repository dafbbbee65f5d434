"""The VLM variant through the CLI: train, extract and predict with `--backbone clip:tiny`, and a local weights file."""
import json

import numpy as np
import torch

from uninet_feat.backbones import create_backbone
from uninet_feat.cli import main
from uninet_feat.featstore import FeatureStore

from _tiny import write_texture_set


def test_clip_backbone_through_the_cli(tmp_path):
    data = write_texture_set(tmp_path / "d", n_train=4, n_good=2, n_bad=2)
    torch.manual_seed(0)
    weights = tmp_path / "clip_tiny.pt"
    torch.save(create_backbone("clip:tiny", weights="random").visual.state_dict(), weights)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--backbone", "clip:tiny", "--weights", str(weights),
                 "--image-size", "64", "--epochs", "1", "--batch-size", "2", "--out", str(run), "--quiet"]) == 0
    cfg = json.loads(json.dumps(__import__("yaml").safe_load((run / "config.yaml").read_text())))
    assert cfg["backbone"] == "clip:tiny" and cfg["weights"] == str(weights)
    feats = tmp_path / "f"
    assert main(["extract", "--data", str(data), "--run", str(run), "--patches", "--out", str(feats), "--quiet"]) == 0
    store = FeatureStore(feats)
    assert store.vectors.shape[0] == 8 and np.isfinite(store.vectors).all() and np.isfinite(store.scores).all()
    assert main(["predict", "--run", str(run), "--data", str(data), "--out", str(tmp_path / "p"),
                 "--no-overlays"]) == 0
    rows = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert len(rows) == 8 and all(np.isfinite(r["wdm_score"]) for r in rows)
