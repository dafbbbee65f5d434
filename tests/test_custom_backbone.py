"""The public plug-in API: a user's own backbone, registered by name, trained and scored end to end."""
import math

import pytest
import torch
import torch.nn as nn

import uninet_feat  # noqa: F401  (before timm)
from uninet_feat.backbones import Backbone, create_backbone, register_backbone
from uninet_feat.errors import BadInputError
from uninet_feat.model import UniNet


# ---- what a user writes: a Backbone subclass and a factory (the docs/backbones.md example) --------------------
class MyCNN(Backbone):
    def __init__(self, name="mycnn", width=8, levels=(1, 2, 3)):
        super().__init__()
        self.name, self.width, self.levels = name, width, tuple(levels)
        self.channels, self.strides = (width, 2 * width, 4 * width), (4, 8, 16)
        self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

        def down(cin, cout):  # one stride-2 stage
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.ReLU())
        self.stem = nn.Sequential(down(3, width), down(width, width))               # stride 4
        self.stage2, self.stage3 = down(width, 2 * width), down(2 * width, 4 * width)  # strides 8, 16

    def forward(self, x):
        f1 = self.stem(x)
        f2 = self.stage2(f1)
        return [f1, f2, self.stage3(f2)]

    def config(self):
        return {"name": self.name, "width": self.width}


def mycnn_factory(name, weights="random", levels=None, width=8, **_):
    model = MyCNN(name, width)
    if weights not in (None, "random"):
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model


# ---- a timm model wrapped by hand, as a 'prefix:' family ------------------------------------------------------
class HandTimm(nn.Module):
    finetunable = True

    def __init__(self, name, levels=(1, 2, 3)):
        super().__init__()
        import timm
        self.name, self.levels = name, tuple(levels)
        self.body = timm.create_model(name.split(":", 1)[1], features_only=True, out_indices=self.levels,
                                      pretrained=False)
        self.channels = tuple(self.body.feature_info.channels())
        self.strides = tuple(self.body.feature_info.reduction())
        self.mean, self.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def forward(self, x):
        return self.body(x)

    def config(self):
        return {"name": self.name, "levels": list(self.levels)}


def handtimm_factory(name, weights="random", levels=None, **_):
    return HandTimm(name, levels or (1, 2, 3))


register_backbone("mycnn", mycnn_factory)
register_backbone("mytimm:", handtimm_factory)


def _fabric(n, defect=False, size=64, seed=0):
    """Woven-looking stripes; a defect is a bright square. Returns normalised (N, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = []
    for _ in range(n):
        ph = torch.rand(2, generator=g) * 2 * math.pi
        img = 0.5 + 0.2 * torch.sin(xx / 1.5 + ph[0]) * torch.sin(yy / 1.5 + ph[1])
        img = img + 0.02 * torch.randn(size, size, generator=g)
        if defect:
            y, x = torch.randint(8, size - 24, (2,), generator=g).tolist()
            img[y:y + 14, x:x + 14] = 1.0
        out.append(img.clamp(0, 1).expand(3, -1, -1))
    return (torch.stack(out) - 0.5) / 0.25


def _train(model, x, steps):
    g = model.trainable_groups()
    opts = [torch.optim.AdamW(g["student"], lr=5e-3), torch.optim.AdamW(g["target"], lr=1e-5)]
    model.train()
    losses = []
    for _ in range(steps):
        loss = model.loss(model(x))["loss"]
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
        losses.append(float(loss.detach()))
    return losses


def test_own_backbone_end_to_end(tmp_path):
    from uninet_feat.checkpoint import build_from_checkpoint, save_checkpoint
    from uninet_feat.config import DEFAULT_CONFIG
    torch.manual_seed(0)
    bb = create_backbone("mycnn", width=8)
    assert isinstance(bb, MyCNN) and bb.channels == (8, 16, 32)
    model = UniNet(bb, decoder_depths=(1, 1, 1))
    losses = _train(model, _fabric(8, seed=1), steps=25)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    model.eval()
    good, bad = _fabric(4, seed=2), _fabric(4, defect=True, seed=3)
    maps, scores = model.predict(torch.cat([good, bad]))
    assert maps.shape == (8, 64, 64) and scores.shape == (8,) and torch.isfinite(maps).all()
    # config() is what a checkpoint records: the model comes back with the user's backbone
    save_checkpoint(tmp_path / "model.pt", model, {**DEFAULT_CONFIG, "backbone": "mycnn", "decoder_depths": [1, 1, 1]})
    again, ckpt = build_from_checkpoint(tmp_path / "model.pt")
    assert ckpt["backbone"] == {"name": "mycnn", "width": 8}
    torch.testing.assert_close(again.eval().predict(good)[1], scores[:4])
    # weights from a local file through the factory
    torch.save(bb.state_dict(), tmp_path / "mycnn.pth")
    loaded = create_backbone("mycnn", weights=str(tmp_path / "mycnn.pth")).eval()
    torch.testing.assert_close(loaded(good)[2], bb.eval()(good)[2])


def test_hand_wrapped_timm_model_as_prefix_family():
    torch.manual_seed(0)
    bb = create_backbone("mytimm:resnet18")
    assert bb.strides == (4, 8, 16) and bb.channels == (64, 128, 256)
    model = UniNet(bb, decoder_depths=(1, 1, 1))
    x = _fabric(2, seed=4)
    losses = _train(model, x, steps=2)
    assert all(math.isfinite(v) for v in losses)
    maps, scores = model.eval().predict(x)
    assert maps.shape == (2, 64, 64) and scores.shape == (2,)


def test_off_contract_factory_is_refused_early():
    register_backbone("broken", lambda name, **kw: nn.Conv2d(3, 8, 3), overwrite=True)
    with pytest.raises(BadInputError, match="lacks"):
        create_backbone("broken")
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("mycnn", lambda name, **kw: None)


@pytest.mark.parametrize("declared,match", [
    ({"strides": (4, 8, 32)}, r"level 2 returns a map of shape \(1, 32, 8, 8\) for a 128x128 input, but channels\[2\] "
                              r"= 32 and strides\[2\] = 32 declare \(1, 32, 4, 4\)"),
    ({"channels": (8, 16, 16)}, r"level 2 returns a map of shape \(1, 32, 4, 4\) .* declare \(1, 16, 4, 4\)"),
    ({"strides": (0, 8, 16)}, "must be positive integers"),
    ({"strides": (4, 12, 16)}, "each a power of two times the one before"),
    ({"strides": (16, 16, 16)}, "each a power of two times the one before"),
])
def test_declarations_that_differ_from_what_forward_returns_are_refused_at_creation(declared, match):
    """UniNet is sized from channels / strides alone: a wrong declaration is named with its level when the
    backbone is created, not met as a shape error inside UniNet's first forward."""
    def factory(name, **kw):
        bb = MyCNN(name)
        for k, v in declared.items():
            setattr(bb, k, v)
        return bb
    register_backbone("declares-wrong", factory, overwrite=True)
    with pytest.raises(BadInputError, match=match):
        create_backbone("declares-wrong")
