"""UniNet model: sizing from feature_info, MEM forms, DFS learning, losses, supervision."""
import copy

import pytest
import torch

from uninet_feat.model import UniNet, pair_loss, pair_loss_reference, reparameterize
from uninet_feat.model.losses import row_weights
from uninet_feat.model.mem import MEMBlock

from _tiny import TinyBackbone


@pytest.mark.parametrize("channels,strides,size", [((8, 16, 32), (4, 8, 16), 64), ((6, 12, 20), (2, 4, 8), 48)])
def test_shapes_follow_backbone(channels, strides, size):
    torch.manual_seed(0)
    m = UniNet(TinyBackbone(channels, strides))
    out = m(torch.randn(2, 3, size, size))
    assert len(out.teachers) == len(out.students) == 6
    for k, (t, s) in enumerate(zip(out.teachers, out.students)):
        lvl = k % 3
        assert t.shape == s.shape == (2, channels[lvl], size // strides[lvl], size // strides[lvl])
    assert m.bottleneck.out_channels == 2 * channels[-1]


def test_input_size_not_multiple_of_bottleneck_stride_is_explained():
    m = UniNet(TinyBackbone())
    with pytest.raises(ValueError, match="multiple of 32"):
        m(torch.randn(1, 3, 40, 40))



def test_decoder_depths_below_one_are_refused_when_the_model_is_built():
    """A student stage of 0 blocks passed its input's channels on unchanged: built without a word, it failed with a
    shape error at the first forward (the config check guards the CLI; this guards the library's UniNet)."""
    for depths in ((0, 4, 6), (-1, 4, 6), (3, 4.0, 6), (True, 4, 6)):
        with pytest.raises(ValueError, match="whole numbers >= 1"):
            UniNet(TinyBackbone(), decoder_depths=depths)
    assert UniNet(TinyBackbone(), decoder_depths=(1, 1, 1))(torch.rand(1, 3, 64, 64)) is not None
    import numpy as np   # numpy's integers are whole numbers (a library config built with numpy)
    assert UniNet(TinyBackbone(), decoder_depths=tuple(np.array([1, 2, 1])))(torch.rand(1, 3, 64, 64)) is not None

def test_source_teacher_stays_frozen_and_in_eval():
    m = UniNet(TinyBackbone())
    m.train()
    assert not m.source.training and m.target.training
    before = copy.deepcopy(m.source.state_dict())
    opt = torch.optim.SGD([p for g in m.trainable_groups().values() for p in g], lr=0.1)
    loss = m.loss(m(torch.randn(2, 3, 64, 64)))["loss"]
    loss.backward()
    opt.step()
    for k, v in m.source.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights and BN running stats untouched
    assert all(not p.requires_grad for p in m.source.parameters())


def test_the_unreached_parameter_probe_names_them_and_leaves_statistics_gradients_and_randomness_alone():
    """`unreached_target_parameters` (DDP freezes what it names) runs the target teacher once in train mode: its
    BatchNorm statistics, the parameters' gradients, the mode and the global random state stay as they were."""
    class WithHead(TinyBackbone):   # a head no level uses, as a CLIP tower's ln_post / proj
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(32, 4)

    torch.manual_seed(0)
    m = UniNet(WithHead()).eval()
    stats = {k: v.clone() for k, v in m.target.state_dict().items()}
    rng = torch.get_rng_state()
    assert m.unreached_target_parameters() == ["head.weight", "head.bias"]
    assert torch.equal(torch.get_rng_state(), rng) and not m.target.training
    assert all(torch.equal(v, m.target.state_dict()[k]) for k, v in stats.items())
    assert all(p.grad is None for p in m.parameters())
    assert UniNet(TinyBackbone()).unreached_target_parameters() == []


def test_a_backbone_that_is_not_finetunable_gives_a_frozen_target_teacher():
    """``finetunable = False`` (the backbone contract): the target teacher keeps its weights and BatchNorm
    statistics through training steps with the method's optimisers; the student still learns."""
    from uninet_feat.config import load_config
    from uninet_feat.optim import make_optimizers
    torch.manual_seed(0)
    bb = TinyBackbone()
    bb.finetunable = False
    m = UniNet(bb).train()
    assert not m.target.training and m.trainable_groups()["target"] == []
    target, student = copy.deepcopy(m.target.state_dict()), copy.deepcopy(m.student.state_dict())
    opt_s, opt_t = make_optimizers(m, load_config(None))
    for _ in range(2):
        m.loss(m(torch.randn(2, 3, 64, 64)))["loss"].backward()
        opt_s.step()
        opt_t.step()
    assert all(torch.equal(v, m.target.state_dict()[k]) for k, v in target.items())
    assert not all(torch.equal(v, m.student.state_dict()[k]) for k, v in student.items())
    assert UniNet(TinyBackbone()).trainable_groups()["target"]   # the default: trained


def test_dfs_theta_is_learned_and_saved():
    torch.manual_seed(0)
    m = UniNet(TinyBackbone(), dfs="learned")
    names = [n for n, _ in m.named_parameters()]
    assert any(n.startswith("dfs.phi") for n in names)
    assert any(k.startswith("dfs.phi") for k in m.state_dict())
    opt = torch.optim.AdamW(m.trainable_groups()["student"], lr=0.05)
    x = torch.randn(4, 3, 64, 64)
    for _ in range(3):
        opt.zero_grad()
        loss = m.loss(m(x))["loss"]
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.dfs.phi)
        opt.step()
    theta = [m.dfs.theta(i) for i in range(3)]
    assert any((t < 1).any() for t in theta)  # θ moved below its initial 1.0
    assert all(((t > 0.5) & (t <= 1)).all() for t in theta)


