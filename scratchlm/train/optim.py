"""Optimizers (AdamW; Muon for hidden matrices) and the learning-rate schedules."""

import math

import torch
from torch import Tensor

from scratchlm.train.config import TrainConfig


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices and embeddings only, never on norms' gains or biases,
    which decay would pull towards zero for no regularising benefit (GPT-2/3, nanoGPT). With
    `optimizer = "muon"`, the hidden matrices of the blocks use Muon instead."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if config.optimizer == "muon":
        hidden = [p for n, p in params if p.dim() == 2 and n.startswith("blocks.")]
        other = [p for n, p in params if not (p.dim() == 2 and n.startswith("blocks."))]
        groups = [
            {"params": hidden, "use_muon": True, "lr": config.muon_lr, "base_lr": config.muon_lr, "weight_decay": 0.0},
            {"params": [p for p in other if p.dim() >= 2], "use_muon": False, "lr": config.lr, "base_lr": config.lr, "weight_decay": config.weight_decay},
            {"params": [p for p in other if p.dim() < 2], "use_muon": False, "lr": config.lr, "base_lr": config.lr, "weight_decay": 0.0},
        ]
        return Muon(groups, betas=(config.beta1, config.beta2), momentum=config.muon_momentum)
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay, "base_lr": config.lr},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": config.lr},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8, fused=device.type == "cuda")


def lr_multiplier(step: int, progress: float, config: TrainConfig) -> float:
    """The schedule as a factor of each group's base learning rate: linear warmup over
    `warmup_steps`, then over the budget's progress (0..1) either cosine decay to
    `min_lr_ratio`, or warmup-stable-decay: constant, then a linear decay over the last
    `cooldown_fraction` (Hägele et al. 2024), which lets a run be extended."""
    floor = config.min_lr_ratio
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "wsd":
        start = 1.0 - config.cooldown_fraction
        if progress <= start:
            return 1.0
        return floor + (1.0 - floor) * max(0.0, 1.0 - (progress - start) / max(config.cooldown_fraction, 1e-9))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def lr_at(step: int, progress: float, config: TrainConfig) -> float:
    return config.lr * lr_multiplier(step, progress, config)


def orthogonalize(update: Tensor, steps: int = 5) -> Tensor:
    """Approximately replace the matrix by U V^T of its SVD (all singular values near 1) with a
    quintic Newton-Schulz iteration, coefficients from Jordan et al. 2024 (Muon). `update` may
    be a stack (n, rows, cols) of matrices of one shape, orthogonalised each on its own."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = update.float()
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if transposed else x).to(update.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for groups with `use_muon` (hidden weight matrices): Nesterov momentum, then the
    update orthogonalised, scaled by sqrt(max(1, rows / cols)). AdamW for the other groups
    (embeddings, head, norms). One optimizer, so schedules, clipping and checkpoints treat it
    like any other."""

    def __init__(self, groups: list[dict], betas: tuple[float, float] = (0.9, 0.95), momentum: float = 0.95, eps: float = 1e-8):
        super().__init__(groups, dict(lr=1e-3, betas=betas, momentum=momentum, eps=eps, weight_decay=0.0, use_muon=False))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return None

    def _adamw_step(self, group: dict) -> None:
        """AdamW on the whole group at once (torch._foreach_*: one operation per step of the
        algorithm, not one per tensor)."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        beta1, beta2 = group["betas"]
        grads = [p.grad for p in params]
        states = [self.state[p] for p in params]
        for state, p in zip(states, params):
            state["step"] = state.get("step", 0) + 1
            state.setdefault("exp_avg", torch.zeros_like(p))
            state.setdefault("exp_avg_sq", torch.zeros_like(p))
        m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        denom = torch._foreach_div(v, [1 - beta2 ** s["step"] for s in states])
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(params, m, denom, [-group["lr"] / (1 - beta1 ** s["step"]) for s in states])

    def _muon_step(self, group: dict) -> None:
        """Nesterov momentum, then one Newton-Schulz run per matrix shape rather than per matrix:
        a small model's step is dominated by the count of small operations, not their size. A
        matrix taller than wide joins the stack of its transpose's shape."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        buffers = [self.state[p].setdefault("momentum", torch.zeros_like(p)) for p in params]
        grads = [p.grad for p in params]
        torch._foreach_lerp_(buffers, grads, 1 - group["momentum"])
        nesterov = torch._foreach_lerp(grads, buffers, group["momentum"])
        wide = [u.mT if u.size(0) > u.size(1) else u for u in nesterov]
        stacks: dict[tuple[int, ...], list[int]] = {}
        for i, u in enumerate(wide):
            stacks.setdefault(tuple(u.shape), []).append(i)
        for indices in stacks.values():
            updates = orthogonalize(torch.stack([wide[i] for i in indices]))
            for i, update in zip(indices, updates):
                p = params[i]
                p.add_(update.mT if p.size(0) > p.size(1) else update, alpha=-group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5)
