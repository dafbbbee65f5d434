"""similarity_lse: chunked and Triton (interpreter, CPU) against the naive full-matrix reference.

TRITON_INTERPRET must be set before the kernel module is imported (it is read when @triton.jit decorates),
hence the setdefault at the very top. Sizes stay small: the interpreter runs every tile in numpy.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from uninet_feat.kernels import (  # noqa: E402
    resolve_backend, similarity_lse, similarity_lse_chunked, similarity_lse_naive, triton_available,
)

dispatch = importlib.import_module("uninet_feat.kernels._dispatch")


def _triton_mod():
    if not triton_available():
        pytest.skip("triton not installed")
    mod = importlib.import_module("uninet_feat.kernels.similarity_lse_triton")
    if not mod.INTERPRETED and not torch.cuda.is_available():
        pytest.skip("no CUDA and TRITON_INTERPRET was not 1 when the kernel module was imported")
    return mod


def _device():
    mod = _triton_mod()
    return "cpu" if mod.INTERPRETED else "cuda"


def _inputs(n, hw, c, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    s = F.normalize(torch.randn(n, hw, c, generator=g, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(n, hw, c, generator=g, dtype=torch.float64), dim=-1)
    up = torch.randn(n, hw, generator=g, dtype=torch.float64)
    return (s.to(device, dtype).requires_grad_(), t.to(device, dtype).requires_grad_(),
            up.to(device, torch.float32))


def _run(fn, s, t, up):
    lse = fn(s, t)
    ds, dt = torch.autograd.grad(lse, (s, t), up.to(lse.dtype))
    return lse, ds, dt


def _close(got, ref, rtol):
    """Relative to the reference's largest entry: gradients have many near-zero entries."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * ref.abs().max().item() + 1e-12)


SHAPES = [(1, 37, 3), (3, 100, 24), (1, 257, 40)]


@pytest.mark.parametrize("n,hw,c", SHAPES)
@pytest.mark.parametrize("temp", [0.1, 2.0])
def test_chunked_matches_naive(n, hw, c, temp):
    s, t, up = _inputs(n, hw, c)
    ref = _run(lambda a, b: similarity_lse_naive(a, b, 1 / temp), s, t, up)
    got = _run(lambda a, b: similarity_lse(a, b, 1 / temp, backend="torch", chunk=16), s, t, up)
    assert got[0].shape == (n, hw) and got[0].dtype == torch.float32
    for g_, r_ in zip(got, ref):
        _close(g_, r_, 1e-5)


@pytest.mark.parametrize("temp", [0.005, 0.002])
def test_a_temperature_below_the_bound_shifts_reach_matches_naive_not_minus_inf(temp):
    """The upper-bound shift (1/T for unit rows) underflowed every term of a row once 2/T passed ~87: lse was -inf
    (L_SC -inf, training stopped blaming the inputs) where torch.logsumexp is finite. Such inputs now take each
    row's own maximum (chunked), and a forced Triton call goes there too, warned."""
    s, t, up = _inputs(2, 60, 8)
    ref = _run(lambda a, b: similarity_lse_naive(a, b, 1 / temp), s, t, up)
    got = _run(lambda a, b: similarity_lse(a, b, 1 / temp, backend="torch", chunk=7), s, t, up)
    assert torch.isfinite(got[0]).all()
    for g_, r_ in zip(got, ref):   # fp32 logits of up to 1/T = 500 round at ~3e-5 of themselves, both sides
        _close(g_, r_, 2e-4)
    if triton_available() and importlib.import_module("uninet_feat.kernels.similarity_lse_triton").INTERPRETED:
        with pytest.warns(UserWarning, match="upper-bound shift would underflow"):
            tri = _run(lambda a, b: similarity_lse(a, b, 1 / temp, backend="triton"), s, t, up)
        for g_, r_ in zip(tri, ref):
            _close(g_, r_, 2e-4)


@pytest.mark.parametrize("n,hw,c", SHAPES)
@pytest.mark.parametrize("temp", [0.1, 2.0])
def test_triton_matches_naive_fp32(n, hw, c, temp):
    dev = _device()
    s, t, up = _inputs(n, hw, c, device=dev)
    ref = _run(lambda a, b: similarity_lse_naive(a, b, 1 / temp), s, t, up)
    got = _run(lambda a, b: similarity_lse(a, b, 1 / temp, backend="triton"), s, t, up)
    assert got[0].dtype == torch.float32
    for g_, r_ in zip(got, ref):
        _close(g_, r_, 1e-5)


