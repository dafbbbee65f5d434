"""Multi-process training and extraction under ``torchrun`` (one or many machines).

``torchrun --nproc-per-node N -m uninet_feat train ...`` runs the ordinary training loop in N
processes; ``init_from_env()`` is a no-op when torchrun's ``WORLD_SIZE`` is unset, so the
single-process path is untouched. What the distributed path does, and why it equals the
single-process run on the same global batch:

* **Data.** Every rank draws the *same* global permutation from the same per-epoch seeded
  generator (it iterates an index-only ``DataLoader`` with exactly the single-process arguments),
  then takes its contiguous slice of each global batch (``shard_batches``). N ranks × B/N images see
  exactly the single-process global batch of B; ``--batch-size`` stays the *global* batch size.
* **Gradients.** The trainable parts (target teacher, bottleneck/MEM, student, DFS) are wrapped in
  one ``DistributedDataParallel`` around a small module whose ``forward`` computes the model
  outputs *and* ``model.loss`` (``LossStep``). The DFS φ parameters get their gradient only through
  the loss, so computing the loss inside the DDP forward is what makes DDP see them as used
  (no ``find_unused_parameters``, no manual all-reduce). The frozen source teacher has no
  trainable parameters and is ignored by DDP; so are target-teacher parameters that no level reaches
  (a CLIP tower's ln_post / proj), which ``wrap`` freezes: they get no gradient in one process either.
* **Loss.** ``model.loss`` is a mean over images and positions; its similarity-contrastive term is
  an InfoNCE over the positions *of one image*, so no cross-rank gather of negatives is needed.
  Each rank's loss is the mean over its images; DDP averages gradients over ranks, which equals the
  global-batch mean when the per-rank batches are equal. Unequal slices (a global batch not
  divisible by N) are weighted by ``n_rank · N / n_global`` so the average is still the global mean.
  (Supervised runs with labelled defects use weighted means over *normal rows*; there the per-rank
  normalisation makes the distributed loss an approximation — exact only when every rank holds the
  same number of normal rows.) The logged loss is the all-reduced global value.
* **BatchNorm.** Target teacher, bottleneck and student use BatchNorm in train mode. Per-rank
  batch statistics differ from the global batch's, so their BN layers are switched to
  ``GlobalBatchNorm`` (``sync_batchnorm``): per-channel sums are all-reduced over ranks (one
  differentiable all-reduce per layer and direction, float64 sums), so normalisation, gradients and running statistics
  equal single-process BN on the global batch. torch's own ``SyncBatchNorm`` refuses CPU tensors
  in torch 2.13 ("SyncBatchNorm expected input tensor to be on GPU…"), hence our own; it works on
  gloo (CPU) and nccl (CUDA) alike, and keeps module classes' state-dict keys (checkpoints are
  unchanged). timm's ``BatchNormAct2d`` keeps its activation.
* **Checkpoints/logs.** Rank 0 writes config, log, ``checkpoint.pt`` and ``model.pt``; the others
  wait at a barrier. ``--resume`` loads the checkpoint on every rank (multi-node: ``--out`` must be
  on a shared filesystem, or the checkpoint copied to every node).

Extraction needs no collectives: ``Extractor.extract_to(shard=(rank, world))`` lets every process
fill its shards of one store; ``validate_store`` checks the finished store.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import BadInputError


# ----------------------------------------------------------------------------- process group
def env_rank_world() -> tuple[int, int] | None:
    """(rank, world_size) from torchrun's environment, or None outside torchrun."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


