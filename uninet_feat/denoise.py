"""Denoising student: synthetic defects in the student's input, the clean image's teacher features as its target.

Why: on magnetic tile UniNet's map is hot over the whole of a defective image (docs/results.md, session 12:
the map's median over the normal pixels of defect images is 1.7-2.1 against 0.21 on normals), so inside a
defective image it barely tells the defect from the rest. The student decodes every position from one global
bottleneck embedding, and a defect anywhere changes that embedding. With ``denoise: P`` each training image
gets, with probability P, a synthetic defect (`selection.synthetic_defect`, kinds ``denoise_kinds``); the
bottleneck sees the damaged image's teacher features, but the loss compares the student with the teachers'
features of the *clean* image, both pairs. So away from the defect the student must reconstruct the normal
surface although a defect is present, and at the defect it must give what a normal surface would have, not
copy the defect (the denoising student of DeSTSeg, Zhang et al. CVPR 2023, in UniNet's crossed pairs).
No mask or label is needed: the target is the clean image everywhere.

Not in the method: ``denoise: 0`` (the default) trains exactly as before. The edits are drawn from a numpy
generator seeded by (seed, epoch, step), so a run is reproducible and a resumed run draws the same edits.
"""
from __future__ import annotations

import os
import signal
import threading
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import torch

from .errors import BadInputError
from .selection import _to_uint8, parse_kinds, synthetic_defect

STRENGTH = (0.3, 1.0)   # blend of each training edit: faint to full, wider than the validation set's 0.2-0.6


def parse_denoise(p) -> float:
    """The config's ``denoise`` as a probability in [0, 1] (None or 0: off)."""
    try:
        p = float(p or 0.0)
    except (TypeError, ValueError):
        p = float("nan")
    if not 0.0 <= p <= 1.0:
        raise BadInputError(f"denoise must be a probability in [0, 1], got {p}",
                            fix="e.g. denoise: 0.5 (half the training images get a synthetic defect), or 0 (off)")
    return p


class Damager:
    """Puts synthetic defects into training batches (normalised tensors) and says which images it changed."""

    def __init__(self, p: float, kinds, mean, std, seed: int):
        """``mean``, ``std``: the per-channel input normalisation (the backbone's, as the datasets use)."""
        self.p, self.kinds, self.seed = parse_denoise(p), parse_kinds(kinds, "denoise_kinds"), int(seed)
        self.mean, self.std = (torch.as_tensor(v, dtype=torch.float32).view(3, 1, 1) for v in (mean, std))

    def __call__(self, x: torch.Tensor, epoch: int, step: int, rank: int = 0, normal=None):
        """(damaged batch, clean images of the damaged rows, their row indices); (x, None, None) when none."""
        return self.assemble(x, *self.rows(x, epoch, step, rank, normal))

    def rows(self, x: torch.Tensor, epoch: int, step: int, rank: int = 0, normal=None):
        """(indices of the damaged rows, those rows damaged), or (None, None): the part a worker draws
        (`EditDrawer`), which `assemble` puts into the batch.

        Unchanged pixels keep their exact input values: only the edit's difference (in grey levels) is
        added, so a damaged image equals the clean one away from the defect. ``normal`` (bool per row; the
        supervised mode's labels == 0) limits the edits to normal rows: a labelled defect image keeps its own
        defect and mask, and its target is not a "clean" image. Which rows are drawn does not depend on it."""
        rng = np.random.default_rng([self.seed, 0xDE, epoch, step, rank])
        chosen = rng.random(x.shape[0]) < self.p
        if normal is not None:
            chosen &= torch.as_tensor(normal, dtype=torch.bool).cpu().numpy().reshape(-1)
        pick = np.flatnonzero(chosen)
        rows, deltas = [], []
        for i in pick:
            img = _to_uint8(x[i].detach().float().cpu(), self.mean, self.std)
            try:
                out, _ = synthetic_defect(img, rng, kinds=self.kinds, strength=STRENGTH)
            except BadInputError:   # a flat or saturated image takes no visible edit: it stays clean
                continue
            d = torch.from_numpy(out.astype(np.float32) - img.astype(np.float32)).permute(2, 0, 1) / 255
            rows.append(int(i))
            deltas.append(d / self.std)
        if not rows:
            return None, None
        idx = torch.tensor(rows, dtype=torch.long, device=x.device)
        return idx, x[idx] + torch.stack(deltas).to(x.device, x.dtype)

    @staticmethod
    def assemble(x: torch.Tensor, idx, rows):
        """(damaged batch, clean images of the damaged rows, their indices) from ``rows``' output."""
        if idx is None:
            return x, None, None
        damaged = x.clone()
        damaged[idx] = rows
        return damaged, x[idx], idx


# How a training run draws its edits (env UNINET_EDITS): "auto" (a thread on a GPU, in place on the CPU), "inplace",
# "thread" (the next batch's, while the step runs), "processes" or "processes:N" (up to N batches ahead in N spawned
# worker processes; default N: the cores less two, at most 8, divided among torchrun's processes on the machine).
# Why: they are CPU work, 37 ms a batch of 8 at 128 px and 122 ms at 256 px for magnetic tile's config on 2 threads
# here; on the CPU they share the step's cores (a thread there cost 24 %, session 49), and on an H200 the config's
# 256-px epoch took 14.0 s with them drawn in a thread and 7.1 s without denoising (session 50): a thread shares the
# Python interpreter with the step, processes do not. Each batch's edits are seeded by (epoch, step, rank), so every
# mode trains the same model.
EDITS_ENV = "UNINET_EDITS"
EDIT_MODES = ("auto", "inplace", "thread", "processes")


