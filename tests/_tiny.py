"""A tiny three-level CNN backbone for fast model tests (it follows the Backbone protocol by hand)."""
import torch
import torch.nn as nn


class TinyBackbone(nn.Module):
    name = "tiny"
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    finetunable = True

    def __init__(self, channels=(8, 16, 32), strides=(4, 8, 16)):
        super().__init__()
        self.channels, self.strides, self.levels = tuple(channels), tuple(strides), (1, 2, 3)
        layers, cin, s = [], 3, 1
        for c, st in zip(channels, strides):
            f = st // s
            layers.append(nn.Sequential(nn.Conv2d(cin, c, 3, f, 1), nn.BatchNorm2d(c), nn.ReLU()))
            cin, s = c, st
        self.stages = nn.ModuleList(layers)

    def forward(self, x):
        outs = []
        for st in self.stages:
            x = st(x)
            outs.append(x)
        return outs

    def config(self):
        return {"name": self.name, "channels": list(self.channels), "strides": list(self.strides)}


def tiny_factory(name, weights="random", levels=None, channels=(8, 16, 32), strides=(4, 8, 16), **_):
    """Random init, or the state dict in a local file (``weights=PATH``) for tests that need the same
    backbone twice."""
    m = TinyBackbone(channels, strides)
    if weights not in (None, "random", "imagenet"):
        m.load_state_dict(torch.load(weights, weights_only=True))
    return m


def register_tiny():
    from uninet_feat.backbones import register_backbone
    try:
        register_backbone("tiny", tiny_factory)
    except Exception:
        pass  # already registered in this process


def register_tiny_norm():
    """`tiny` that takes --mean/--std and records them in its config, as timm backbones do."""
    from uninet_feat.backbones import register_backbone

    class TinyNorm(TinyBackbone):
        name = "tiny_norm"

        def config(self):
            return {**super().config(), "name": self.name, "mean": list(self.mean), "std": list(self.std)}

    def factory(name, weights="random", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), **_):
        m = TinyNorm()
        if weights not in (None, "random", "imagenet"):
            m.load_state_dict(torch.load(weights, weights_only=True))
        m.mean, m.std = tuple(mean), tuple(std)
        return m
    try:
        register_backbone("tiny_norm", factory)
    except Exception:
        pass   # already registered in this process


def tiny_train_args(data) -> list[str]:
    """`uninet-feat train` arguments for a one-epoch run of the tiny backbone on ``data`` (add --out and flags)."""
    return ["train", "--data", str(data), "--backbone", "tiny", "--weights", "random", "--image-size", "64",
            "--epochs", "1", "--batch-size", "2", "--quiet"]