@dataclass
class DistEnv:
    """Where this process stands; ``world_size == 1`` is the plain single-process run."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owned: bool = False            # this object created the process group (and destroys it)
    bn_group: object = None        # process group for BatchNorm statistics
    group: object = None           # group for DDP/loss/barriers; None = the default group
    _restore: list = field(default_factory=list)
    _frozen: list = field(default_factory=list)   # parameters `wrap` froze (no level reaches them)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.group)

    def wrap(self, model: nn.Module):
        """Global BN in the trainable parts + DDP around ``LossStep(model)``; None when single-process.

        Target-teacher parameters that no level reaches (`UniNet.unreached_target_parameters`: a CLIP tower's
        ln_post / proj) would stop DDP at the second step; they never get a gradient, so they are frozen while
        wrapped (the optimisers keep them, as in the single-process run: checkpoints stay interchangeable).
        Where the probe fails, DDP looks for unused parameters every step instead."""
        if not self.enabled:
            return None
        from torch.nn.parallel import DistributedDataParallel as DDP
        probe = getattr(model, "unreached_target_parameters", None)
        unreached = probe() if probe is not None else []
        params = dict(model.target.named_parameters())
        for name in unreached or ():
            params[name].requires_grad_(False)
            self._frozen.append(params[name])
        for part in (model.target, model.bottleneck, model.student):
            self._restore += sync_batchnorm(part, self.bn_group)
        ids = [self.device.index] if self.device.type == "cuda" else None
        import inspect   # torch 2.13 renamed broadcast_buffers (a FutureWarning from every rank); older torch lacks it
        sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                else "broadcast_buffers")
        return DDP(LossStep(model), device_ids=ids, process_group=self.group,
                   find_unused_parameters=unreached is None, **{sync: True})

    def shard_batches(self, dataset, batch_size: int, generator: torch.Generator, drop_last: bool):
        return shard_batches(dataset, batch_size, generator, drop_last, self.rank, self.world_size)

    def loss(self, step, x, labels, masks, has_mask, global_n: int, clean=None,
             clean_index=None) -> tuple[dict, torch.Tensor]:
        """(terms of the global batch for logging, this rank's loss to call ``backward`` on)."""
        terms = step(x, labels, masks, has_mask, clean, clean_index)
        w = x.shape[0] / global_n                    # this rank's share of the global mean
        keys = sorted(terms)
        vals = torch.tensor([float(terms[k].detach() if torch.is_tensor(terms[k]) else terms[k]) * w
                             for k in keys], dtype=torch.float64, device=x.device)
        dist.all_reduce(vals, group=self.group)
        glob = {k: (vals[i].to(torch.float32) if k == "loss" else float(vals[i])) for i, k in enumerate(keys)}
        return glob, terms["loss"] * (w * self.world_size)

    def close(self) -> None:
        """Barrier, undo the BN switch, destroy the process group if this object created it."""
        if not self.enabled:
            return
        dist.barrier(group=self.group)
        for m, cls in self._restore:
            m.__class__ = cls
        self._restore.clear()
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen.clear()
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
            self.owned = False


# How long a collective waits for the slowest rank. Rank 0 works alone while the others wait in a barrier: it
# validates (`select: synthetic`), writes checkpoints, and after the last epoch saves and calibrates model.pt (on
# the CPU with 10^4 validation normals, past torch's 30 minutes); an extraction's closing barrier waits for the rank
# with the most shards left. At 30 minutes the waiting rank failed and torchrun killed rank 0 mid-calibration (an
# audit, session 53). A rank that dies is noticed by torchrun's agent, not by this timeout.
TIMEOUT_S = 24 * 3600.0


def init_from_env(device: str | torch.device | None = None, backend: str | None = None,
                  timeout_s: float = TIMEOUT_S) -> DistEnv:
    """Join torchrun's process group (env:// rendezvous); a no-op ``DistEnv()`` without ``WORLD_SIZE``.

    ``backend`` defaults to nccl for a CUDA ``device`` and gloo otherwise; ``device`` defaults to
    ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU. Re-uses a group that already exists
    (then ``close`` leaves it alone). Several phases in one process (train, then extract) should
    share one group: initialise it first and close it last (re-creating the default group after
    ``destroy_process_group`` under torchrun hung in our tests, torch 2.13).
    """
    rw = env_rank_world()
    if rw is None and dist.is_available() and dist.is_initialized():  # e.g. mp.spawn + init_process_group
        rw = dist.get_rank(), dist.get_world_size()
    if rw is None or rw[1] <= 1:
        return DistEnv(device=torch.device(device or "cpu"))
    rank, world = rw
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    owned = False
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        owned = True
    # an existing group of another backend (say nccl, with this model on the CPU) gets a gloo twin
    group = None if dist.get_backend() == backend else dist.new_group(backend=backend)
    bn_group = dist.new_group(backend=backend)  # BN statistics apart from DDP's gradient buckets
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, device=device,
                   backend=backend, owned=owned, bn_group=bn_group, group=group)


