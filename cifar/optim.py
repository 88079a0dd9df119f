"""Optimizer and learning-rate schedules: the fast recipe's `Muon` and `PiecewiseLinearLR`, the classic recipes'
`WarmupCosineLR` (their optimizer is torch's SGD with Nesterov momentum, in YAML); usable with any net."""

import math

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from cifar import cpu


def orthogonalize(g: Tensor, steps: int) -> Tensor:
    """Approximately U @ V.T of g = U S V.T (all singular values pushed towards 1) by a quintic Newton-Schulz
    iteration in bf16 (float32 on a CPU without bf16 instructions, where bf16 is emulated: `cifar/cpu.py`); the
    coefficients are Muon's, tuned for few steps, not exactness."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.float32 if g.device.type == "cpu" and cpu.has_bf16() is False else torch.bfloat16)
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


class FitLengthLR(LambdaLR):
    """A multiplier of each group's learning rate as a function of training progress (the fraction of the fit's
    optimizer steps done), stepped after every optimizer step. `total_steps` None is "the whole fit": LitModel sets
    it from the trainer. torch's own length-bound schedulers (CosineAnnealingLR's T_max, OneCycleLR's total_steps,
    SequentialLR's milestones) need the length in steps when they are built, which a YAML file cannot know; a
    LambdaLR of the same curve learns it when the fit starts. A fit resumed with another length
    (`--trainer.max_epochs`) follows the new one from the step reached, and says so."""

    def __init__(self, optimizer: Optimizer, total_steps: int | None = None):
        self.total_steps = total_steps
        super().__init__(optimizer, self.multiplier)

    def multiplier(self, step: int) -> float:
        return self.curve(min(step / self.total_steps, 1.0) if self.total_steps else 0.0)

    def curve(self, progress: float) -> float:
        """The multiplier at `progress` in [0, 1]."""
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict) -> None:
        # LambdaLR saves every attribute, `total_steps` too: restored as it is, the first fit's total would end
        # a longer resumed fit's schedule early and train the added steps at learning rate 0.
        total_steps = self.total_steps
        super().load_state_dict(state_dict)
        if total_steps and total_steps != self.total_steps:
            rank_zero_info(f"{type(self).__name__}: the schedule now spans {total_steps} steps (the checkpoint's fit: "
                           f"{self.total_steps}); it goes on from step {self.last_epoch} on the new length")  # fmt: skip
            self.total_steps = total_steps
            for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):  # the next step's rate, now
                group["lr"] = base_lr * self.multiplier(self.last_epoch)


class PiecewiseLinearLR(FitLengthLR):
    """Multiplies each group's learning rate by a piecewise-linear function of training progress. The defaults decay
    linearly from 1 to 0 (airbench94_muon); airbench94's warmup-then-decay triangle is `points: [0, 0.23, 1]`,
    `values: [0.2, 1, 0.07]`. A point given twice is a step: `points: [0, 0.5, 0.5, 1]`, `values: [1, 1, 0.1, 0.1]`
    divides the rate by 10 half-way (torch's MultiStepLR, in fractions of the fit).

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
        self.points, self.values = list(points), list(values)
        super().__init__(optimizer, total_steps)

    def curve(self, progress: float) -> float:
        return float(np.interp(progress, self.points, self.values))


class WarmupCosineLR(FitLengthLR):
    """Linear warmup, then cosine annealing (Loshchilov & Hutter, SGDR, 2017, without restarts; the warmup of Goyal
    et al., 2017): the multiplier rises linearly from `start` to 1 over the first `warmup` of the fit, then follows
    a half cosine from 1 down to `end` at its last step. With `warmup: 0` it is torch's CosineAnnealingLR over the
    whole fit (T_max = the fit's steps, eta_min = end x the base rate).

    Args:
        optimizer: The optimizer whose learning rates are scaled.
        warmup: Fraction of the fit's optimizer steps spent warming up, in [0, 1) (5 of 200 epochs: 0.025).
        start: Multiplier at the first step of the warmup.
        end: Multiplier at the last step.
        total_steps: Optimizer steps the schedule spans; null: the whole fit (LitModel sets it from the trainer).
    """

    def __init__(self, optimizer: Optimizer, warmup: float = 0.0, start: float = 0.0, end: float = 0.0,
                 total_steps: int | None = None):  # fmt: skip
        if not 0 <= warmup < 1:
            raise ValueError(f"warmup is a fraction of the fit's steps in [0, 1), not {warmup}")
        self.warmup, self.start, self.end = warmup, start, end
        super().__init__(optimizer, total_steps)

    def curve(self, progress: float) -> float:
        if progress < self.warmup:
            return self.start + (1 - self.start) * progress / self.warmup
        annealed = (progress - self.warmup) / (1 - self.warmup)
        return self.end + (1 - self.end) * (1 + math.cos(math.pi * annealed)) / 2