def test_dfs_modes_differ():
    torch.manual_seed(0)
    m = UniNet(TinyBackbone(), dfs="fixed")
    assert len(list(m.dfs.parameters())) == 0
    out = m(torch.randn(2, 3, 64, 64))
    fixed = m.loss(out)["loss"].item()
    m.dfs.mode = "off"
    off = m.loss(out)["loss"].item()
    assert abs(fixed - off) > 1e-4


@pytest.mark.parametrize("T", [0.1, 2.0])
def test_pair_loss_matches_official_formula(T):
    torch.manual_seed(1)
    s, t = torch.randn(3, 16, 7, 9), torch.randn(3, 16, 7, 9).relu()
    ours = pair_loss(s, t, T, 0.7)["loss"]
    assert torch.allclose(ours, pair_loss_reference(s, t, T, 0.7, eps=0.0), atol=1e-5)
    # the official epsilons only matter where p_ii is tiny
    assert torch.allclose(ours, pair_loss_reference(s, t, T, 0.7), atol=1e-3)


def test_pair_loss_gradients_match_reference():
    torch.manual_seed(2)
    s = torch.randn(2, 8, 6, 6, requires_grad=True)
    t = torch.randn(2, 8, 6, 6, requires_grad=True)
    g1 = torch.autograd.grad(pair_loss(s, t, 0.1)["loss"], (s, t))
    g2 = torch.autograd.grad(pair_loss_reference(s, t, 0.1, eps=0.0), (s, t))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_supervised_mask_loss_runs_and_pushes_abnormal_rows():
    torch.manual_seed(3)
    t = torch.randn(2, 8, 8, 8)
    s = (t + 0.01 * torch.randn_like(t)).requires_grad_()  # student ≈ teacher: p_ii high everywhere
    labels = torch.tensor([0, 1])
    masks = torch.zeros(2, 1, 64, 64)
    masks[1, :, 10:30, 10:30] = 1
    normal, cos_w = row_weights(labels, masks, (8, 8), torch.tensor([False, True]))
    assert normal.shape == (2, 64) and normal[0].all() and not normal[1].all() and normal[1].any()
    assert torch.equal(cos_w[1] == 0, ~normal[1])
    terms = pair_loss(s, t, 0.1, normal=normal, cos_weight=cos_w)
    assert terms["margin_abnormal"] > 0
    terms["loss"].backward()
    assert torch.isfinite(s.grad).all()
    # image label without a mask: every position of the defect image is abnormal
    normal2, _ = row_weights(labels, masks, (8, 8), torch.tensor([False, False]))
    assert not normal2[1].any() and normal2[0].all()
    # masks without has_mask (a library call of model.loss(out, labels, masks)): every image's mask is used; the
    # masks were silently ignored, and the loss was the labels-only one
    normal3, cos3 = row_weights(labels, masks, (8, 8))
    assert torch.equal(normal3, normal) and torch.equal(cos3, cos_w)