def write_texture_set(root, n_train=10, n_good=4, n_bad=4, size=64, seed=0, wide=False):
    """A small MVTec-style set: smooth periodic texture; defects are bright squares with masks."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    h, w = (size, size * 3) if wide else (size, size)
    yy, xx = np.mgrid[0:h, 0:w]

    def texture():
        ph = rng.uniform(0, 6.28, 2)
        img = 0.5 + 0.2 * np.sin(xx / 2.0 + ph[0]) * np.sin(yy / 2.0 + ph[1]) + rng.normal(0, 0.02, (h, w))
        return np.clip(img, 0, 1)

    def save(a, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((a * 255).astype("uint8")).save(path)

    for i in range(n_train):
        save(texture(), root / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        save(texture(), root / "test" / "good" / f"{i:03d}.png")
    for i in range(n_bad):
        img, m = texture(), np.zeros((h, w))
        y, x = rng.integers(4, h - 20), rng.integers(4, w - 20)
        img[y:y + 14, x:x + 14] = 1.0
        m[y:y + 14, x:x + 14] = 1.0
        save(img, root / "test" / "spot" / f"{i:03d}.png")
        save(m, root / "ground_truth" / "spot" / f"{i:03d}_mask.png")
    return root


def run_with_plain_index(root, data):
    """A tiny run (its source teacher a fixed weights file, half its normals for validation) and a kNN index over
    plain patches of that same backbone, built with ``index --run`` (validation normals held out).
    Returns (run, knn folder, weights file, plain feature store)."""
    import torch
    from uninet_feat.backbones import create_backbone
    from uninet_feat.cli import main
    from uninet_feat.config import load_config
    from uninet_feat.train import train
    register_tiny()
    weights, run, f, knn = root / "tiny.pt", root / "run", root / "plain", root / "knn"
    torch.save(create_backbone("tiny", weights="random").state_dict(), weights)   # random init differs per call
    train(load_config(None, {"data": str(data)}, base={"backbone": "tiny", "weights": str(weights), "image_size": 64,
                                                       "epochs": 1, "batch_size": 2, "channels_last": False,
                                                       "val_fraction": 0.5}), run, quiet=True)
    assert main(["extract", "--data", str(data), "--backbone", "tiny", "--weights", str(weights), "--image-size",
                 "64", "--patches", "--out", str(f), "--quiet"]) == 0
    assert main(["index", "--features", str(f), "--coreset", "1.0", "--run", str(run), "--out", str(knn)]) == 0
    return run, knn, weights, f


def write_supervised_manifest(data, n_train_defects=4):
    """A CSV manifest (``data/m.csv``) of a `write_texture_set` folder that moves its first ``n_train_defects``
    defects, with their masks, into the training split (the supervised mode's labelled defects)."""
    import csv
    rows = [[str(p.relative_to(data)), "train", "good", ""] for p in sorted((data / "train/good").glob("*.png"))]
    for i, p in enumerate(sorted((data / "test/spot").glob("*.png"))):
        m = data / "ground_truth/spot" / f"{p.stem}_mask.png"
        rows.append([str(p.relative_to(data)), "train" if i < n_train_defects else "test", "spot",
                     str(m.relative_to(data))])
    rows += [[str(p.relative_to(data)), "test", "good", ""] for p in sorted((data / "test/good").glob("*.png"))]
    with open(data / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "split", "label", "mask"]] + rows)
    return data / "m.csv"


def tiny_run(tmp_path_factory):
    """(run folder, texture set): a 1-epoch tiny run on 32-px textures, for the tests of what reads a finished run."""
    from uninet_feat.config import load_config
    from uninet_feat.train import train
    register_tiny()
    tex = write_texture_set(tmp_path_factory.mktemp("tex"), n_train=6, n_good=1, n_bad=1, size=32)
    out = tmp_path_factory.mktemp("run") / "r"
    train(load_config(None, {"data": str(tex), "backbone": "tiny", "weights": "random", "image_size": 32,
                             "epochs": 1, "batch_size": 4, "channels_last": False, "val_fraction": 0.3}),
          out, quiet=True)
    return out, tex


def level3_run(tmp_path_factory, name: str, n_good: int, **cfg):
    """(texture set, run folder): a 1-epoch tiny run on 64-px textures, half its training normals kept for
    validation and its pixel map of level 3 (``cfg`` adds to that), for the tests of the label-free choices."""
    from uninet_feat.config import load_config
    from uninet_feat.train import train
    root = tmp_path_factory.mktemp(name)
    data = write_texture_set(root / "data", n_train=8, n_good=n_good, n_bad=3)
    train(load_config(None, {"data": str(data)}, base={"backbone": "tiny", "image_size": 64, "epochs": 1,
                                                       "batch_size": 2, "channels_last": False, "val_fraction": 0.5,
                                                       "map_levels": [3], **cfg}), root / "run", quiet=True)
    return data, root / "run"


def stand_in_exporter(monkeypatch, source=None) -> list:
    """torch.onnx.export replaced by a writer of ``source``'s bytes (an ONNX file), or of a one-node opset-18 graph:
    for tests of what export-model does around the exporter (its files, model.json, refusals), which need not
    spend torch's ~20 s an export. Returns the list of the paths it wrote."""
    from pathlib import Path
    if source is not None:
        data = Path(source).read_bytes()
    else:
        from onnx import TensorProto, helper
        value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)   # noqa: E731
        graph = helper.make_graph([helper.make_node("Identity", ["image"], ["score"])], "stand_in",
                                  [value("image")], [value("score")])
        data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
    wrote = []

    def export(model, args, f, *a, **k):   # not shutil: some tests stop shutil.copyfile
        Path(f).write_bytes(data)
        wrote.append(Path(f))
    monkeypatch.setattr(torch.onnx, "export", export)
    return wrote
