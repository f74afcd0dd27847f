"""LMConfig: every option of an LM pretraining or fine-tuning run (the CLI maps flags 1:1 onto it)."""
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from opt_fast.nn import BLOCK_METHODS

from ..guards import check_seed, check_threads, fail  # fail: also the LM modules' one-line error
from .model import SIZES
from .optim import OPTIMIZERS

FINETUNE_ONLY = ("peft-lora", "peft-oft")
METHODS = ("none",) + tuple(BLOCK_METHODS) + FINETUNE_ONLY




@dataclass
class LMConfig:
    # what
    model: str = "llama-tiny"
    dataset: str = "stdlib"           # stdlib, or text (with --corpus PATH)
    corpus: Optional[str] = None      # default: stdlib
    corpus_mb: Optional[float] = None  # use only the first N MB of the train split (a tenth for the others)
    tokenizer: str = "bpe"            # bpe or bytes
    vocab_size: Optional[int] = None  # BPE vocabulary; default per model size
    cache_dir: Optional[str] = None
    method: str = "none"
    optimizer: str = "adamw"
    # OPT
    block_size: int = 32
    sides: Optional[str] = None       # default: both (pretraining), in (fine-tuning)
    merge_every: Optional[int] = None  # default: 50 (pretraining), 0 = never (fine-tuning)
    terms: Optional[int] = None       # Neumann terms; default 5 (pretraining), 3 (fine-tuning: PEFT's default series)
    fresh_w0: bool = False            # W0 = the block layer's own N(0, 1/in) draw instead of the model's init
    # budget and recipe
    steps: int = 200
    batch_size: int = 8               # global batch (split across DDP ranks)
    seq_len: int = 256
    lr: Optional[float] = None        # default 2e-3 (pretraining), 1e-3 (fine-tuning)
    opt_lr: Optional[float] = None    # lr of the OPT rotation parameters; default 5e-3 / = lr (fine-tuning)
    weight_decay: Optional[float] = None  # default 0.1 (pretraining), 0 (fine-tuning)
    warmup: Optional[int] = None      # default: 10 % of --steps
    clip: float = 1.0
    autocast: Optional[str] = None    # bf16: forward under torch.autocast (the rotations stay float32)
    grad_checkpointing: bool = False  # recompute each decoder layer in backward (non-reentrant checkpoint)
    # evaluation and run control
    eval_every: int = 50
    val_tokens: int = 65536
    seed: int = 0
    device: str = "cpu"
    threads: Optional[int] = None
    out: Optional[str] = None
    save_every: int = 0               # checkpoint every N steps (and at the end)
    resume: Optional[str] = None
    stop_after: Optional[int] = None  # stop after this step (as if interrupted); the schedule uses --steps
    from_checkpoint: Optional[str] = None  # fine-tune a pretraining run's weights
    lora_r: int = 16
    progress: bool = True

    @property
    def finetune(self) -> bool:
        return self.from_checkpoint is not None

    def resolved(self) -> "LMConfig":
        """A copy with the mode-dependent defaults filled in."""
        ft = self.finetune
        c = dataclasses.replace(self)
        c.corpus = c.corpus or ("stdlib" if c.dataset == "stdlib" else None)
        c.sides = c.sides or ("in" if ft else "both")
        c.merge_every = c.merge_every if c.merge_every is not None else (0 if ft else 50)
        c.terms = c.terms if c.terms is not None else (3 if ft else 5)
        c.lr = c.lr if c.lr is not None else (1e-3 if ft else 2e-3)
        c.opt_lr = c.opt_lr if c.opt_lr is not None else (c.lr if ft else 5e-3)
        c.weight_decay = c.weight_decay if c.weight_decay is not None else (0.0 if ft else 0.1)
        c.warmup = c.warmup if c.warmup is not None else max(1, c.steps // 10)
        if c.vocab_size is None:
            c.vocab_size = SIZES[c.model]["vocab_size"] if c.model in SIZES else 4096
        return c

    def to_dict(self):
        return dataclasses.asdict(self)


def validate(cfg: LMConfig) -> None:
    if cfg.model not in SIZES:
        fail(f"unknown --model {cfg.model!r} for the LM workflow; choose one of {', '.join(SIZES)}")
    if cfg.dataset not in ("stdlib", "text"):
        fail(f"unknown --dataset {cfg.dataset!r} for a Llama model; choose stdlib or text (with --corpus PATH)")
    if cfg.corpus is None:
        fail("--dataset text needs --corpus PATH (a text file or a folder)")
    if cfg.method not in METHODS:
        fail(f"unknown --method {cfg.method!r} for a Llama model; choose one of {', '.join(METHODS)}")
    if cfg.method in FINETUNE_ONLY and not cfg.finetune:
        fail(f"--method {cfg.method} is a fine-tuning method: it needs --from-checkpoint PATH")
    if cfg.optimizer not in OPTIMIZERS:
        fail(f"unknown --optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if cfg.sides not in ("in", "out", "both"):
        fail(f"--sides must be in, out or both, got {cfg.sides!r}")
    for name in ("steps", "batch_size", "seq_len", "block_size", "eval_every", "val_tokens", "lora_r"):
        if getattr(cfg, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.merge_every < 0 or cfg.save_every < 0 or cfg.terms < 0 or cfg.warmup < 0:
        fail("--merge-every, --save-every, --terms and --warmup must be >= 0")
    # written as "not (x > 0)": NaN fails every comparison, and inf is no learning rate
    if not (0 < cfg.lr < math.inf and 0 < cfg.opt_lr < math.inf and 0 <= cfg.weight_decay < math.inf):
        fail(f"--lr and --opt-lr must be finite and > 0, --weight-decay finite and >= 0; got {cfg.lr}, "
             f"{cfg.opt_lr}, {cfg.weight_decay}")
    if cfg.stop_after is not None and not 1 <= cfg.stop_after <= cfg.steps:
        fail(f"--stop-after must be in 1..--steps ({cfg.steps}), got {cfg.stop_after}")
    if cfg.autocast not in (None, "bf16"):
        fail(f"--autocast must be bf16, got {cfg.autocast!r}")
    if cfg.corpus_mb is not None and not 0 < cfg.corpus_mb < math.inf:
        fail(f"--corpus-mb must be finite and > 0, got {cfg.corpus_mb}")
    if not 0 <= cfg.clip < math.inf:
        fail(f"--clip must be finite and >= 0 (0 = off), got {cfg.clip}")
    check_threads(cfg.threads)
    check_seed(cfg.seed)
    if cfg.warmup > cfg.steps:
        fail(f"--warmup {cfg.warmup} is longer than the run (--steps {cfg.steps})")
    from ..guards import check_device
    from ..checkpoint import check_out
    check_device(cfg.device)
    check_out(cfg.out)
