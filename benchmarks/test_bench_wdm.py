"""Anomaly map + WDM at the UniNet eval shape (batch 8, 256x256, K = 6 maps of 64/32/16):
batched torch vs the per-image numpy/scipy reference on CPU; torch vs Triton from features on CUDA only.

Run with ``make bench`` (``pytest benchmarks --benchmark-only``); CPU tests take 15 rounds (3 gave spreads of up
to 60 % of the mean), CUDA ones 20.
"""
import pytest
import torch

from uninet_feat import scoring
from uninet_feat.kernels import wdm

N, OUT, SIDES = 8, (256, 256), (64, 32, 16)


def _feats(c, device):
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(N, c, s, s, generator=g) for s in SIDES * 2]
    ss = [t + torch.linspace(0.2, 3.0, N).view(N, 1, 1, 1) * torch.randn(t.shape, generator=g) for t in ts]
    return [t.to(device) for t in ts], [s.to(device) for s in ss]


@pytest.mark.parametrize("impl", ["torch_batched", "scipy_per_image"])
def test_bench_wdm_cpu(benchmark, impl):
    benchmark.group = "WDM cpu N=8 256x256 K=6 (from maps)"
    maps = scoring.anomaly_maps(*_feats(16, "cpu"), backend="torch")
    if impl == "torch_batched":
        fn = lambda: scoring.wdm_score(maps, OUT, backend="torch")  # noqa: E731
    else:
        fn = lambda: scoring.wdm_score_reference(maps, OUT)  # noqa: E731
    benchmark.pedantic(fn, rounds=15, iterations=1, warmup_rounds=3)   # 3 rounds: spreads of up to 60 %


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bench_wdm_cuda(benchmark, backend):
    pytest.importorskip("triton")
    benchmark.group = "WDM cuda N=8 256x256 K=6, features C=256 -> (pixel map, score)"
    ts, ss = _feats(256, "cuda")

    def run():
        out = wdm.anomaly_map_wdm(ts, ss, OUT, backend=backend)
        torch.cuda.synchronize()
        return out
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=3)