def test_all_abnormal_batch_has_no_normal_terms():
    s, t = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    normal = torch.zeros(2, 16, dtype=torch.bool)
    terms = pair_loss(s, t, 0.1, normal=normal)
    assert terms["sc"] == 0 and terms["margin"] == 0 and torch.isfinite(terms["loss"])


def test_multiscale_mem_reparameterizes_exactly():
    torch.manual_seed(4)
    blk = MEMBlock(24, 16, 32, stride=2, form="multiscale")
    blk.train()
    for _ in range(3):  # give BN non-trivial running statistics
        blk(torch.randn(4, 24, 16, 16))
    blk.eval()
    x = torch.randn(2, 24, 16, 16)
    before = blk(x)
    reparameterize(blk)
    kernels = [m.kernel_size for m in blk.modules() if isinstance(m, torch.nn.Conv2d)]
    assert (7, 7) in kernels
    assert torch.allclose(blk(x), before, atol=1e-5)


def test_official_mem_has_no_7x7():
    blk = MEMBlock(24, 16, 32, stride=2, form="official")
    ks = {m.kernel_size for m in blk.modules() if isinstance(m, torch.nn.Conv2d)}
    assert (7, 7) not in ks and (3, 3) in ks


def test_whole_model_reparam_same_scores():
    torch.manual_seed(5)
    m = UniNet(TinyBackbone(), mem="multiscale")
    m.train()
    m.loss(m(torch.randn(4, 3, 64, 64)))
    m.eval()
    x = torch.randn(2, 3, 64, 64)
    p1, s1 = m.predict(x)
    m.reparameterize()
    p2, s2 = m.predict(x)
    assert torch.allclose(p1, p2, atol=1e-4) and torch.allclose(s1, s2, atol=1e-4)


class _Signed(TinyBackbone):
    """TinyBackbone whose last level is linear (signed), like EfficientNet's linear bottlenecks."""

    def forward(self, x):
        outs = super().forward(x)
        return outs[:-1] + [outs[-1] - outs[-1].mean()]


def test_student_ends_follow_the_teachers_sign():
    """A ReLU-ended student cannot match signed teacher maps (cosine floor ≈ 0.5 on EfficientNet-Lite0):
    'auto' keeps the ReLU only on non-negative levels; the student's output sign follows."""
    from uninet_feat.model.uninet import nonnegative_levels
    torch.manual_seed(0)
    assert nonnegative_levels(TinyBackbone()) == (True, True, True)
    model = UniNet(_Signed(), decoder_depths=(1, 1, 1))
    assert model.cfg["student_relu"] == (True, True, False)
    out = model(torch.randn(2, 3, 64, 64))
    assert (out.students[0] >= 0).all() and (out.students[2] < 0).any()
    forced = UniNet(_Signed(), decoder_depths=(1, 1, 1), student_relu=True)
    assert forced.cfg["student_relu"] == (True, True, True) and (forced(torch.randn(2, 3, 64, 64)).students[2] >= 0).all()


