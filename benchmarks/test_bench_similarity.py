"""similarity_lse forward+backward: naive full matrix vs chunked on CPU; Triton vs naive on CUDA only.

Run with ``make bench`` (``pytest benchmarks --benchmark-only``); CPU tests take 15 rounds (3 ranked the two
backends either way between two runs), CUDA ones 5.
"""
import pytest
import torch
import torch.nn.functional as F

from uninet_feat.kernels import similarity_lse, triton_available


def _step(s, t, g, backend):
    def run():
        s.grad = t.grad = None
        similarity_lse(s, t, 10.0, backend=backend).backward(g)
    return run


def _inputs(n, hw, c, device):
    gen = torch.Generator().manual_seed(0)
    s = F.normalize(torch.randn(n, hw, c, generator=gen), dim=-1).to(device).requires_grad_()
    t = F.normalize(torch.randn(n, hw, c, generator=gen), dim=-1).to(device).requires_grad_()
    return s, t, torch.randn(n, hw, generator=gen).to(device)


@pytest.mark.parametrize("backend", ["naive", "chunked"])
def test_bench_cpu(benchmark, backend):
    benchmark.group = "similarity_lse cpu N=2 HW=1024 C=64 fwd+bwd"
    s, t, g = _inputs(2, 1024, 64, "cpu")   # 3 rounds ranked naive and chunked either way between two runs
    benchmark.pedantic(_step(s, t, g, backend), rounds=15, iterations=1, warmup_rounds=3)


@pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs CUDA and triton")
@pytest.mark.parametrize("backend", ["naive", "torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bench_cuda(benchmark, backend, dtype):
    benchmark.group = f"similarity_lse cuda N=8 HW=4096 C=256 {dtype} fwd+bwd"
    s, t, g = _inputs(8, 4096, 256, "cuda")
    s, t = s.detach().to(dtype).requires_grad_(), t.detach().to(dtype).requires_grad_()
    step = _step(s, t, g, backend)

    def synced():
        step()
        torch.cuda.synchronize()
    benchmark.pedantic(synced, rounds=5, iterations=1, warmup_rounds=2)


# UniNet's own level shapes at 256 px, batch 8: EfficientNet-Lite0's strides 4 / 8 / 16 (C = 24, 40, 112) and
# WideResNet-50-2's first level (C = 256; its 512 and 1024 take the chunked path). The fp32 Triton dot is IEEE
# (no TF32): the N=8 HW=4096 C=256 case above ran 4.8x slower than the naive matmul on an H200 (session 49).
@pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs CUDA and triton")
@pytest.mark.parametrize("backend", ["naive", "chunked", "triton"])
@pytest.mark.parametrize("hw,c", [(4096, 24), (1024, 40), (256, 112), (4096, 256)],
                         ids=["lite0-l1", "lite0-l2", "lite0-l3", "wrn50-l1"])
def test_bench_cuda_levels(benchmark, backend, hw, c):
    benchmark.group = f"similarity_lse cuda fp32 N=8 HW={hw} C={c} fwd+bwd"
    step = _step(*_inputs(8, hw, c, "cuda"), backend)

    def synced():
        step()
        torch.cuda.synchronize()
    benchmark.pedantic(synced, rounds=10, iterations=1, warmup_rounds=2)
