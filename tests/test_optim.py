"""`--step-in-backward`: AdamW per parameter inside backward trains the same model with less memory."""
import copy

import pytest
import torch
from torch import nn

from uninet_feat.checkpoint import build_from_checkpoint
from uninet_feat.config import load_config
from uninet_feat.errors import BadInputError
from uninet_feat.optim import StepInBackward
from uninet_feat.train import train

from _tiny import register_tiny, write_texture_set

register_tiny()
HYPER = dict(lr=1e-2, weight_decay=1e-2, betas=(0.9, 0.999), eps=1e-8)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))


def _steps(net, opt, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        loss = net(torch.randn(2, 3, 9, 9, generator=g)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def test_step_in_backward_equals_adamw_and_frees_gradients():
    a, b = _net(), _net()
    opt_a = torch.optim.AdamW(a.parameters(), **HYPER)
    opt_b = StepInBackward(b.parameters(), **HYPER)
    _steps(a, opt_a, 3)
    _steps(b, opt_b, 3)
    assert all(p.grad is None for p in b.parameters())        # consumed and freed inside backward
    assert any(p.grad is not None for p in a.parameters())
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    # state dicts are interchangeable: continue each from the other's state
    sd_a, sd_b = copy.deepcopy(opt_a.state_dict()), copy.deepcopy(opt_b.state_dict())  # torch aliases state
    assert sd_b["state"].keys() == sd_a["state"].keys()
    for i in sd_a["state"]:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sd_a["state"][i][k], sd_b["state"][i][k], rtol=1e-5, atol=1e-7)
    c, d = _net(), _net()
    c.load_state_dict(a.state_dict())
    d.load_state_dict(a.state_dict())
    opt_c = StepInBackward(c.parameters(), **HYPER)
    opt_c.load_state_dict(sd_a)
    opt_d = torch.optim.AdamW(d.parameters(), **HYPER)
    opt_d.load_state_dict(sd_b)
    _steps(a, opt_a, 2, seed=2)
    _steps(c, opt_c, 2, seed=2)
    _steps(d, opt_d, 2, seed=2)
    for pa, pc, pd in zip(a.parameters(), c.parameters(), d.parameters()):
        torch.testing.assert_close(pc, pa, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pd, pa, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="does not match"):
        StepInBackward(list(_net().parameters())[:2], **HYPER).load_state_dict(sd_a)
    opt_c.remove()
    _steps(c, torch.optim.AdamW(c.parameters(), **HYPER), 1)
    assert all(p.grad is not None for p in c.parameters())      # hooks gone: ordinary gradients again


def test_train_step_in_backward_equals_plain_run_and_resumes(tmp_path):
    """A 2-epoch run with the option, killed after epoch 1 and resumed, equals a plain 2-epoch run."""
    data = write_texture_set(tmp_path / "tex")
    base = {"data": str(data), "backbone": "tiny", "weights": "random", "image_size": 64, "batch_size": 4,
            "val_fraction": 0.2, "channels_last": False, "seed": 7}
    plain = train(load_config(None, {**base, "epochs": 2}), tmp_path / "a", quiet=True)
    train(load_config(None, {**base, "epochs": 1, "step_in_backward": True}), tmp_path / "b", quiet=True)
    (tmp_path / "b" / "model.pt").unlink()   # as if killed after the epoch-1 checkpoint
    fused = train(load_config(None, {**base, "epochs": 2, "step_in_backward": True}), tmp_path / "b", resume=True,
                  quiet=True)   # the run's own settings: a resume changes only train.RESUMABLE_KEYS
    ma, ckpt_a = build_from_checkpoint(plain)
    mb, ckpt_b = build_from_checkpoint(fused)
    assert ckpt_b["config"]["step_in_backward"] and not ckpt_a["config"]["step_in_backward"]
    sa, sb = ma.state_dict(), mb.state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5, msg=k)


def test_step_in_backward_refuses_torchrun(tmp_path, monkeypatch):
    data = write_texture_set(tmp_path / "tex")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = load_config(None, {"data": str(data), "backbone": "tiny", "weights": "random", "image_size": 64,
                             "epochs": 1, "step_in_backward": True})
    with pytest.raises(BadInputError, match="torchrun"):
        train(cfg, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