@pytest.mark.parametrize("n,hw,c", [(3, 100, 24), (1, 257, 40)])
def test_triton_bf16(n, hw, c):
    """bf16 in, fp32 lse; grads are looser because the P tile is rounded to bf16 for the second dot."""
    dev = _device()
    s, t, up = _inputs(n, hw, c, dtype=torch.bfloat16, device=dev)
    ref = _run(lambda a, b: similarity_lse_naive(a, b, 10.0), s, t, up)  # fp32 math on the bf16 values
    got = _run(lambda a, b: similarity_lse(a, b, 10.0, backend="triton"), s, t, up)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    _close(got[0], ref[0], 1e-5)
    for g_, r_ in zip(got[1:], ref[1:]):
        _close(g_, r_, 3e-2)


def test_triton_small_blocks_and_one_sided_grad():
    """Many partial tiles (blocks 16x32 over HW=70, C=3 padded to 16); a detached teacher gets no grad."""
    mod = _triton_mod()
    s, t, up = _inputs(1, 70, 3, device=_device())
    ref = _run(lambda a, b: similarity_lse_naive(a, b, 10.0), s, t, up)
    got = _run(lambda a, b: mod.similarity_lse_triton(a, b, 10.0, block_m=16, block_n=32), s, t, up)
    for g_, r_ in zip(got, ref):
        _close(g_, r_, 1e-5)
    lse = mod.similarity_lse_triton(s, t.detach(), 10.0)
    (ds,) = torch.autograd.grad(lse, (s,), up)
    _close(ds, ref[1], 1e-5)


def test_chunked_bf16_grad_dtype():
    s, t, up = _inputs(2, 37, 24, dtype=torch.bfloat16)
    ref = _run(lambda a, b: similarity_lse_naive(a, b, 10.0), s, t, up)
    got = _run(lambda a, b: similarity_lse_chunked(a, b, 10.0, chunk=5), s, t, up)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    for g_, r_ in zip(got, ref):
        _close(g_, r_, 1e-2)


def test_chunk_size_does_not_change_results():
    hw = 53
    s, t, up = _inputs(3, hw, 24, dtype=torch.float64)
    outs = [_run(lambda a, b: similarity_lse_chunked(a, b, 10.0, chunk=k), s, t, up) for k in (1, 7, hw, None)]
    for other in outs[1:]:
        for g_, r_ in zip(other, outs[0]):
            torch.testing.assert_close(g_, r_, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("temp", [0.1, 2.0])
def test_chunked_gradcheck_float64(temp):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)  # not unit: shift still bounds
    t = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: similarity_lse_chunked(a, b, 1 / temp, chunk=2), (s, t))


def test_unnormalised_and_zero_rows_stay_finite():
    """The per-row Cauchy-Schwarz shift keeps exp finite where a fixed shift of inv_t would overflow."""
    s, t, up = _inputs(2, 40, 8, dtype=torch.float64)
    s, t = (s.detach() * 3).requires_grad_(), (t.detach() * 2).requires_grad_()
    with torch.no_grad():
        s[0, 5] = 0
    ref = _run(lambda a, b: similarity_lse_naive(a, b, 10.0), s, t, up)
    got = _run(lambda a, b: similarity_lse_chunked(a, b, 10.0, chunk=8), s, t, up)
    for g_, r_ in zip(got, ref):
        assert torch.isfinite(g_).all()
        _close(g_, r_, 1e-10)