def edits_mode(device) -> tuple[str, int]:
    """(mode, worker processes) for a run on ``device`` from env UNINET_EDITS; BadInputError for an unknown one."""
    raw = os.environ.get(EDITS_ENV, "").strip().lower() or "auto"
    name, _, n = raw.partition(":")
    if name not in EDIT_MODES or (n and (name != "processes" or not n.isdigit() or int(n) < 1)):
        raise BadInputError(f"{EDITS_ENV}={raw!r} is not a way to draw the denoising edits",
                            fix=f"unset it, or one of {', '.join(EDIT_MODES)}, processes:N (N >= 1)")
    if name == "auto":
        name = "inplace" if torch.device(device).type == "cpu" else "thread"
    workers = (int(n) if n else _default_workers()) if name == "processes" else 0
    return name, workers


def _default_workers() -> int:
    """The cores less two, at most 8, shared by the processes torchrun starts on this machine (each draws its own)."""
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, min(8, ((os.cpu_count() or 2) - 2) // local))


def _rows(damage: Damager, *args):
    """``damage.rows(*args)`` by name in a worker (a bound method would be pickled by its function's name)."""
    return damage.rows(*args)


def _worker_init() -> None:
    torch.set_num_threads(1)   # one core each: the workers are the parallelism
    # a terminal's Ctrl-C reaches the whole process group: the main process stops the run (and the pool, leaving
    # `EditDrawer`), so the workers need not, and each would print a KeyboardInterrupt traceback over its message
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, name="uninet-edits-parent", daemon=True).start()


def _exit_with_parent() -> None:
    """Ends this worker when the training process is gone. A SIGTERM (a scheduler, `timeout`) or SIGKILL of `train`
    skips the pool's shutdown, and a worker waiting for its next batch then waited for ever, holding its memory and
    the parent's stdout (a wrapper reading that output hung)."""
    import multiprocessing.connection
    parent = multiprocessing.parent_process()
    if parent is not None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)


class EditDrawer:
    """The model inputs of a run's batches, in order: (batch, input, clean images of the damaged rows, their
    indices), the input in channels_last when the run uses it and with the denoising edits of ``damage`` (None: no
    edits), drawn as `edits_mode` says. A context manager: its thread or processes live for the whole run (spawned
    processes take about 1.5 s to start), and are shut down on leaving it, also on an error."""

    def __init__(self, damage: Damager | None, cfg: dict, mode: str = "inplace", workers: int = 0):
        self.damage, self.cfg, self.mode, self.workers = damage, cfg, mode, workers
        self.pool = None

    def __enter__(self):
        if self.damage is not None and self.mode == "thread":
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="uninet-edits")
        elif self.damage is not None and self.mode == "processes":
            import multiprocessing
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_worker_init)
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def _input(self, batch):
        x = batch["image"]
        if self.cfg.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        labels = batch["label"] if self.cfg.get("supervised") else None
        return x, None if labels is None else labels == 0

    def __call__(self, batches, epoch: int, rank: int = 0):
        ahead, pending = max(1, self.workers), deque()
        for n, batch in enumerate(batches):   # the loader is read here; only the edits run in the pool
            x, normal = self._input(batch)
            if self.damage is None:
                yield batch, x, None, None
            elif self.pool is None:
                yield (batch, *self.damage(x, epoch, n, rank, normal))
            else:   # a thread draws one batch ahead, N processes N batches
                try:
                    future = self.pool.submit(_rows, self.damage, x, epoch, n, rank, normal)
                except BrokenProcessPool as e:   # a worker died before this batch was handed out
                    raise _worker_stopped() from e
                pending.append((batch, x, future))
                if len(pending) > ahead:
                    yield self._finish(*pending.popleft())
        while pending:
            yield self._finish(*pending.popleft())

    @staticmethod
    def _finish(batch, x, future):
        try:
            idx, rows = future.result()
        except BrokenProcessPool as e:
            raise _worker_stopped() from e
        return (batch, *Damager.assemble(x, idx, rows))


def _worker_stopped() -> BadInputError:
    """The error for a dead edit worker, whether the pool notices it at a result or at the next hand-out. Run from a
    script of the user's own, the likeliest cause is that script: a spawned worker imports it first, so its unguarded
    top-level code ran again there (train and all) and failed: the message names it."""
    script = _user_script()
    guard = (f"; if {script} calls train at its top level, put that code under `if __name__ == \"__main__\":` (each "
             "worker is a spawned process that imports that script first)") if script else ""
    return BadInputError("a worker process drawing the denoising edits stopped (killed, e.g. short of memory, or it "
                         "failed to start); the run's last finished epoch is in its checkpoint.pt",
                         fix=f"resume with --resume, with fewer workers ({EDITS_ENV}=processes:N) or {EDITS_ENV}=thread"
                             f"{guard}")


def _user_script() -> str | None:
    """The file a spawned process runs again before its task: ``__main__``'s, unless it is a console script
    (`uninet-feat`, `pytest`: pip's wrappers are guarded, and have no .py suffix) or ``python -m`` of uninet_feat or
    pytest (both guarded)."""
    import sys
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    spec = getattr(getattr(main, "__spec__", None), "name", "") or ""
    if not path or not str(path).endswith(".py") or spec.split(".")[0] in ("uninet_feat", "pytest"):
        return None
    return str(path)
