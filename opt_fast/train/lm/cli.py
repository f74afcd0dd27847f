"""Command line of the LM workflow: ``python -m opt_fast.train --dataset stdlib --model llama-tiny ...``
(opt_fast.train's CLI hands over here when --dataset is stdlib/text or --model is llama-*)."""
import argparse
import sys

from ..guards import fail
from .config import METHODS, LMConfig
from .model import SIZES
from .optim import OPTIMIZERS

D = LMConfig()


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        fail(f"{message} (see --dataset stdlib --help)")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' where an option has a fixed default; mode-dependent ones say theirs in the help."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def wants_lm(argv) -> bool:
    """Whether argv selects the LM workflow (--dataset stdlib/text or --model llama-*)."""
    from . import is_lm
    vals = {}
    for i, a in enumerate(argv):
        name, eq, value = a.partition("=")
        for flag in ("--dataset", "--model"):
            if len(name) > 2 and name.startswith("--") and flag.startswith(name):   # argparse's abbreviations too
                if eq:
                    vals[flag] = value
                elif i + 1 < len(argv):
                    vals[flag] = argv[i + 1]
    return is_lm(vals.get("--dataset"), vals.get("--model"))


def parser():
    p = _Parser(prog="python -m opt_fast.train --dataset stdlib", formatter_class=_Formatter,
                description="Pretrain or fine-tune a Llama language model (transformers, random init, offline) "
                "with OPT block-orthogonal layers, AdamW or Muon. Needs pip install 'opt-fast[lm]'. "
                "Multi-process: torchrun --nproc_per_node N -m opt_fast.train --dataset stdlib ...")
    a = p.add_argument
    a("--model", default=D.model, help=f"{', '.join(SIZES)} (~1.85 M / ~10.6 M parameters)")
    a("--dataset", default=D.dataset, help="stdlib (Python's standard-library sources) or text (with --corpus)")
    a("--corpus", default=None, help="stdlib, or a text file / folder of text files")
    a("--corpus-mb", type=float, default=None, help="use only the first N MB of the train split (quick runs)")
    a("--tokenizer", default=D.tokenizer, help="bpe (byte-level BPE trained locally, cached) or bytes")
    a("--vocab-size", type=int, default=None, help="BPE vocabulary (default 4096 tiny, 8192 small)")
    a("--cache-dir", default=None, help="tokenizer / token cache (default $OPT_FAST_CACHE or ~/.cache/opt_fast/lm)")
    a("--method", default=D.method, help=", ".join(METHODS) + " (peft-* fine-tuning only)")
    a("--optimizer", default=D.optimizer, help=", ".join(OPTIMIZERS))
    a("--block-size", type=int, default=D.block_size, help="OPT block size b of the block-orthogonal layers")
    a("--sides", default=None, help="in, out or both (default both; in when fine-tuning)")
    a("--merge-every", type=int, default=None, help="merge-then-reinitialize every N steps (default 50; 0 = "
      "never, the fine-tuning default)")
    a("--terms", type=int, default=None, help="Neumann terms of cayley_neumann (default 5; 3 when fine-tuning = "
      "PEFT OFT's default series)")
    a("--fresh-w0", action="store_true", help="W0 = a fresh N(0, 1/in) draw, not the model's own init")
    a("--steps", type=int, default=D.steps, help="optimizer steps (the schedule's length)")
    a("--batch-size", type=int, default=D.batch_size, help="global batch in sequences (split across ranks)")
    a("--seq-len", type=int, default=D.seq_len, help="tokens per training sequence")
    a("--lr", type=float, default=None, help="peak lr (default 2e-3; 1e-3 fine-tuning)")
    a("--opt-lr", type=float, default=None, help="peak lr of the OPT rotation parameters (default 5e-3; = --lr "
      "when fine-tuning)")
    a("--weight-decay", type=float, default=None, help="AdamW/Muon decoupled decay of the plain 2-D weights "
      "(default 0.1; 0 when fine-tuning)")
    a("--warmup", type=int, default=None, help="warmup steps (default 10%% of --steps); cosine to 10%% after")
    a("--clip", type=float, default=D.clip, help="global gradient-norm clip (0 = off)")
    a("--autocast", default=D.autocast, help="bf16: forward passes under torch.autocast (bfloat16 GEMMs; the "
      "rotations and their maps stay float32)")
    a("--grad-checkpointing", action="store_true", help="recompute each decoder layer in backward (Hugging "
      "Face's non-reentrant gradient checkpointing): less activation memory, one more forward")
    a("--eval-every", type=int, default=D.eval_every, help="validation loss every N steps (and at the end)")
    a("--val-tokens", type=int, default=D.val_tokens, help="validation tokens per evaluation")
    a("--seed", type=int, default=D.seed, help="model init and data order")
    a("--device", default=D.device, help="cpu, cuda, cuda:N")
    a("--threads", type=int, default=None, help="torch intra-op threads (default: 1 on CPU unless "
      "OMP_NUM_THREADS is set)")
    a("--out", default=None, help="run folder (metrics.json, checkpoint.pt, model/ = merged safetensors)")
    a("--save-every", type=int, default=D.save_every, metavar="N", help="checkpoint every N steps (and at the end)")
    a("--resume", default=None, metavar="PATH", help="continue from a checkpoint.pt")
    a("--stop-after", type=int, default=None, metavar="STEP", help="stop after this step (schedule uses --steps)")
    a("--from-checkpoint", default=None, metavar="PATH", help="fine-tune a pretraining run (its folder, "
      "checkpoint.pt or model/) on the held-out fine-tuning slice")
    a("--lora-r", type=int, default=D.lora_r, help="rank of --method peft-lora")
    a("--compare", default=None, metavar="M1,M2,...", help="run each method (method or method+optimizer, e.g. "
      "none+adamw,none+muon,cayley) with the same budget; table + plot in --out")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar (default: shown)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = vars(parser().parse_args(argv))
    compare = args.pop("compare")
    cfg = LMConfig(**args)
    from .. import checkpoint as ckpt
    try:
        if compare is not None:
            from .compare import run_compare
            run_compare(cfg, [m.strip() for m in compare.split(",") if m.strip()], argv)
            return 0
        ckpt.refuse_overwrite(cfg.out, cfg.resume)
        from .loop import train_lm
        train_lm(cfg)
    except KeyboardInterrupt:
        return ckpt.interrupted(cfg.out, cfg.resume, argv, compare is not None)
    return 0