def test_loss_composition_matches_official_form():
    """The caller's streaming loss (lse - z_ii, p_ii = exp(z_ii - lse)) equals the row-normalised exp form.

    The official 1e-8 epsilons are left out here: with random rows p_ii can be ~1e-5 and they then matter.
    """
    s, t, _ = _inputs(2, 30, 16, dtype=torch.float64)
    t = F.normalize(s.detach() + 0.5 * t.detach(), dim=-1).requires_grad_()  # student ~ teacher, as in training
    inv_t = 10.0

    def streaming(a, b):
        lse = similarity_lse(a, b, inv_t, backend="torch", chunk=4)
        zii = (a * b).sum(-1) * inv_t
        p = torch.exp(zii - lse)
        return (lse - zii).mean() + (1 - p).mean()

    def official(a, b):
        e = torch.exp(torch.bmm(a, b.transpose(1, 2)) * inv_t)
        p = torch.diagonal(e / e.sum(-1, keepdim=True), dim1=1, dim2=2)
        return -torch.log(p).mean() + torch.relu(1 - p).mean()

    lo, lr = streaming(s, t), official(s, t)
    go, gr = torch.autograd.grad(lo, (s, t)), torch.autograd.grad(lr, (s, t))
    _close(lo, lr, 1e-10)
    for a, b in zip(go, gr):
        _close(a, b, 1e-10)


