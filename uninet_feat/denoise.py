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
        """(damaged batch, clean images of the damaged rows, their row indices); (x, None, None) when none.

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
            return x, None, None
        idx = torch.tensor(rows, dtype=torch.long, device=x.device)
        damaged = x.clone()
        damaged[idx] = x[idx] + torch.stack(deltas).to(x.device, x.dtype)
        return damaged, x[idx], idx
