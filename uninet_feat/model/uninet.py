"""UniNet: frozen source teacher, trainable target teacher, bottleneck with MEM, student decoder, DFS.

Data flow for a batch of N images (method notes §1):
    S = source(x)            frozen, always eval mode, no grad
    T = target(x)            trainable copy of the source (train mode in training: BN adapts)
    z = bottleneck([T_l ; S_l] stacked along the batch)    one pass over 2N images
    D = student(z), split into D_a (decoded from T, first N) and D_b (decoded from S, last N)
    pairs (crossed, as in ReContrast): (S_l, D_a,l) and (T_l, D_b,l) for every level l.
Everything is sized from the backbone's ``channels`` and ``strides``.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bottleneck import Bottleneck
from .dfs import DFS
from .losses import pair_loss, row_weights
from .mem import reparameterize
from .student import StudentDecoder

DEFAULTS = {
    "mem": "official",          # 'official' (two 3×3 branches, as run) or 'multiscale' (3×3 + 7×7, re-param)
    "dfs": "off",               # "learned", "fixed" (parameter-free) or "off"; see README (DFS)
    "temperature": 2.0,         # T of the similarity-contrastive loss
    "lam": 0.7,                 # λ: weight of the cosine term vs the contrastive term
    "margin": 1.0,              # abnormal margin pushes p_ii below margin/2
    "alpha": 0.01, "beta": 3e-5,  # WDM
    "pixel_map": "smoothed",    # pixel output: "smoothed" (the σ=4 map the WDM scores) or "raw" (official, unsmoothed)
    "decoder_depths": (3, 4, 6),
    "width": 1.0,               # inner width of the bottleneck's MEM and the student's blocks, × the official sizing
    "bottleneck_stride": 2,     # embedding stride × the coarsest level's: 2 (the method) or 1 (its grid kept)
    "stop_grad": False,         # detach teacher features inside the loss
    "student_relu": "auto",     # end student levels in a ReLU: "auto" (iff the teacher level is ≥ 0), a bool, or one per level
    "border_pad": 0,            # input pixels of mirrored context around the image, cropped off every level (0: none)
}
PIXEL_MAPS = ("smoothed", "raw")


@torch.no_grad()
def nonnegative_levels(backbone: nn.Module) -> tuple[bool, ...]:
    """Which levels are ≥ 0 (post-ReLU, as in ResNets), probed on fixed noise; signed when unsure.

    The sign is set by the architecture (a final ReLU or not), not by the weights, so a probe of
    randomly initialised and of trained weights agree.
    """
    size = 4 * max(backbone.strides)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    was_training = backbone.training
    try:
        feats = backbone.eval()(x.to(next(backbone.parameters()).device))
        return tuple(bool((f >= 0).all()) for f in feats)
    except Exception:  # a backbone that refuses this input size: a linear student end is always safe
        return (False,) * len(backbone.channels)
    finally:
        backbone.train(was_training)


@dataclass
class UniNetOutput:
    teachers: list[torch.Tensor]   # [S_1..S_L, T_1..T_L]
    students: list[torch.Tensor]   # [D_a,1..D_a,L, D_b,1..D_b,L]
    n_levels: int

    def level(self, k: int) -> int:
        return k % self.n_levels


class UniNet(nn.Module):
    def __init__(self, backbone: nn.Module, **cfg):
        super().__init__()
        unknown = set(cfg) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown UniNet options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        self.cfg = {**DEFAULTS, **cfg}
        if self.cfg["pixel_map"] not in PIXEL_MAPS:
            raise ValueError(f"pixel_map must be 'smoothed' or 'raw', got {self.cfg['pixel_map']!r}")
        channels, strides = tuple(backbone.channels), tuple(backbone.strides)
        self.channels, self.strides = channels, strides
        self.source = backbone
        self.target = copy.deepcopy(backbone)
        for p in self.source.parameters():
            p.requires_grad_(False)
        # a backbone that says it must not be trained (``finetunable = False``) gives a frozen target teacher:
        # no gradients and, like the source, BatchNorm statistics kept (`train`)
        self.target_frozen = not getattr(backbone, "finetunable", True)
        for p in self.target.parameters():
            p.requires_grad_(not self.target_frozen)
        w = float(self.cfg["width"])
        if not w > 0:
            raise ValueError(f"width must be > 0, got {w}")
        if not float(self.cfg["temperature"]) > 0:   # the loss divides by it: a ZeroDivisionError at the first step
            raise ValueError(f"temperature must be > 0, got {self.cfg['temperature']}")
        scaled = {} if w == 1 else {"width": max(8, round(w * channels[-1])),
                                    "out_channels": max(8, round(2 * w * channels[-1]))}
        self.bottleneck = Bottleneck(channels, strides, self.cfg["mem"], **scaled, stride=self.cfg["bottleneck_stride"])
        self.border_pad = _border_pad(self.cfg["border_pad"], strides, self.bottleneck.out_stride,
                                      getattr(backbone, "size_multiple", 1))
        relu = self.cfg["student_relu"]
        if relu == "auto":
            relu = nonnegative_levels(backbone)
        relu = (bool(relu),) * len(channels) if isinstance(relu, bool) else tuple(bool(r) for r in relu)
        if len(relu) != len(channels):
            raise ValueError(f"student_relu needs one entry per level {channels}, got {relu}")
        self.cfg["student_relu"] = relu   # resolved, so a checkpoint rebuilds the same network
        self.student = StudentDecoder(channels, strides, self.bottleneck.out_channels,
                                      self.bottleneck.out_stride, tuple(self.cfg["decoder_depths"]), relu, w)
        self.dfs = DFS(channels, self.cfg["dfs"])
        for m in list(self.bottleneck.modules()) + list(self.student.modules()):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # every part in the mode `train` gives (source, and a frozen target, in eval): the backbone's own mode would
        # leave a frozen target's BN statistics adapting, or an eval()'d backbone's target training in eval mode
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        self.source.eval()  # the source teacher never leaves eval mode (anomalib's port lets it drift)
        if self.target_frozen:
            self.target.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> list[str]:
        """Recompute activations in backward instead of storing them: the bottleneck and the student's
        blocks always, the target teacher's stages when its backbone offers ``set_grad_checkpointing``
        (timm CNNs).
        Returns the parts that are checkpointed. Less peak memory for more step time; a recomputed
        forward would update BN running statistics a second time, so backward runs inside
        ``backward_guard`` and the run equals one without checkpointing.
        """
        parts = []
        fn = getattr(self.target, "set_grad_checkpointing", None)
        if fn is not None and fn(enable) is not False:
            parts.append("target")
        self.bottleneck.grad_checkpointing = self.student.grad_checkpointing = enable
        return parts + ["bottleneck", "student"]

    @contextmanager
    def backward_guard(self):
        """Wrap ``loss.backward()``: with checkpointing on, BN running statistics come out as they went in
        (the recomputed forwards in backward would update them again); a no-op otherwise."""
        stats = self.running_stats() if self.student.grad_checkpointing else None
        yield
        if stats is not None:
            self.load_running_stats(stats)

    def running_stats(self) -> dict[str, torch.Tensor]:
        """Copies of every BatchNorm running statistic (and batch counter)."""
        return {k: v.detach().clone() for k, v in self.named_buffers()
                if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}

    def load_running_stats(self, stats: dict[str, torch.Tensor]) -> None:
        bufs = dict(self.named_buffers())
        with torch.no_grad():
            for k, v in stats.items():
                bufs[k].copy_(v)

    def unreached_target_parameters(self) -> list[str] | None:
        """Names of the trainable target-teacher parameters that no returned level depends on: a CLIP tower's
        ln_post and proj (and its blocks past the last level), timm hrnet_w18_small's last fuse layers, xception41's
        last block. DDP without ``find_unused_parameters`` fails at the second step when a parameter gets no
        gradient (`distributed.DistEnv.wrap` freezes these). Found by one probe forward/backward of the target on
        noise in train mode; BatchNorm statistics, gradients and the random state are left as they were. None when
        the backbone refuses the probe."""
        named = [(n, p) for n, p in self.target.named_parameters() if p.requires_grad]
        if not named:
            return []
        p0, bb = named[0][1], self.target
        size = math.lcm(4 * max(self.strides), int(getattr(bb, "size_multiple", 1)))
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(p0.device, p0.dtype)
        bufs, was_training = {k: v.clone() for k, v in bb.named_buffers()}, bb.training
        try:
            with torch.random.fork_rng(devices=[p0.device] if p0.device.type == "cuda" else []), torch.enable_grad():
                total = sum(f.float().sum() for f in bb.train()(x))
                grads = torch.autograd.grad(total, [p for _, p in named], allow_unused=True)
        except Exception:  # noqa: BLE001 - a backbone that refuses this input: the caller assumes the worst
            return None
        finally:
            bb.train(was_training)
            with torch.no_grad():
                for k, v in bb.named_buffers():
                    v.copy_(bufs[k])
        return [n for (n, _), g in zip(named, grads) if g is None]

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameter groups for the two optimisers of the method."""
        return {"student": list(self.student.parameters()) + list(self.bottleneck.parameters())
                + list(self.dfs.parameters()),
                "target": [p for p in self.target.parameters() if p.requires_grad]}

    def forward(self, x: torch.Tensor, clean: torch.Tensor | None = None,
                clean_index: torch.Tensor | None = None) -> UniNetOutput:
        """Teachers and crossed students of ``x``. Training a denoising student (`uninet_feat.denoise`):
        ``clean[j]`` is the undamaged image of row ``clean_index[j]``; the student still decodes ``x``, but
        the returned teachers of those rows (the loss targets) are the clean image's, from the same pass."""
        n, step = x.shape[0], self.bottleneck.out_stride
        if x.shape[-2] % step or x.shape[-1] % step:
            raise ValueError(f"input size {tuple(x.shape[-2:])} must be a multiple of {step} for this backbone "
                             f"(the bottleneck works at stride {step}); use e.g. image_size "
                             f"{max(step, round(x.shape[-1] / step) * step)}")
        xin = x if clean is None else torch.cat([x, clean.to(x.dtype)], 0)
        p = self.border_pad
        if p:   # mirrored context: convolutions at the image's border see the surface, not zero padding
            if p >= min(x.shape[-2:]):
                raise ValueError(f"border_pad {p} must be smaller than the input {tuple(x.shape[-2:])}: a mirror "
                                 "reflects at most the image itself; use a smaller border_pad or a larger image_size")
            xin = F.pad(xin, (p, p, p, p), mode="reflect")
        with torch.no_grad():
            src = self.source(xin)
        tgt = self.target(xin)   # one pass: the target teacher's BN sees damaged and clean rows together
        z = self.bottleneck([torch.cat([t[:n], s[:n]], 0) for t, s in zip(tgt, src)])
        dec = self.student(z)
        if p:   # every level back to the image itself: maps, WDM, losses and exported features are of the image
            src, tgt, dec = ([_crop(f, p // st) for f, st in zip(fs, self.strides)] for fs in (src, tgt, dec))
        if clean is not None:
            src, tgt = ([_rows_replaced(f, clean_index, n) for f in fs] for fs in (src, tgt))
        return UniNetOutput(teachers=list(src) + list(tgt),
                            students=[d[:n] for d in dec] + [d[n:] for d in dec],
                            n_levels=len(src))

    def loss(self, out: UniNetOutput, labels=None, masks=None, has_mask=None, backend=None) -> dict:
        """Sum over the 2L pairs of the per-pair loss, with DFS applied to the student maps."""
        c = self.cfg
        total, parts = 0.0, {}
        for k, (t, s) in enumerate(zip(out.teachers, out.students)):
            lvl = out.level(k)
            normal, cos_w = row_weights(labels, masks, tuple(t.shape[-2:]), has_mask)
            terms = pair_loss(self.dfs(s, t, lvl), t, c["temperature"], c["lam"], normal, cos_w,
                              c["margin"], c["stop_grad"], backend)
            total = total + terms.pop("loss")
            for name, v in terms.items():
                parts[name] = parts.get(name, 0.0) + v
        return {"loss": total, **{k: float(v) for k, v in parts.items()}}

    @torch.no_grad()
    def predict(self, x: torch.Tensor, out_size=None, context: bool = False):
        """Eval-time scoring: (pixel map (N,H,W), image score (N,): the WDM, or `score_maps`). No DFS, as in the method.
        ``x``: images normalised with the backbone's ``mean`` / ``std``. ``out_size``: (H, W) or one side of the
        map (default: the input's); the image score is always the input size's, the run's threshold's.
        ``context``: also what each input looks like (N, D), `export.teacher_context` (``tile_norm: neighbours``).

        Always in eval mode (the model's mode is restored after): in training mode BatchNorm would use the
        batch's statistics, so an image's score would depend on the others beside it, and each call would
        overwrite the running statistics the model was trained to."""
        from uninet_feat.scoring import anomaly_maps
        size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size or x.shape[-2:])
        was_training = self.training
        self.eval()
        try:
            out = self(x)
        finally:
            self.train(was_training)
        pix, score = self.score_maps(anomaly_maps(out.teachers, out.students), tuple(x.shape[-2:]))
        if size != tuple(x.shape[-2:]):   # the score at the input size (WDM's k and σ are in its pixels): only the
            pix = F.interpolate(pix[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]   # map resized
        if not context:
            return pix, score
        from uninet_feat.export import teacher_context
        return pix, score, teacher_context(self, out)

    def score_maps(self, maps, out_size):
        """(pixel map, image score) from the 2L anomaly maps. The pixel map sums the levels in ``cfg["map_levels"]``
        only, each map in its validation-normal range units (``cfg["map_norm"]``), when a run's calibration.json
        sets them (`calibration.apply_calibration`, chosen on synthetic defects). The score is the method's WDM of
        all maps, raw, unless ``cfg["image_score"]`` is "map" (also set by calibration.json): then the same top-k
        mean is taken of that pixel map, σ=4 blurred, so that the score ranks images by the map that is shown."""
        from uninet_feat.scoring import (gaussian_blur_scipy, level_pixel_map, map_topk_score, pixel_map_chosen,
                                         wdm_score)
        smoothed = self.cfg["pixel_map"] == "smoothed"
        levels, norm = self.cfg.get("map_levels"), self.cfg.get("map_norm")
        if not pixel_map_chosen(self.cfg):
            return wdm_score(maps, out_size, self.cfg["alpha"], self.cfg["beta"], smoothed=smoothed)
        pix = level_pixel_map(maps, levels, out_size, smoothed, norm=norm)
        if self.cfg.get("image_score") == "map":
            blurred = pix if smoothed else gaussian_blur_scipy(pix, 4.0, 4.0)
            return pix, map_topk_score(maps, blurred, self.cfg["alpha"], self.cfg["beta"])
        return pix, wdm_score(maps, out_size, self.cfg["alpha"], self.cfg["beta"])[1]

    def reparameterize(self) -> "UniNet":
        """Fold multi-scale MEM branches into single convs (inference only)."""
        reparameterize(self.bottleneck)
        return self


def _border_pad(p, strides, step: int, multiple: int = 1) -> int:
    """``border_pad`` checked: a whole number of cells at every level (a multiple of the coarsest stride) that keeps
    the padded input a multiple of the bottleneck's stride ``step`` and of what the backbone takes (``multiple``,
    its ``size_multiple``: a ViT of patch 14 takes multiples of 112, so its pad is one of 112).

    Why the option: with zero padding, every convolution near the image's border sees zeros, and the student
    learns to reproduce the teacher there easily, so a defect at the border (a broken tile edge) scores low: on
    magnetic tile's 20-epoch run break defects, 41 % of whose pixels lie within 8 px of the border, ranked at 0.714
    pixel AUROC inside their images against the kNN's 0.944 (docs/results.md, session 30)."""
    if isinstance(p, bool) or not isinstance(p, int) or p < 0:
        raise ValueError(f"border_pad must be a whole number of pixels >= 0, got {p!r}")
    unit = max(strides)   # the bottleneck's stride is at most twice it, so 2p keeps the input a multiple of it
    multiple = max(1, int(multiple))
    unit = math.lcm(unit, multiple // math.gcd(multiple, 2))   # 2p a multiple of what the backbone takes
    why = ("its coarsest level's stride, so that every level crops whole cells" if unit == max(strides) else
           f"so that every level crops whole cells and the padded input stays a multiple of {multiple}, "
           "which the backbone takes")
    if p % unit or (2 * p) % step:
        raise ValueError(f"border_pad must be a multiple of {unit} pixels for this backbone ({why}), got {p}; "
                         f"e.g. {unit * max(1, round(p / unit))}")
    return p


def _crop(f: torch.Tensor, c: int) -> torch.Tensor:
    return f[..., c:f.shape[-2] - c, c:f.shape[-1] - c] if c else f


def _rows_replaced(f: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` rows of ``f``, with rows ``index`` taken from the rows after them (autograd-safe)."""
    out = f[:n].clone()
    out[index] = f[n:]
    return out
