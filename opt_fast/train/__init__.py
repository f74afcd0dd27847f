"""Training entry point of opt_fast (``python -m opt_fast.train``, or ``opt_fast.train.train(TrainConfig(...))``).

Builds a plain network (cnn6 / cnn6-cp / resnet18 / small), converts it with
``opt_fast.nn.convert(model, method=..., exclude=["score"])`` and trains it with a recipe (recipes.py,
docs/training.md): ``default`` trains out of the box on short runs (digits in 10 epochs), ``reference``
is the released TF code's CIFAR-100 recipe (SGD momentum 0.9, lr 0.1 ×0.1 at 40/67/87 % of training,
coupled weight decay 5e-4, label smoothing 0.01, BN eps 1e-3 momentum 0.001, N(0, 1) init, 192 epochs:
74,880 iterations, the released 75k in whole passes). ``ogd`` trains R with CayleySGD (lr 0.02, ×0.2)
and the rest with SGD; ``orth_reg`` adds
``orth_reg_loss``; ``--stochastic f --episode-epochs N`` runs S-OPT episodes with ``resample`` between.

Per epoch: loss, train/test accuracy, time per step, relative hyperspherical-energy drift of every OPT
layer; metrics.json, accuracy.png and energy.png in the run folder; at the end a warning that explains a
large train/test gap (diagnostics.py). Checkpoints (atomic writes) hold model (incl. W0), optimizers,
schedulers, RNG states and history; the data order depends only on (seed, epoch), so ``--resume``
reproduces an uninterrupted run. Under torchrun (WORLD_SIZE > 1) it uses torch.distributed (gloo on CPU,
nccl on GPU), a DistributedSampler and DDP; only rank 0 writes.
"""
from .core import TrainConfig, build_model, train
from .data import load as load_dataset

__all__ = ["TrainConfig", "train", "build_model", "load_dataset", "main"]


def main(argv=None):
    from .cli import main as _main
    return _main(argv)
