"""Named training recipes (``--recipe``): the values of the options a recipe decides.

``default``: what trains out of the box on short runs (the digits default: 10 epochs, 110 steps). It is
the released recipe with these changes, each chosen by measurement on digits (docs/training.md has the
tables): BatchNorm momentum 0.1 (PyTorch's default) instead of 0.001, which leaves the running statistics
at ~90 % of their start values after 110 steps (test accuracy ~0.2 at training accuracy 1.0); lr 0.05
with a linear warm-up over the first 2 epochs, since at lr 0.1 plain training (``none``) and ``orth_reg``
diverge for some seeds; R starting at the identity, with which the exact methods reach 0.98-0.99 in 10
epochs where the released N(0, 1) init (an effective step √d smaller on R) needs twice that; the squared
``orth_reg`` penalty 0.1·Σ‖RRᵀ − I‖²_F; the plain log-softmax cross-entropy.

``reference``: the recipe of the released TensorFlow code of OPT (github.com/wy1iu/OPT at ed64a23, the
CIFAR-100 training scripts of every variant folder), for reproducing its CIFAR-100 runs: 192 epochs of 390
steps of batch 128 (74,880 iterations: the released 75,000 in whole passes), lr 0.1 without warm-up,
BatchNorm decay 0.999 (momentum 0.001) and eps 1e-3, the loss log(softmax + 1e-4), every learnable tensor
drawn as released
(``init="reference"``: P ~ N(0, 1), ogd's R = I), and for ``orth_reg`` the unsquared penalty
0.1·Σ‖RRᵀ − I‖_F.

Shared by both (fields of TrainConfig with fixed defaults): SGD momentum 0.9, coupled weight decay 5e-4,
lr ×0.1 at 40/67/87 % of training (the released 30k/50k/65k of 75k iterations), label smoothing 0.01,
batch 128, ogd's CayleySGD at lr 0.02 ×0.2 at the milestones.
"""
import dataclasses

from opt_fast.nn.regularization import DEFAULT_WEIGHT, REFERENCE_WEIGHT

from .guards import fail

RECIPES = {
    "default": dict(epochs=10, lr=0.05, warmup_epochs=2.0, bn_momentum=0.1, init="identity",
                    orth_reg_weight=DEFAULT_WEIGHT, orth_reg_penalty="squared", reference_loss=False),
    "reference": dict(epochs=192, lr=0.1, warmup_epochs=0.0, bn_momentum=1e-3, init="reference",
                      orth_reg_weight=REFERENCE_WEIGHT, orth_reg_penalty="norm", reference_loss=True),
}
RECIPE_KEYS = tuple(RECIPES["default"])


def resolve(cfg):
    """``cfg`` with every option left at None filled in from its recipe (explicit values win)."""
    if cfg.recipe not in RECIPES:
        fail(f"unknown --recipe {cfg.recipe!r}; choose one of {', '.join(RECIPES)}")
    fill = {k: v for k, v in RECIPES[cfg.recipe].items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **fill) if fill else cfg


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def describe(key: str) -> str:
    """The recipes' values of one option, for --help."""
    d, r = RECIPES["default"][key], RECIPES["reference"][key]
    return f"default: {_fmt(d)}" + (" in both recipes" if d == r else f"; {_fmt(r)} with --recipe reference")