# ----------------------------------------------------------------------------- data sharding
def global_batches(n: int, batch_size: int, generator: torch.Generator, drop_last: bool):
    """The single-process loader's index batches: the same ``DataLoader`` arguments over indices only.

    Going through ``DataLoader`` (not a re-implementation of ``RandomSampler``) keeps the
    generator draws — the loader's base-seed draw, then ``randperm`` — identical in any torch version.
    """
    loader = torch.utils.data.DataLoader(range(n), batch_size=batch_size, shuffle=True, generator=generator,
                                         drop_last=drop_last)
    for b in loader:
        yield [int(i) for i in b]


def rank_slice(batch: list[int], rank: int, world: int) -> list[int]:
    """Contiguous slice of a global batch; sizes differ by at most one between ranks."""
    m = len(batch)
    return batch[rank * m // world:(rank + 1) * m // world]


def shard_batches(dataset, batch_size: int, generator: torch.Generator, drop_last: bool, rank: int, world: int):
    """This rank's part of every global batch, collated like the single-process ``DataLoader``.

    Yields the usual batch dict plus ``global_batch_size`` (int): the rank's weight in the global
    mean is ``len(batch) / global_batch_size``.
    """
    from torch.utils.data import default_collate
    if len(dataset) < world:
        raise BadInputError(f"{len(dataset)} training images cannot be split over {world} processes",
                            fix="use fewer processes (--nproc-per-node) or more images")
    for b in global_batches(len(dataset), batch_size, generator, drop_last):
        mine = rank_slice(b, rank, world)
        batch = default_collate([dataset[i] for i in mine])
        batch["global_batch_size"] = len(b)
        yield batch


# ----------------------------------------------------------------------------- the DDP module
class LossStep(nn.Module):
    """``forward`` = model outputs + ``model.loss``: every trainable parameter (DFS φ included, which
    is only touched by the loss) is used inside the DDP forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, labels=None, masks=None, has_mask=None, clean=None, clean_index=None) -> dict:
        return self.model.loss(self.model(x, clean, clean_index), labels, masks, has_mask)


# ----------------------------------------------------------------------------- global BatchNorm
class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of a sum-all-reduce is the sum-all-reduce of the gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable sum over ranks."""
    return _AllReduceSum.apply(x, group)


def global_batch_norm(x: torch.Tensor, bn: _BatchNorm, group=None) -> torch.Tensor:
    """``F.batch_norm`` in train mode over the union of every rank's batch.

    One all-reduce per call (forward and backward): per-channel sum, sum of squares and count,
    accumulated in float64 so that var = E[x²] − E[x]² keeps full float32 accuracy (no float64 copy
    of the activation is made).
    """
    c = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    shape = [1, c] + [1] * (x.dim() - 2)
    xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    count = torch.full((1,), x.numel() // c, dtype=torch.float64, device=x.device)
    sums = torch.cat([xs.sum(dims, dtype=torch.float64), (xs * xs).sum(dims, dtype=torch.float64), count])
    packed = all_reduce_sum(sums, group)
    n = packed[2 * c].detach()
    mean = packed[:c] / n
    var = (packed[c:2 * c] / n - mean * mean).clamp(min=0)
    y = (xs - mean.to(xs.dtype).view(shape)) * torch.rsqrt(var + bn.eps).to(xs.dtype).view(shape)
    y = y.to(x.dtype)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            f = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.mul_(1 - f).add_(mean.detach().to(bn.running_mean.dtype) * f)
            unbiased = var.detach() * (n / (n - 1).clamp(min=1))
            bn.running_var.mul_(1 - f).add_(unbiased.to(bn.running_var.dtype) * f)
    return y


class _GlobalBNMixin:
    """Mixed in front of a BatchNorm class: in training, with >1 rank, statistics are global."""
    _global_bn_group = None

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self._global_bn_group) > 1):
            return super().forward(x)
        y = global_batch_norm(x, self, self._global_bn_group)
        if hasattr(self, "act"):  # timm BatchNormAct2d: drop, then activation
            y = self.act(self.drop(y) if hasattr(self, "drop") else y)
        return y


