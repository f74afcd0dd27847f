"""Command line of opt_fast.train (``python -m opt_fast.train --help``)."""
import argparse
import sys

from . import checkpoint as ckpt
from .core import ORTH_REG_PENALTIES, TrainConfig, train
from .guards import fail
from .recipes import RECIPE_KEYS, RECIPES, describe

D = TrainConfig()


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        fail(f"{message} (see --help)")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' where an option has a value of its own; the recipe's options say theirs."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or action.dest in RECIPE_KEYS:
            return action.help
        return super()._get_help_string(action)


def parser():
    p = _Parser(prog="python -m opt_fast.train", formatter_class=_Formatter, description=(
        "Train a network with Orthogonal Over-Parameterized Training. --recipe default trains out of the box "
        "(digits: 0.96-0.99 test accuracy for every method in 10 epochs); --recipe reference is the released "
        "TF code's CIFAR-100 recipe (docs/training.md). Multi-process: torchrun --nproc_per_node N -m "
        "opt_fast.train ..."), epilog=(
        "Language models: --dataset stdlib (or text) or --model llama-tiny / llama-small switches to the LM "
        "workflow (Hugging Face Llama, OPT block layers, AdamW / Muon, fine-tuning); its options: "
        "python -m opt_fast.train --dataset stdlib --help"))
    a = p.add_argument

    def r(flag, key, help_, **kw):  # an option whose default comes from the recipe
        a(flag, default=None, help=f"{help_} ({describe(key)})", **kw)

    a("--method", default=D.method, help="cayley, gram_schmidt, householder, householder_qr, lowdin, ogd, orth_reg, none")
    a("--model", default=D.model, help="cnn6 (64-wide CNN-6), cnn6-cp (32/64/128 + fc6 128), resnet18, small (8x8 inputs)")
    a("--dataset", default=D.dataset, help="digits (offline, needs scikit-learn), cifar10, cifar100, synthetic")
    a("--data-dir", default=None, help="CIFAR python-format .tar.gz or extracted folder "
      "(default: none; needed by cifar10/cifar100)")
    a("--out", default=None, help="run folder: metrics.json, plots, checkpoint.pt (default: none, "
      "nothing written)")
    a("--recipe", default=D.recipe, choices=list(RECIPES), help="default: trains out of the box; reference: the "
      "released code's CIFAR-100 recipe. Sets the defaults of the options that name it")
    r("--epochs", "epochs", "passes over the training set", type=int)
    a("--batch-size", type=int, default=D.batch_size, help="global batch (split across DDP ranks)")
    r("--lr", "lr", "SGD learning rate", type=float)
    r("--warmup-epochs", "warmup_epochs", "linear learning-rate warm-up", type=float)
    a("--momentum", type=float, default=D.momentum, help="SGD momentum")
    a("--weight-decay", type=float, default=D.weight_decay, help="coupled (SGD weight_decay)")
    a("--lr-milestones", default=",".join(f"{x:.6g}" for x in D.lr_milestones), help="fractions of training")
    a("--lr-gamma", type=float, default=D.lr_gamma, help="lr factor at each milestone")
    a("--label-smoothing", type=float, default=D.label_smoothing, help="cross-entropy label smoothing")
    r("--reference-loss", "reference_loss", "log(softmax + 1e-4) as released", action=argparse.BooleanOptionalAction)
    a("--no-augment", dest="augment", action="store_false", default=None,
      help="no pad/crop/flip (default: on for 32x32 data, off otherwise)")
    a("--augment", dest="augment", action="store_true", help="force augmentation (default: see --no-augment)")
    a("--bn-eps", type=float, default=D.bn_eps, help="BatchNorm eps")
    r("--bn-momentum", "bn_momentum", "BatchNorm momentum, PyTorch sense (0.001 = TF decay 0.999)", type=float)
    r("--init", "init", "OPT init: default (reference, but a random orthogonal R for orth_reg), reference "
      "(the released N(0,1)), identity")
    a("--ogd-lr", type=float, default=D.ogd_lr, help="CayleySGD learning rate of ogd's R")
    r("--orth-reg-weight", "orth_reg_weight", "orth_reg: the penalty's weight", type=float)
    r("--orth-reg-penalty", "orth_reg_penalty", "orth_reg: squared = ‖RRᵀ−I‖²_F, norm = ‖RRᵀ−I‖_F (released)",
      choices=list(ORTH_REG_PENALTIES))
    a("--stochastic", type=float, default=None, metavar="FRACTION",
      help="stochastic OPT: fraction of fan-in rotated (default: off)")
    a("--sample", default=D.sample, help="coordinate or channel")
    a("--episode-epochs", type=int, default=D.episode_epochs, help="epochs per S-OPT episode (resample between)")
    a("--reset-bn", action="store_true", help="S-OPT: reset the BN after each layer at resample, "
      "as released (default: off)")
    a("--seed", type=int, default=D.seed, help="model init and data order")
    a("--device", default=D.device, help="cpu, cuda, cuda:N")
    a("--threads", type=int, default=None,
      help="torch intra-op threads (default: 1 on CPU unless OMP_NUM_THREADS is set)")
    a("--save-every", type=int, default=D.save_every, metavar="N",
      help="checkpoint every N epochs and at the end (0: only at the end)")
    a("--resume", default=None, metavar="PATH", help="continue from a checkpoint.pt (default: a fresh run)")
    a("--stop-after", type=int, default=None, metavar="EPOCH", help="stop after this epoch; the schedule still "
      "uses --epochs (default: --epochs)")
    a("--export", default=None, metavar="PATH", help="write the merged plain model's state_dict "
      "(default: not written)")
    a("--compare", default=None, metavar="M1,M2,...", help="train each method (or all) with the same "
      "seed and budget; table + plot in --out (default: one --method)")
    a("--no-progress", dest="progress", action="store_false", help="no per-step progress bar (default: shown)")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    from .lm.cli import wants_lm
    if wants_lm(argv):  # --dataset stdlib/text or --model llama-*: the language-model workflow
        from .lm.cli import main as lm_main
        return lm_main(argv)
    args = vars(parser().parse_args(argv))
    compare = args.pop("compare")
    try:
        args["lr_milestones"] = tuple(float(x) for x in args["lr_milestones"].split(",") if x.strip())
    except ValueError:
        fail(f"--lr-milestones must be comma-separated fractions, got {args['lr_milestones']!r}")
    cfg = TrainConfig(**args)
    try:
        if compare is not None:
            from .compare import run_compare
            run_compare(cfg, [m.strip() for m in compare.split(",") if m.strip()], argv)
            return 0
        ckpt.refuse_overwrite(cfg.out, cfg.resume)
        m = train(cfg)
    except KeyboardInterrupt:
        return ckpt.interrupted(cfg.out, cfg.resume, argv, compare is not None)
    if m["final_test_acc"] is not None:
        print(f"final test accuracy {m['final_test_acc']:.4f} (best {m['best_test_acc']:.4f})")
    return 0
