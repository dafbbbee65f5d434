"""The method's two AdamW optimisers, and the option to step them inside backward.

Student + bottleneck + DFS train at ``lr``, the target teacher at ``lr_target``. With
``in_backward=True`` every parameter is updated the moment its gradient is complete (a
post-accumulate-grad hook) and the gradient is freed at once, so the gradients of the whole network
never exist together: about one parameter copy (~0.5 GB for WideResNet-50-2) off the peak. The update
is the same AdamW; state dicts keep torch's layout, so checkpoints move between the two modes.
"""
from __future__ import annotations

import torch

ADAMW = {"betas": (0.9, 0.999), "eps": 1e-8}


class StepInBackward:
    """AdamW over ``params`` stepped per parameter during ``loss.backward()``; ``step``/``zero_grad`` do nothing.

    Not for data-parallel runs: DDP averages gradients after they accumulate, which is too late here.
    """

    def __init__(self, params, **hyper):
        self.params = list(params)
        self._opts = [torch.optim.AdamW([p], **hyper) for p in self.params]
        self.param_groups = [{**self._opts[0].param_groups[0], "params": self.params}] if self.params else []
        by_param = dict(zip(self.params, self._opts))

        def hook(p):
            by_param[p].step()
            p.grad = None

        self._hooks = [p.register_post_accumulate_grad_hook(hook) for p in self.params]

    def step(self) -> None:
        """Already done in backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients are freed as they are used."""

    def remove(self) -> None:
        """Detach the hooks: the parameters go back to ordinary gradients."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def state_dict(self) -> dict:
        """One-group AdamW layout (``state`` by parameter index), as ``torch.optim.AdamW.state_dict``."""
        sds = [o.state_dict() for o in self._opts]
        state = {i: sd["state"][0] for i, sd in enumerate(sds) if sd["state"]}
        group = {k: v for k, v in sds[0]["param_groups"][0].items() if k != "params"} if sds else {}
        return {"state": state, "param_groups": [{**group, "params": list(range(len(self.params)))}]}

    def load_state_dict(self, sd: dict) -> None:
        if len(sd["param_groups"]) != 1 or len(sd["param_groups"][0]["params"]) != len(self.params):
            raise ValueError("optimiser state does not match this model's parameters")
        group = {k: v for k, v in sd["param_groups"][0].items() if k != "params"}
        for idx, o in zip(sd["param_groups"][0]["params"], self._opts):
            st = sd["state"].get(idx)
            o.load_state_dict({"state": {0: st} if st else {}, "param_groups": [{**group, "params": [0]}]})


def make_optimizers(model, cfg: dict, in_backward: bool = False):
    """(student optimiser, target optimiser) with the method's settings; see the module docstring."""
    groups = model.trainable_groups()
    make = StepInBackward if in_backward else (lambda params, **kw: torch.optim.AdamW(params, **kw))
    target = groups["target"] or [torch.nn.Parameter(torch.zeros(0))]   # a frozen target teacher (finetunable
    return (make(groups["student"], lr=cfg["lr"], weight_decay=cfg["weight_decay"], **ADAMW),   # False): a no-op
            make(target, lr=cfg["lr_target"], weight_decay=cfg["weight_decay"], **ADAMW))