def test_dispatch(monkeypatch):
    x = torch.zeros(1, 2, 3)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert resolve_backend(x) == "chunked"  # auto on CPU, interpreter or not
    assert resolve_backend(x, "naive") == "naive"
    monkeypatch.setenv(dispatch.ENV_VAR, "naive")
    assert resolve_backend(x) == "naive"
    assert resolve_backend(x, "torch") == "chunked"  # argument beats env
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="UNINET_KERNELS"):
        resolve_backend(x)
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="cannot be imported"):
        resolve_backend(x, "triton")
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        resolve_backend(x, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(x, "triton") == "triton"


def test_auto_on_cuda_takes_the_naive_form_for_fp32_logits_that_fit(monkeypatch):
    """On an H200 the fp32 naive matmul beat the IEEE-fp32 Triton kernel at UniNet's level shapes (session 49):
    auto takes it while the (N, HW, HW) logits fit NAIVE_MAX_ELEMENTS, and Triton past that or for bf16 / fp16.
    A CUDA tensor is stood in for by resolving auto to Triton, as `resolve_backend` does for one."""
    from uninet_feat.kernels import similarity_backend
    mod = importlib.import_module("uninet_feat.kernels.similarity_lse")
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(mod, "resolve_backend", lambda x, b=None: "triton" if dispatch.requested_backend(b) in
                        ("auto", "triton") else dispatch.requested_backend(b))
    limit = mod.NAIVE_MAX_ELEMENTS
    fits = torch.empty(8, 4096, 24, device="meta")                   # 8 * 4096^2 = 2^27 logits
    assert 8 * 4096 ** 2 <= limit < 8 * 16384 ** 2
    assert similarity_backend(fits, fits) == "naive"
    assert similarity_backend(fits, fits, "triton") == "triton"     # a named backend is kept
    big = torch.empty(8, 16384, 24, device="meta")                   # 512 px at stride 4: 8.6 GB of logits
    assert similarity_backend(big, big) == "triton"
    assert similarity_backend(fits, big) == "triton"                  # 8 * 4096 * 16384 = 2^29 logits
    assert similarity_backend(fits.to(torch.bfloat16), fits.to(torch.bfloat16)) == "triton"
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")                    # the env names it: kept too
    assert similarity_backend(fits, fits) == "triton"
    monkeypatch.setattr(mod, "NAIVE_MAX_ELEMENTS", 0)
    monkeypatch.delenv(dispatch.ENV_VAR)
    assert similarity_backend(fits, fits) == "triton"
    # and similarity_lse follows it: the naive form's result, on CPU tensors standing in
    calls = []
    monkeypatch.setattr(mod, "NAIVE_MAX_ELEMENTS", limit)
    monkeypatch.setattr(mod, "similarity_lse_naive", lambda s, t, inv_t: calls.append("naive") or s.sum(-1))
    s = F.normalize(torch.randn(2, 16, 8), dim=-1)
    mod.similarity_lse(s, s, 2.0)
    assert calls == ["naive"]


def test_bad_inputs():
    s = torch.zeros(1, 4, 3)
    with pytest.raises(ValueError, match="equal shapes"):
        similarity_lse(s, torch.zeros(1, 5, 3), 1.0)
    with pytest.raises(ValueError, match="inv_t"):
        similarity_lse(s, s, 0.0)
    with pytest.raises(ValueError, match="inv_t"):
        similarity_lse(s, s, float("inf"))
    with pytest.raises(ValueError, match="chunk"):
        similarity_lse_chunked(s, s, 1.0, chunk=0)
    empty = torch.zeros(2, 0, 3)   # a level with no positions: every backend refuses it the same way
    for backend in ("naive", "chunked"):
        with pytest.raises(ValueError, match="HW >= 1"):
            similarity_lse(empty, empty, 1.0, backend)


def test_channels_first_views():
    """Callers pass x.flatten(2).transpose(1, 2) of (N, C, H, W) maps: strided, not contiguous."""
    g = torch.Generator().manual_seed(3)
    s = F.normalize(torch.randn(2, 24, 5, 7, generator=g), dim=1).flatten(2).transpose(1, 2).requires_grad_()
    t = F.normalize(torch.randn(2, 24, 5, 7, generator=g), dim=1).flatten(2).transpose(1, 2).requires_grad_()
    up = torch.randn(2, 35, generator=g)
    ref = _run(lambda a, b: similarity_lse_naive(a, b, 10.0), s, t, up)
    backends = ["torch"] + (["triton"] if triton_available() and _triton_mod().INTERPRETED else [])
    for backend in backends:
        got = _run(lambda a, b: similarity_lse(a, b, 10.0, backend=backend, chunk=6), s, t, up)
        for g_, r_ in zip(got, ref):
            _close(g_, r_, 1e-5)


def test_fp64_falls_back_from_triton_with_fp64_results():
    """The Triton kernel takes fp32/bf16/fp16; fp64 (a gradcheck on a GPU, where auto picks triton) goes to the
    chunked path in fp64 instead of raising, warned when triton was forced."""
    _triton_mod()
    s, t, up = _inputs(1, 9, 5, dtype=torch.float64, device=_device())
    ref = _run(lambda a, b: similarity_lse_naive(a, b, 10.0), s, t, up)
    with pytest.warns(UserWarning, match="no Triton kernel for torch.float64"):
        got = _run(lambda a, b: similarity_lse(a, b, 10.0, backend="triton"), s, t, up)
    assert all(g_.dtype == torch.float64 for g_ in got)
    for g_, r_ in zip(got, ref):
        _close(g_, r_, 1e-12)


def test_wide_channels_fall_back_from_triton():
    """C > 256 has no Triton kernel (UniNet levels 2-3); forced triton warns and uses the chunked path."""
    mod = _triton_mod()
    s, t, up = _inputs(1, 9, mod.MAX_C + 1, device=_device())
    ref = _run(lambda a, b: similarity_lse_naive(a, b, 10.0), s, t, up)
    with pytest.warns(UserWarning, match="no Triton kernel"):
        got = _run(lambda a, b: similarity_lse(a, b, 10.0, backend="triton"), s, t, up)
    for g_, r_ in zip(got, ref):
        _close(g_, r_, 1e-5)


def test_gradients_stay_exact_at_huge_logits():
    """On the row-max path (tiny T, or rows of large norm) the backward recomputed z - lse in one fused step
    whose rounding differs from the forward's by ulps of z: exp of that gave 17 % gradient errors at |z| ~ 1e6
    and inf at 1e8. It now recomputes z - max as the forward did."""
    s, t, up = _inputs(2, 40, 8, dtype=torch.float64)
    for inv_t in (1e6, 1e8):
        ref = torch.autograd.grad(similarity_lse_naive(s, t, inv_t), (s, t), up.double())
        a, b = s.detach().float().requires_grad_(), t.detach().float().requires_grad_()
        got = torch.autograd.grad(similarity_lse_chunked(a, b, inv_t, chunk=7), (a, b), up)
        for x, r in zip(got, ref):
            assert x.isfinite().all()
            _close(x, r, 1e-5)


def test_the_triton_dispatch_of_inputs_that_need_grad_warns_nothing():
    """The dispatch's bound check took float() of a tensor built from inputs that need grad: torch's "Converting a
    tensor with requires_grad=True to a scalar" warning on every training step's call."""
    import warnings
    dev = _device()
    s, t, up = _inputs(1, 40, 8, device=dev)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        lse = similarity_lse(s, t, 2.0, backend="triton")
    assert lse.requires_grad and not [w for w in rec if "requires_grad" in str(w.message)]
    _close(lse, similarity_lse_naive(s.detach(), t.detach(), 2.0), 1e-5)
