"""The fast recipe's optimizer (`Muon`) and learning-rate schedule (`PiecewiseLinearLR`), usable with any net."""

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def orthogonalize(g: Tensor, steps: int) -> Tensor:
    """Approximately U @ V.T of g = U S V.T (all singular values pushed towards 1) by a quintic Newton-Schulz
    iteration in bf16; the coefficients are Muon's, tuned for few steps, not exactness."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    x = x / (x.norm() + 1e-7)
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz (K. Jordan, 2024) for convolution filters (4-dimensional
    parameters), Nesterov SGD for the others, as airbench94_muon: one optimizer, so Lightning's automatic
    optimization, checkpoints and schedulers work unchanged.

    Each filter is rescaled to norm sqrt(out_channels) before its update, so Muon's learning rate is a rotation
    speed, independent of the loss scale. The defaults are airbench94_muon's at batch 2000, which sums the loss
    where LitModel averages it: its SGD learning rates (0.053 biases, 0.67 head) appear here times 2000 and its
    decay of 2e-6 per image as 0.004 per step; scale all three with the batch size.

    Args:
        params: Parameters (or parameter groups) to optimize.
        lr: Learning rate of the filters (Muon).
        momentum: Nesterov momentum of the filters.
        bias_lr: SGD learning rate of 1-dimensional parameters (biases of the whitening and norm layers).
        head_lr: SGD learning rate of 2-dimensional parameters (linear layers).
        sgd_momentum: Nesterov momentum of the SGD parameters.
        weight_decay: Fraction of each SGD parameter decayed per step at full learning rate (coupled, as in SGD).
        ns_steps: Newton-Schulz iterations per update (3 is airbench's choice; 5 is closer to exact).
    """

    def __init__(self, params, lr: float = 0.24, momentum: float = 0.6, bias_lr: float = 106.0, head_lr: float = 1340.0,
                 sgd_momentum: float = 0.85, weight_decay: float = 0.004, ns_steps: int = 3):  # fmt: skip
        super().__init__(params, {"lr": lr, "momentum": momentum})
        groups, self.param_groups = self.param_groups, []
        for group in groups:  # split each group by kind; the scheduler scales every group's lr alike
            by_kind = {"muon": [], "bias": [], "head": []}
            for p in group["params"]:
                by_kind["muon" if p.ndim == 4 else "bias" if p.ndim <= 1 else "head"].append(p)
            for kind, ps in by_kind.items():
                if ps:
                    kind_lr = {"muon": group["lr"], "bias": bias_lr, "head": head_lr}[kind]
                    self.add_param_group({**group, "params": ps, "kind": kind, "lr": kind_lr,
                                          "momentum": group["momentum"] if kind == "muon" else sgd_momentum,
                                          "weight_decay": 0.0 if kind == "muon" else weight_decay / kind_lr})  # fmt: skip
        self.ns_steps = ns_steps

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad if group["weight_decay"] == 0 else p.grad.add(p, alpha=group["weight_decay"])
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(g)
                buf = self.state[p]["momentum_buffer"].mul_(momentum).add_(g)
                g = g.add(buf, alpha=momentum)  # Nesterov
                if group["kind"] == "muon":
                    p.mul_(len(p) ** 0.5 / p.norm())
                    g = orthogonalize(g.reshape(len(g), -1), self.ns_steps).view_as(p)
                p.add_(g, alpha=-lr)
        return loss


class PiecewiseLinearLR(LambdaLR):
    """Multiplies each group's learning rate by a piecewise-linear function of training progress, stepped after
    every optimizer step. The defaults decay linearly from 1 to 0 (airbench94_muon); airbench94's warmup-then-decay
    triangle is `points: [0, 0.23, 1]`, `values: [0.2, 1, 0.07]`. A fit resumed with another length
    (`--trainer.max_epochs`) follows the new one from the step reached, and says so.

    Args:
        optimizer: The optimizer whose learning rates are scaled.
        points: Fractions of the optimizer steps, rising from 0 (the first step) to 1 (the last).
        values: Multiplier at each point.
        total_steps: Optimizer steps the schedule spans; null: the whole fit (LitModel sets it from the trainer).
    """

    def __init__(self, optimizer: Optimizer, points: list[float] = [0.0, 1.0], values: list[float] = [1.0, 0.0],
                 total_steps: int | None = None):  # fmt: skip
        if not (len(points) == len(values) >= 2 and points[0] == 0 and points[-1] == 1 and sorted(points) == points):
            raise ValueError(f"points must rise from 0 to 1, one value each (got points={points}, values={values})")
        self.points, self.values, self.total_steps = list(points), list(values), total_steps
        super().__init__(optimizer, self.multiplier)

    def multiplier(self, step: int) -> float:
        return float(np.interp(step / self.total_steps if self.total_steps else 0.0, self.points, self.values))

    def load_state_dict(self, state_dict: dict) -> None:
        # LambdaLR saves every attribute, `total_steps` too: restored as it is, the first fit's total would end
        # a longer resumed fit's schedule early and train the added steps at learning rate 0.
        total_steps = self.total_steps
        super().load_state_dict(state_dict)
        if total_steps and total_steps != self.total_steps:
            rank_zero_info(f"PiecewiseLinearLR: the schedule now spans {total_steps} steps (the checkpoint's fit: "
                           f"{self.total_steps}); it goes on from step {self.last_epoch} on the new length")  # fmt: skip
            self.total_steps = total_steps
            for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):  # the next step's rate, now
                group["lr"] = base_lr * self.multiplier(self.last_epoch)
