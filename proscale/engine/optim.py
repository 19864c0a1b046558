"""Optimizer, learning-rate schedules and gradient clipping (Mask2Former's recipe).

AdamW (SGD as an option) with four parameter groups: {backbone, rest} x {decayed, not decayed}. The backbone
trains at `lr * backbone_multiplier` (0.1); normalisation layers and embeddings (nn.Embedding,
`level_embed`, `query_feat`, `query_embed`, Swin's position tables) get no weight decay.
Biases are decayed, as in Mask2Former.

Schedules are functions of the iteration (an optimizer step), wrapped in a LambdaLR so that
their state goes into checkpoints:
    factor(it) = warmup(it) * {"step": gamma ** (number of milestones <= it),
                               "poly": (1 - it / max_iter) ** power,
                               "constant": 1}
    warmup(it) = warmup_factor + (1 - warmup_factor) * it / warmup_iters   for it < warmup_iters
"""
from __future__ import annotations

import bisect
import math
from typing import Iterable

import torch
from torch import nn

from proscale.config import SolverConfig

# Parameters whose *name* marks them as embeddings (they are not nn.Embedding modules).
EMBEDDING_NAMES = ("level_embed", "query_feat", "query_embed", "pos_embed", "absolute_pos_embed",
                   "relative_position_bias_table")

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _is_norm(module: nn.Module) -> bool:
    # timm's FrozenBatchNorm2d holds buffers only; any other "*Norm*" class (timm LayerNorm2d,
    # RMSNorm...) is a norm too.
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def param_groups(model: nn.Module, cfg: SolverConfig) -> list[dict]:
    """AdamW parameter groups. Each group carries a "name" ("backbone_decay", "backbone_no_decay",
    "decay", "no_decay"), its params and their "names"; lr / weight_decay are set per group."""
    groups: dict[str, dict] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{module_name}.{pname}" if module_name else pname
            in_backbone = full.startswith("backbone.") or ".backbone." in full
            if _is_norm(module):
                wd = cfg.weight_decay_norm
            elif isinstance(module, nn.Embedding) or any(e in full.split(".")[-1] for e in EMBEDDING_NAMES):
                wd = cfg.weight_decay_embed
            else:
                wd = cfg.weight_decay
            name = ("backbone_" if in_backbone else "") + ("decay" if wd > 0 else "no_decay")
            group = groups.setdefault(name, {
                "name": name, "params": [], "names": [],
                "lr": cfg.lr * (cfg.backbone_multiplier if in_backbone else 1.0),
                "weight_decay": wd,
            })
            group["params"].append(p)
            group["names"].append(full)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: SolverConfig) -> torch.optim.Optimizer:
    """AdamW (or SGD, `cfg.optimizer="sgd"`) over `param_groups(model, cfg)`. The groups keep
    their "name" / "names" keys. Build it after moving the model to its device: the fused
    implementation (one kernel for all parameters; 6x faster than the per-tensor loop for the tiny
    CPU model) is used where the installed torch has it for that device."""
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        cls, kwargs = torch.optim.SGD, dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        cls, kwargs = torch.optim.AdamW, dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                               weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}: expected 'adamw' or 'sgd'")
    try:
        return cls(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device / dtype / torch
        return cls(groups, **kwargs)


class LRSchedule:
    """The lr factor as a function of the iteration (see the module docstring). A plain object
    with attributes only, so LambdaLR can save it in its state_dict."""

    def __init__(self, name: str, max_iter: int, milestones: Iterable[int] = (), gamma: float = 0.1,
                 power: float = 0.9, warmup_iters: int = 0, warmup_factor: float = 1.0):
        if name not in ("step", "poly", "constant"):
            raise ValueError(f"unknown lr schedule {name!r}: expected 'step', 'poly' or 'constant'")
        self.name, self.max_iter = name, int(max_iter)
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma, self.power = gamma, power
        self.warmup_iters, self.warmup_factor = int(warmup_iters), warmup_factor

    def __call__(self, it: int) -> float:
        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            warm = self.warmup_factor * (1 - alpha) + alpha
        else:
            warm = 1.0
        if self.name == "step":
            return warm * self.gamma ** bisect.bisect_right(self.milestones, it)
        if self.name == "poly":
            return warm * max(0.0, 1.0 - it / self.max_iter) ** self.power
        return warm


def milestones_for(cfg: SolverConfig, max_iter: int) -> list[int]:
    """Absolute milestones: `cfg.steps` as given, or `cfg.step_fractions` of max_iter (COCO
    recipe: 327,778 and 355,092 of 368,750)."""
    if cfg.steps:
        return [int(s) for s in cfg.steps]
    return [int(round(f * max_iter)) for f in cfg.step_fractions]


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: SolverConfig,
                       max_iter: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepped once per iteration; every group scales its own base lr by the factor."""
    schedule = LRSchedule(cfg.schedule, max_iter, milestones_for(cfg, max_iter), cfg.gamma, cfg.poly_power,
                          cfg.warmup_iters, cfg.warmup_factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def clip_and_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Clips the global L2 norm of all gradients to `max_norm` ("full model" clipping) when
    max_norm > 0; returns the norm before clipping. An inf / nan norm means some gradient is not
    finite: the gradients are then unusable and the caller skips the step."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else math.inf)
    return float(norm)