def test_linear_student_end_fits_a_signed_teacher_better():
    """Same data, same steps: 1 − cos on the signed level ends lower with the linear end than with a ReLU."""
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))

    def fit(relu):
        torch.manual_seed(0)
        m = UniNet(_Signed(), decoder_depths=(1, 1, 1), student_relu=relu)
        opt = torch.optim.Adam(m.trainable_groups()["student"], lr=5e-3)
        for _ in range(30):
            opt.zero_grad()
            m.loss(m(x))["loss"].backward()
            opt.step()
        m.eval()
        with torch.no_grad():
            out = m(x)
        return float((1 - torch.nn.functional.cosine_similarity(out.teachers[2], out.students[2], dim=1)).mean())

    linear, relu = fit("auto"), fit(True)
    print(f"1-cos linear {linear:.3f} relu {relu:.3f}")
    assert linear < relu - 0.05, (linear, relu)


def test_width_scales_the_bottleneck_and_student_and_survives_a_checkpoint(tmp_path):
    """``width`` multiplies the MEM and student inner widths (1 = the official sizing); the teacher-facing
    channels stay the backbone's, and a checkpoint rebuilds the wider network with identical outputs."""
    from uninet_feat.checkpoint import build_from_checkpoint, save_checkpoint
    from uninet_feat.config import load_config
    from uninet_feat.runs import make_model
    from _tiny import register_tiny
    register_tiny()
    base = {"backbone": "tiny", "weights": "random", "channels_last": False}
    narrow, wide = (make_model(load_config(None, base={**base, "width": w})) for w in (1, 2))
    c3 = narrow.channels[-1]
    assert narrow.bottleneck.out_channels == 2 * c3 and wide.bottleneck.out_channels == 4 * c3
    inner = lambda m: [st[0].body[0].out_channels for st in m.student.stages]  # noqa: E731
    assert inner(narrow) == [max(c // 2, 16) for c in narrow.channels[::-1]]          # the official sizing
    assert inner(wide) == [max(2 * (c // 2), 16) for c in narrow.channels[::-1]] != inner(narrow)
    x = torch.randn(2, 3, 64, 64)
    out = wide.eval()(x)
    assert [s.shape for s in out.students] == [t.shape for t in out.teachers]
    p = save_checkpoint(tmp_path / "m.pt", wide, load_config(None, base={**base, "width": 2}))
    again, _ = build_from_checkpoint(p)
    assert again.bottleneck.out_channels == 4 * c3
    for a, b in zip(again.eval()(x).students, out.students):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="width"):
        UniNet(TinyBackbone(), width=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):   # the loss divided by it at the first step
        UniNet(TinyBackbone(), temperature=0)


def test_predict_scores_in_eval_mode_and_leaves_the_mode_and_statistics_as_they_were():
    """A new UniNet is in training mode; predict still scores each image on its own (BatchNorm's running
    statistics, not the batch's), changes none of them, and hands the model back in the mode it came in."""
    torch.manual_seed(0)
    m = UniNet(TinyBackbone())
    x = torch.randn(4, 3, 64, 64)
    stats = {k: v.clone() for k, v in m.state_dict().items() if "running" in k}
    _, s4 = m.predict(x)
    assert m.training and m.target.training and not m.source.training
    assert stats and all(torch.equal(v, m.state_dict()[k]) for k, v in stats.items())
    torch.testing.assert_close(m.predict(x[:2])[1], s4[:2])   # an image's score: not the batch's beside it
    torch.testing.assert_close(m.eval().predict(x)[1], s4)
    assert m.predict(x, out_size=32)[0].shape == (4, 32, 32) == m.predict(x, out_size=(32, 32))[0].shape
    # out_size sizes the map only: the image score (WDM's k and σ in input pixels) was the out_size's, off the
    # run's threshold for a caller that asked for maps at the original image size
    for size in (32, (128, 96)):
        pix, s = m.predict(x, out_size=size)
        torch.testing.assert_close(s, s4)
        assert pix.shape[-2:] == ((size, size) if isinstance(size, int) else size)


def test_a_rebuilt_checkpoint_is_in_eval_mode_and_a_tagged_dict_without_its_parts_is_named(tmp_path):
    """build_from_checkpoint gave a training-mode model (eval only for a folded multi-scale MEM): a plain
    ``model(x)`` then scored on batch statistics and overwrote the trained running ones. A tagged file without
    config / backbone / state_dict was a KeyError traceback."""
    from uninet_feat.checkpoint import build_from_checkpoint, save_checkpoint
    from uninet_feat.config import load_config
    from uninet_feat.errors import BadInputError
    from uninet_feat.runs import make_model
    from _tiny import register_tiny
    register_tiny()
    cfg = load_config(None, base={"backbone": "tiny", "weights": "random", "channels_last": False})
    p = save_checkpoint(tmp_path / "m.pt", make_model(cfg), cfg)
    m, _ = build_from_checkpoint(p)
    assert not any(x.training for x in m.modules())
    ckpt = torch.load(p, weights_only=True)
    del ckpt["config"]
    torch.save(ckpt, tmp_path / "partial.pt")
    with pytest.raises(BadInputError, match="partial.pt: the checkpoint lacks config"):
        build_from_checkpoint(tmp_path / "partial.pt")


def test_a_checkpoint_rebuilds_the_models_own_options_whatever_config_it_is_saved_with(tmp_path):
    """save_checkpoint(path, model, cfg) with a cfg made apart from the model (a library user's load_config())
    keeps the model's α, pixel map, T and decoder depths: the reloaded model scores the same."""
    from uninet_feat.checkpoint import build_from_checkpoint, save_checkpoint
    from uninet_feat.config import load_config
    from uninet_feat.runs import make_model
    from _tiny import register_tiny
    register_tiny()
    base = {"backbone": "tiny", "weights": "random", "channels_last": False}
    own = {"alpha": 0.1, "pixel_map": "raw", "temperature": 0.5, "decoder_depths": [1, 1, 1]}
    m = make_model(load_config(None, base={**base, **own})).eval()
    again, _ = build_from_checkpoint(save_checkpoint(tmp_path / "m.pt", m, load_config(None, base=base)))
    assert {k: again.cfg[k] for k in own} == {**own, "decoder_depths": (1, 1, 1)}
    x = torch.randn(2, 3, 64, 64)
    for a, b in zip(again.predict(x), m.predict(x)):
        torch.testing.assert_close(a, b)


def test_bottleneck_stride_one_keeps_the_coarsest_grid_and_survives_a_checkpoint(tmp_path):
    """``bottleneck_stride=1`` embeds on the coarsest level's grid (the method: twice its stride), so inputs
    need only be a multiple of that stride; the student still pairs every level, and a checkpoint
    rebuilds the same network (old configs without the key get the method's stride 2)."""
    from uninet_feat.checkpoint import build_from_checkpoint, save_checkpoint
    from uninet_feat.config import load_config
    from uninet_feat.runs import make_model
    from _tiny import register_tiny
    register_tiny()
    torch.manual_seed(0)
    method, kept = UniNet(TinyBackbone()), UniNet(TinyBackbone(), bottleneck_stride=1)
    assert (method.bottleneck.out_stride, kept.bottleneck.out_stride) == (32, 16)
    x = torch.randn(2, 3, 48, 48)                     # a multiple of 16, not of 32
    with pytest.raises(ValueError, match="multiple of 32"):
        method(x)
    out = kept.eval()(x)
    assert [s.shape for s in out.students] == [t.shape for t in out.teachers]
    z = kept.bottleneck([torch.cat([t, s], 0) for t, s in zip(out.teachers[3:], out.teachers[:3])])
    assert z.shape[-2:] == (3, 3)                     # 48 / 16: the coarsest level's grid
    base = {"backbone": "tiny", "weights": "random", "channels_last": False}
    cfg = load_config(None, base={**base, "bottleneck_stride": 1})
    m = make_model(cfg)
    x = torch.randn(2, 3, 64, 64)
    ref = m.eval()(x).students
    again, _ = build_from_checkpoint(save_checkpoint(tmp_path / "m.pt", m, cfg))
    assert again.bottleneck.out_stride == 16
    for a, b in zip(again.eval()(x).students, ref):
        torch.testing.assert_close(a, b)
    assert make_model(load_config(None, base=base)).bottleneck.out_stride == 32
    for bad in (4, 1.5):
        with pytest.raises(ValueError, match="bottleneck_stride must be 1 or 2"):
            UniNet(TinyBackbone(), bottleneck_stride=bad)


def test_lr_target_flag_sets_how_far_the_target_teacher_moves(tmp_path):
    """`train --lr-target`: at 0 the target teacher's weights stay the source's (only BN statistics adapt), at
    the default 1e-6 they move; the value is saved in config.yaml."""
    import yaml
    from uninet_feat.checkpoint import build_from_checkpoint
    from uninet_feat.cli import main
    from _tiny import register_tiny, tiny_train_args, write_texture_set
    register_tiny()
    data = write_texture_set(tmp_path / "d", n_train=8, n_good=1, n_bad=1)
    args = tiny_train_args(data)
    moved = {}
    for name, extra in (("zero", ["--lr-target", "0"]), ("default", [])):
        assert main(args + extra + ["--out", str(tmp_path / name)]) == 0
        m, _ = build_from_checkpoint(tmp_path / name / "model.pt")
        src, tgt = dict(m.source.named_parameters()), dict(m.target.named_parameters())
        moved[name] = max(float((tgt[k] - src[k]).abs().max()) for k in src)
    assert moved["zero"] == 0 < moved["default"], moved
    assert yaml.safe_load((tmp_path / "zero" / "config.yaml").read_text())["lr_target"] == 0


def test_border_pad_gives_the_teachers_of_the_mirrored_image_cropped_back_and_survives_a_checkpoint(tmp_path):
    """``border_pad=p``: the network sees the input mirrored p pixels out on every side, and every level is cropped
    back to the image (p / stride cells), so the outputs keep the unpadded shapes and the teachers are exactly the
    backbone's features of the padded image, cropped. Border cells change (they see the surface, not zeros); the
    option survives a checkpoint, and values that crop no whole cell, or mirror more than the image, are refused."""
    import torch.nn.functional as F
    from uninet_feat.checkpoint import build_from_checkpoint, save_checkpoint
    from uninet_feat.config import load_config
    from uninet_feat.runs import make_model
    from _tiny import register_tiny
    register_tiny()
    torch.manual_seed(0)
    m = UniNet(TinyBackbone(), border_pad=16).eval()
    plain = copy.deepcopy(m)
    plain.border_pad = 0
    x = torch.randn(2, 3, 64, 64)
    out, ref = m(x), plain(x)
    assert [t.shape for t in out.teachers] == [t.shape for t in ref.teachers]
    assert [s.shape for s in out.students] == [s.shape for s in ref.students]
    with torch.no_grad():
        feats = m.source(F.pad(x, (16, 16, 16, 16), mode="reflect"))
    for f, t, st in zip(feats, out.teachers[:3], (4, 8, 16)):
        c = 16 // st
        torch.testing.assert_close(t, f[..., c:-c, c:-c])
    first = out.teachers[0]
    assert not torch.allclose(first[..., 0, :], ref.teachers[0][..., 0, :])   # the border row sees other context
    pix, score = m.predict(x)
    assert pix.shape == (2, 64, 64) and torch.isfinite(score).all()
    cfg = load_config(None, base={"backbone": "tiny", "weights": "random", "channels_last": False, "border_pad": 16})
    made = make_model(cfg)
    again, _ = build_from_checkpoint(save_checkpoint(tmp_path / "m.pt", made, cfg))
    assert again.border_pad == 16
    for a, b in zip(again.eval()(x).students, made.eval()(x).students):
        torch.testing.assert_close(a, b)
    for bad, why in ((8, "multiple of 16"), (-16, ">= 0"), (16.0, "whole number")):
        with pytest.raises(ValueError, match=why):
            UniNet(TinyBackbone(), border_pad=bad)
    with pytest.raises(ValueError, match="smaller than the input"):
        UniNet(TinyBackbone(), border_pad=64)(torch.randn(1, 3, 64, 64))
    from uninet_feat.errors import BadInputError
    with pytest.raises(BadInputError, match="border_pad must be a multiple of 16") as e:   # as train says it
        make_model(load_config(None, base={**cfg, "border_pad": 8}))
    assert "--border-pad a multiple" in str(e.value.fix)
    with pytest.raises(BadInputError, match="border_pad must be an integer >= 0"):
        load_config(None, {"border_pad": -16}, base={"backbone": "tiny"})


@pytest.mark.parametrize("extra", [["--border-pad", "64"], ["--tile", "128", "--image-size", "32", "--border-pad", "32"]])
def test_train_refuses_a_border_pad_as_large_as_its_input_before_the_run_folder(tmp_path, capsys, extra):
    """A mirror reflects at most the network's input (the image, or each tile, resized to image_size): ``train`` says
    so as one error with its fix before it writes the run folder, as it does for an image_size the backbone cannot
    take, instead of a ValueError traceback from the first training step."""
    from uninet_feat.cli import main
    from _tiny import register_tiny, tiny_train_args, write_texture_set
    register_tiny()
    data = write_texture_set(tmp_path / "data", n_train=4, n_good=1, n_bad=1)
    assert main(tiny_train_args(data) + extra + ["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "border_pad" in err and "smaller than" in err and "fix:" in err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_tile_smaller_than_the_pad_trains_when_image_size_is_larger(tmp_path):
    """Each tile is resized to image_size, so that, not the tile, is what the mirror pads: train compared the pad
    with the tile and refused ``--tile 32 --image-size 64 --border-pad 32``, which the network takes (64 > 32)."""
    from uninet_feat.cli import main
    from uninet_feat.runs import make_model
    from _tiny import register_tiny, tiny_train_args, write_texture_set
    register_tiny()
    data = write_texture_set(tmp_path / "data", n_train=4, n_good=1, n_bad=1)
    run = tmp_path / "run"
    assert main(tiny_train_args(data) + ["--tile", "32", "--border-pad", "32", "--val-fraction", "0",
                                         "--out", str(run)]) == 0
    import yaml
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert (cfg["tile"], cfg["image_size"], cfg["border_pad"]) == (32, 64, 32)
    assert make_model(cfg).border_pad == 32 and (run / "model.pt").exists()


def test_train_refuses_an_image_size_off_a_vits_patch_grid_before_the_run_folder(tmp_path, capsys):
    """A CLIP ViT of patch 14 takes multiples of 112 and UniNet's bottleneck multiples of 32, so only multiples of
    224. train checked the bottleneck's stride alone (extract's check had the grid): ``--image-size 160`` wrote the
    run folder and stopped in the first step. Refused up front, naming the sizes that work, as extract does."""
    pytest.importorskip("open_clip")
    from test_clip_backbone import P14
    from uninet_feat.backbones.clip import register_clip_config
    from uninet_feat.cli import main
    from _tiny import write_texture_set
    register_clip_config("p14-train-test", P14, overwrite=True)
    data = write_texture_set(tmp_path / "data", n_train=2, n_good=1, n_bad=1)
    args = ["train", "--data", str(data), "--backbone", "clip:p14-train-test", "--weights", "random", "--epochs", "1",
            "--batch-size", "2", "--quiet"]
    for size, fix in (("160", "--image-size 224"), ("500", "--image-size 448 or 672")):
        assert main(args + ["--image-size", size, "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert f"image_size {size} must be a multiple of 224" in err and "grid of 112" in err, err
        assert f"(fix: {fix})" in err and not (tmp_path / "r").exists(), err
    assert main(args + ["--image-size", "224", "--val-fraction", "0", "--out", str(tmp_path / "r")]) == 0   # as named


def test_scoring_a_padded_run_below_its_pad_names_the_size_the_pad_and_the_fix(tmp_path, capsys):
    """``extract --run RUN --image-size N`` scores a finished run at another input size: one no larger than the run's
    border_pad (or off the bottleneck's stride) stopped the first forward with a ValueError traceback whose fix, a
    smaller border_pad, cannot be applied to a trained run. It is refused before any image is read, naming both."""
    from uninet_feat.cli import main
    from uninet_feat.errors import BadInputError
    from uninet_feat.extract import Extractor
    from _tiny import register_tiny, tiny_train_args, write_texture_set
    register_tiny()
    data = write_texture_set(tmp_path / "data", n_train=4, n_good=1, n_bad=1)
    run = tmp_path / "run"
    assert main(tiny_train_args(data) + ["--border-pad", "48", "--val-fraction", "0", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["extract", "--run", str(run), "--data", str(data), "--image-size", "32", "--quiet",
                 "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert "image_size 32" in err and "border_pad 48" in err and "--image-size 64 or larger" in err, err
    assert "Traceback" not in err and not (tmp_path / "f").exists()
    with pytest.raises(BadInputError, match="multiple of 32") as e:
        Extractor(run=run, image_size=80)
    assert e.value.fix.startswith("--image-size 64 or 96 (the run's own is 64)") and e.value.path == str(run)
    assert Extractor(run=run, image_size=128).cfg["image_size"] == 128   # a size it takes is used as before


def test_scoring_a_vit_run_at_a_size_off_its_patch_grid_is_refused_before_any_image_is_read():
    """A CLIP ViT of patch 14 takes multiples of 112 and UniNet's bottleneck multiples of 32, so such a run takes
    multiples of 224. `check_input_side` checked the bottleneck's stride alone: ``extract --run --image-size 160``
    passed it and stopped in the first forward, after images were read, naming the padded input (384) and sizes
    (336 or 448) of which 336 fails too. Refused up front, naming the sizes that work."""
    pytest.importorskip("open_clip")
    from test_clip_backbone import P14
    from uninet_feat.backbones import create_backbone
    from uninet_feat.errors import BadInputError
    from uninet_feat.runs import check_input_side
    torch.manual_seed(0)
    bb = create_backbone("clip:p14", model_cfg=P14)
    for pad in (0, 112):
        m = UniNet(bb, border_pad=pad).eval()
        with pytest.raises(BadInputError, match="multiple of 224") as e:
            check_input_side(m, 160, "RUN", own=224)
        assert e.value.fix.startswith("--image-size 224 (the run's own is 224)"), e.value.fix
        with pytest.raises(BadInputError, match="multiple of 224") as e:
            check_input_side(m, 500, "RUN", own=224)
        assert e.value.fix.startswith("--image-size 448 or 672"), e.value.fix
        check_input_side(m, 448, "RUN", own=224)   # a size it takes passes, and the network takes it
        with torch.no_grad():
            m(torch.randn(1, 3, 448, 448))


def test_border_pad_of_a_vit_backbone_keeps_the_padded_input_on_its_patch_grid():
    """A CLIP ViT of patch 14 takes only multiples of 112 (its patch and its coarsest level's stride 16): a pad of 16
    crops whole cells at every level but makes a 224-px input 256, which the backbone refuses in the first forward
    with the fix 'use image_size 224', the size already used. ``border_pad`` is checked against the whole input
    instead, naming the pad that works; that pad gives the unpadded shapes."""
    pytest.importorskip("open_clip")
    from test_clip_backbone import P14
    from uninet_feat.backbones import create_backbone
    torch.manual_seed(0)
    bb = create_backbone("clip:p14", model_cfg=P14)
    with pytest.raises(ValueError, match="multiple of 112"):
        UniNet(bb, border_pad=16)
    m, plain = UniNet(bb, border_pad=112).eval(), UniNet(bb).eval()
    x = torch.randn(1, 3, 224, 224)
    assert [t.shape for t in m(x).teachers] == [t.shape for t in plain(x).teachers]
