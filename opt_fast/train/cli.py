"""Command line of opt_fast.train (``python -m opt_fast.train --help``)."""
import argparse
import sys

from .core import TrainConfig, train

D = TrainConfig()


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        raise SystemExit(f"opt_fast.train: error: {message} (see --help)")


def parser():
    p = _Parser(prog="python -m opt_fast.train", description="Train a network with Orthogonal "
                "Over-Parameterized Training (opt_spec §1 recipe by default). Multi-process: torchrun "
                "--nproc_per_node N -m opt_fast.train ...")
    a = p.add_argument
    a("--method", default=D.method, help="cayley, gram_schmidt, householder, householder_qr, lowdin, ogd, orth_reg, none")
    a("--model", default=D.model, help="cnn6 (64-wide CNN-6), cnn6-cp (32/64/128 + fc6 128), resnet18, small (8x8 inputs)")
    a("--dataset", default=D.dataset, help="digits (offline default), cifar10, cifar100, synthetic")
    a("--data-dir", default=None, help="CIFAR python-format .tar.gz or extracted folder")
    a("--out", default=None, help="run folder (metrics.json, plots, checkpoint.pt)")
    a("--epochs", type=int, default=D.epochs)
    a("--batch-size", type=int, default=D.batch_size, help="global batch (split across DDP ranks)")
    a("--lr", type=float, default=D.lr)
    a("--momentum", type=float, default=D.momentum)
    a("--weight-decay", type=float, default=D.weight_decay, help="coupled (SGD weight_decay)")
    a("--lr-milestones", default=",".join(f"{x:.6g}" for x in D.lr_milestones), help="fractions of training")
    a("--lr-gamma", type=float, default=D.lr_gamma)
    a("--label-smoothing", type=float, default=D.label_smoothing)
    a("--reference-loss", action="store_true", help="log(softmax + 1e-4) as released (§1.4)")
    a("--no-augment", dest="augment", action="store_false", default=None, help="no pad/crop/flip on 32x32 data")
    a("--augment", dest="augment", action="store_true", help="force augmentation")
    a("--bn-eps", type=float, default=D.bn_eps)
    a("--bn-momentum", type=float, default=D.bn_momentum, help="PyTorch sense (0.001 = TF decay 0.999)")
    a("--init", default=None, help="reference or identity")
    a("--ogd-lr", type=float, default=D.ogd_lr)
    a("--orth-reg-weight", type=float, default=D.orth_reg_weight)
    a("--stochastic", type=float, default=None, metavar="FRACTION", help="stochastic OPT: fraction of fan-in rotated")
    a("--sample", default=D.sample, help="coordinate or channel")
    a("--episode-epochs", type=int, default=D.episode_epochs, help="epochs per S-OPT episode (resample between)")
    a("--reset-bn", action="store_true", help="S-OPT: reset the BN after each layer at resample (as released)")
    a("--seed", type=int, default=D.seed)
    a("--device", default=D.device)
    a("--threads", type=int, default=None, help="torch intra-op threads")
    a("--save-every", type=int, default=D.save_every, metavar="N", help="checkpoint every N epochs (and at the end)")
    a("--resume", default=None, metavar="PATH", help="continue from a checkpoint.pt")
    a("--stop-after", type=int, default=None, metavar="EPOCH", help="stop after this epoch (schedule still uses --epochs)")
    a("--export", default=None, metavar="PATH", help="write the merged plain model's state_dict")
    a("--compare", default=None, metavar="M1,M2,...", help="train each method with the same seed/budget; table + plot in --out")
    a("--no-progress", dest="progress", action="store_false")
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
        raise SystemExit(f"opt_fast.train: error: --lr-milestones must be comma-separated fractions, "
                         f"got {args['lr_milestones']!r}")
    cfg = TrainConfig(**args)
    if compare is not None:
        from .compare import run_compare
        run_compare(cfg, [m.strip() for m in compare.split(",") if m.strip()], argv)
        return 0
    m = train(cfg)
    if m["final_test_acc"] is not None:
        print(f"final test accuracy {m['final_test_acc']:.4f} (best {m['best_test_acc']:.4f})")
    return 0
