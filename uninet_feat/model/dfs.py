"""Domain-related Feature Selection (DFS), applied to student maps before the training loss.

For a student map X and its paired teacher map P (the prior), per image and channel c:
    X' = X ⊙ softmax_hw(P_c) ⊙ (θ_c + g_c),   g_c = spatial mean of P_c,
    θ_c = min(sigmoid(φ_c) + 0.5, 1),          φ initialised to 0 so θ starts at 1.
Each position is re-weighted channel by channel by how peaked the teacher's channel is there.

Modes:
* ``learned`` — φ is a registered ``nn.Parameter`` per level, optimised and saved. (The official
  code's φ is never registered, so its θ stays 1 forever; method notes §3, §8.3.)
* ``fixed``   — the parameter-free variant (θ ≡ 1).
* ``off``     — X' = X.

Deliberate differences from the official code, both no-ops for post-ReLU backbones such as
WideResNet: g is the mean of relu(P) so that θ + g stays positive for backbones whose features can
be negative (EfficientNet's linear bottlenecks), and the prior is detached — DFS selects which
student features to distil, it is not a path for gradients into the teacher.
Like the official code, DFS is used only in training; inference compares raw maps.
"""
from __future__ import annotations

import torch
import torch.nn as nn

MODES = ("learned", "fixed", "off")


class DFS(nn.Module):
    def __init__(self, channels, mode: str = "learned"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"DFS mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.phi = nn.ParameterList(
            [nn.Parameter(torch.zeros(c)) for c in channels] if mode == "learned" else [])

    def theta(self, level: int) -> torch.Tensor | float:
        if self.mode != "learned":
            return 1.0
        return (torch.sigmoid(self.phi[level]) + 0.5).clamp(max=1.0)

    def forward(self, student: torch.Tensor, prior: torch.Tensor, level: int) -> torch.Tensor:
        if self.mode == "off":
            return student
        prior = prior.detach().float()
        n, c = prior.shape[:2]
        attn = torch.softmax(prior.flatten(2), dim=-1).view_as(prior)
        g = prior.clamp(min=0).mean(dim=(2, 3), keepdim=True)
        theta = self.theta(level)
        if torch.is_tensor(theta):
            theta = theta.view(1, c, 1, 1)
        return student * (attn * (theta + g)).to(student.dtype)
