"""Checks of opt_fast.train that speak before or after a run: the training extras are installed (checked
at start, not when the plots are drawn after training), and a large train/test accuracy gap at the end
is explained (BatchNorm running statistics that lag behind, or overfitting); how far each layer's R is from
orthogonal at the end."""
import contextlib
import importlib
from typing import List, Optional

import torch
from torch import nn

from opt_fast.nn import OPTLayer

from .guards import fail

EXTRAS_HINT = "pip install 'opt-fast[train]'"
# train - test accuracy (fractions) from which the end of a run is diagnosed / always reported
GAP_CHECK, GAP_REPORT = 0.10, 0.40
BN_GAIN = 0.05  # batch statistics beat the running ones by this much: blame the running statistics


def missing_extras(cfg) -> List[str]:
    """The training extras this run needs and cannot import, as 'package (why)'."""
    need = []
    if cfg.dataset == "digits":
        need.append(("sklearn", "scikit-learn", "for --dataset digits"))
    if cfg.out:
        need.append(("matplotlib", "matplotlib", "for the plots in --out"))
    missing = []
    for module, package, why in need:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(f"{package} ({why})")
    return missing


def check_extras(cfg) -> None:
    missing = missing_extras(cfg)
    if missing:
        fail(f"missing training extras: {', '.join(missing)}; install them "
             f"with {EXTRAS_HINT}")


def _batchnorms(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def batch_statistics(model: nn.Module):
    """Inside: every BatchNorm of ``model`` normalises by the batch's own statistics and updates no
    running statistics, whatever the model's mode (enter it after ``model.eval()``)."""
    bns = _batchnorms(model)
    modes = [bn.training for bn in bns]
    for bn in bns:
        bn.train()
        bn.track_running_stats = False  # with training=True: batch statistics, running buffers untouched
    try:
        yield
    finally:
        for bn, mode in zip(bns, modes):
            bn.track_running_stats = True
            bn.train(mode)


def gap_warning(model: nn.Module, cfg, history, steps: int, evaluate, *eval_args) -> Optional[str]:
    """A warning naming the likely cause when the final train accuracy is far above the test accuracy;
    ``evaluate(*eval_args, batch_stats=True)`` is the test accuracy under batch statistics."""
    if not history:
        return None
    train_acc, test_acc = history[-1]["train_acc"], history[-1]["test_acc"]
    gap = train_acc - test_acc
    if gap < GAP_CHECK:
        return None
    head = (f"warning: final train accuracy {train_acc:.4f} but test accuracy {test_acc:.4f} "
            f"(gap {gap * 100:.0f} pp)")
    if _batchnorms(model):
        batch_acc = evaluate(*eval_args, batch_stats=True)
        if batch_acc - test_acc >= BN_GAIN:
            kept = (1 - cfg.bn_momentum) ** steps
            return (f"{head}. Normalised by batch statistics instead of the BatchNorm running statistics the "
                    f"test accuracy is {batch_acc:.4f}: the running statistics lag behind the weights "
                    f"(--bn-momentum {cfg.bn_momentum:g} over {steps} steps keeps {kept:.0%} of their start "
                    f"values). Use a larger --bn-momentum (the default recipe's 0.1) or train longer; the "
                    f"reference recipe's 0.001 is tuned for its 75k steps.")
    if gap >= GAP_REPORT:
        return (f"{head}: the model fits the training set far better than the test set (overfitting; the "
                f"BatchNorm running statistics are not the cause). More data or augmentation, more weight "
                f"decay or fewer epochs narrow it.")
    return None


@torch.no_grad()
def orthogonality_error(model: nn.Module) -> Optional[float]:
    """max over the OPT layers of ‖R Rᵀ − I‖_F / √d in float64 (None for ``none``): how far R is from
    orthogonal, ~1e-7 for the exact maps, the penalty's doing for orth_reg."""
    errs = []
    for m in model.modules():
        if not isinstance(m, OPTLayer) or m.method.name == "none":
            continue
        R = m.rotation().double()
        errs.append(float(torch.linalg.matrix_norm(R @ R.mT - torch.eye(R.shape[-1], dtype=R.dtype, device=R.device))
                          / R.shape[-1] ** 0.5))
    return max(errs) if errs else None
