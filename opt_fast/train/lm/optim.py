"""Optimizers of the LM workflow, with a linear-warmup + cosine schedule (to 10 % of the peak).

* adamw: AdamW (betas 0.9, 0.95); weight decay on the plain 2-D weights only (not on norms, biases or the
  OPT rotation parameters, whose decay would pull R towards the map's zero point, not towards I).
  OPT rotation parameters (``in_blocks`` / ``out_blocks``) get their own learning rate ``opt_lr``.
* muon: torch.optim.Muon on the 2-D weights of the attention / MLP projections, AdamW on the rest
  (embeddings, lm_head, norms), as Muon's authors prescribe: it orthogonalizes each matrix's update,
  which means nothing for a lookup table or the classifier. torch 2.13's Muon accepts 2-D parameters only
  (ValueError otherwise) and runs Newton–Schulz in bfloat16; adjust_lr_fn="match_rms_adamw" scales its
  step to AdamW's RMS, so both take the same --lr. Not combined with OPT methods: their parameters are
  packed / batched blocks, not weight matrices.
* sgd: SGD with momentum 0.9 (coupled weight decay), all parameters.
"""
import math
from typing import List, Tuple

import torch
from torch import nn

from ..guards import fail
from .model import PROJECTIONS

OPTIMIZERS = ("adamw", "muon", "sgd")


def _is_rotation(name: str) -> bool:
    return name.endswith("in_blocks") or name.endswith("out_blocks")


def _is_projection_weight(name: str, p) -> bool:
    parts = name.split(".")
    return p.ndim == 2 and len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in PROJECTIONS


def build(model: nn.Module, optimizer: str, lr: float, opt_lr: float, weight_decay: float):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rot = [p for n, p in named if _is_rotation(n)]
    if optimizer == "sgd":
        return [torch.optim.SGD([p for _, p in named], lr=lr, momentum=0.9, weight_decay=weight_decay)]
    if optimizer == "muon" and rot:
        fail("--optimizer muon applies to plain weight matrices; OPT methods "
             "train rotation blocks: use --optimizer adamw with --method other than none")
    muon = [p for n, p in named if optimizer == "muon" and _is_projection_weight(n, p)]
    taken = {id(p) for p in rot + muon}
    rest = [(n, p) for n, p in named if id(p) not in taken]
    groups = [{"params": [p for _, p in rest if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for _, p in rest if p.ndim < 2], "weight_decay": 0.0}]
    if rot:
        groups.append({"params": rot, "weight_decay": 0.0, "lr": opt_lr})
    opts = [torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95))]
    if muon:
        opts.append(torch.optim.Muon(muon, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"))
    return opts


def schedule(opts: List[torch.optim.Optimizer], steps: int, warmup: int):
    """Linear warmup over ``warmup`` steps, then cosine from the peak to 10 % of it at ``steps``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
    return [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in opts]


def step_all(opts, scheds, params, clip: float) -> Tuple[float, ...]:
    """Clip the global gradient norm (if clip > 0), step every optimizer and scheduler; returns the norm."""
    norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip > 0 else torch.zeros(())
    for o in opts:
        o.step()
    for s in scheds:
        s.step()
    return float(norm)