_GLOBAL_CLASSES: dict = {}


def sync_batchnorm(module: nn.Module, group=None) -> list:
    """Switch every BatchNorm in ``module`` to global statistics, in place (class swap: same
    parameters, buffers and state-dict keys). Returns ``[(module, original class)]`` to undo."""
    swapped = []
    for m in module.modules():
        if isinstance(m, _BatchNorm) and not isinstance(m, _GlobalBNMixin):
            cls = type(m)
            if cls not in _GLOBAL_CLASSES:
                _GLOBAL_CLASSES[cls] = type(f"Global{cls.__name__}", (_GlobalBNMixin, cls), {})
            m.__class__ = _GLOBAL_CLASSES[cls]
            m._global_bn_group = group
            swapped.append((m, cls))
    return swapped


# ----------------------------------------------------------------------------- feature store check
def validate_store(folder, expected_paths=None) -> dict:
    """Check a (possibly multi-process) feature store: every shard present and readable, row counts
    as the manifest says, no duplicate item (path, tile), and — with ``expected_paths`` — no missing
    or unexpected image (paths compared after ``os.path.abspath``: relative ones are taken from the current
    folder). Returns a report; raises ``BadInputError`` listing every problem."""
    from .featstore import read_manifest, shard_name, shard_writer
    folder = Path(folder)
    mpath = folder / "manifest.json"
    if not mpath.exists():
        raise BadInputError("not a feature folder (no manifest.json)", path=folder,
                            fix="run `uninet-feat extract --out FOLDER` first")
    # another tool's manifest.json, or a damaged one, is refused as FeatureStore refuses it (an AttributeError or
    # ValueError traceback here before)
    m = read_manifest(mpath, "extract again into a new --out")
    problems = []
    n_items = m.get("n_items")
    if not isinstance(n_items, int) or isinstance(n_items, bool):
        problems.append(f"n_items {n_items!r} is not a count")
        n_items = -1
    items, n_shards = m["items"], m["n_shards"]
    settings = m.get("settings") if isinstance(m.get("settings"), dict) else {}
    size = settings.get("shard_size") if isinstance(settings.get("shard_size"), int) else 0
    patches = bool(settings.get("patches"))
    dim = len(m.get("vector_names", []))
    if len(items) != n_items:
        problems.append(f"manifest lists {len(items)} items but n_items = {n_items}")
    if size < 1 or n_shards != max(1, -(-n_items // size)):
        problems.append(f"n_shards = {n_shards} does not fit {n_items} items in shards of {size}")
    keys = [(it.get("path"), tuple(it.get("tile") or ())) for it in items]
    seen, dups = set(), []
    for k in keys:
        if k in seen:
            dups.append(k[0])
        seen.add(k)
    if dups:
        problems.append(f"{len(dups)} duplicate items (e.g. {dups[:3]})")
    missing_shards, rows, nonfinite, foreign, grid = [], 0, 0, [], None
    for k in range(max(n_shards, 0)):
        p = folder / shard_name(k)
        want = max(0, min(size, n_items - k * size))
        if not p.exists():
            missing_shards.append(k)
            continue
        try:
            with np.load(p) as z:
                v, s = z["vectors"], z["scores"]
                pshape = z["patches"].shape if "patches" in z.files else None
                pr = None if pshape is None else pshape[0]
                if shard_writer(z, m) is not None:
                    foreign.append(p.name)
        except Exception as e:  # noqa: BLE001 - any unreadable shard is reported
            problems.append(f"{p.name} is unreadable ({type(e).__name__})")
            continue
        rows += len(v)
        nonfinite += int((~np.isfinite(v).all(1)).sum()) if v.ndim == 2 else 0
        if v.ndim != 2 or len(v) != want or (dim and v.shape[1] != dim):
            problems.append(f"{p.name}: vectors {v.shape}, expected ({want}, {dim})")
        if len(s) != want:
            problems.append(f"{p.name}: {len(s)} scores, expected {want}")
        if patches and pr != want:
            problems.append(f"{p.name}: patches rows {pr}, expected {want}")
        if pshape is not None and pr:   # one patch grid and width in every shard (index stacked them: a traceback)
            grid = tuple(pshape[1:]) if grid is None else grid
            if tuple(pshape[1:]) != grid:
                problems.append(f"{p.name}: patches of shape {tuple(pshape[1:])} per row, the first shard's "
                                f"{grid}")
    if foreign:
        problems.append(f"{len(foreign)} shard(s) written by an extraction with other settings than the "
                        f"manifest's (e.g. {foreign[:3]})")
    # what `index`, `train-head` and a resume refuse or redo, said here too: a store that passed was refused by them
    # (an audit, session 53)
    if nonfinite:
        problems.append(f"{nonfinite} vector(s) hold NaN or Inf, which index and train-head refuse")
    from .featstore import changed_on_disk
    changed = changed_on_disk(m["files"]) if isinstance(m.get("files"), dict) else []
    if changed:
        problems.append(f"{len(changed)} image(s) changed since their features were extracted (e.g. "
                        f"{changed[0]})")
    if not problems and not missing_shards and not (folder / "complete").exists():
        problems.append("no `complete` marker: the extraction did not finish, and index / train-head refuse it")
    if missing_shards:
        problems.append(f"{len(missing_shards)} of {n_shards} shards missing (e.g. {missing_shards[:5]})")
    extra = sorted(p.name for p in folder.glob("shard-*.npz")
                   if not p.name[6:11].isdigit() or int(p.name[6:11]) >= n_shards)
    if extra:
        problems.append(f"shard files beyond n_shards: {extra[:5]}")
    # the store records absolute paths; relative ones (given, or in an old store) are taken from the current folder
    paths = {os.path.abspath(it["path"]) for it in items}
    n_path_problems = 0
    if expected_paths is not None:
        exp = {os.path.abspath(str(p)) for p in expected_paths}
        if exp - paths:
            problems.append(f"{len(exp - paths)} expected images missing (e.g. {sorted(exp - paths)[:3]})")
        if paths - exp:
            problems.append(f"{len(paths - exp)} unexpected images (e.g. {sorted(paths - exp)[:3]})")
        n_path_problems = bool(exp - paths) + bool(paths - exp)
    report = {"folder": str(folder), "n_items": n_items, "n_images": len(paths), "n_shards": n_shards,
              "rows": rows, "dim": dim, "nonfinite_vectors": nonfinite,
              "complete_marker": (folder / "complete").exists(), "ok": not problems, "problems": problems}
    if problems:
        fix = "re-run the same `uninet-feat extract` (every --shard i/n) to redo missing shards"
        if n_path_problems and len(problems) == n_path_problems:   # the store itself is whole
            fix = ("the shards are all there: extract the expected images into a new --out, or check "
                   "expected_paths (compared as absolute paths)")
        raise BadInputError("feature store failed validation: " + "; ".join(problems), path=folder, fix=fix)
    return report
