"""Language-model workflow of opt_fast.train (``--dataset stdlib`` / ``--model llama-*``), offline.

* data.py      the corpus (the Python standard library's own sources, or any text file / folder), split
               by file into train / validation / held-out fine-tuning slices, and its tokenizer (a
               byte-level BPE trained locally with ``tokenizers``, or plain bytes), cached as token arrays
* model.py     Hugging Face Llama from a config (llama-tiny, llama-small; random init, nothing downloaded)
* optim.py     AdamW / torch.optim.Muon / SGD with warmup + cosine, OPT parameter groups
* loop.py      pretraining and fine-tuning loop: progress with tokens/s, validation loss and perplexity,
               merge schedule, checkpoints that resume to the same curve, DDP (gloo / NCCL), spectrum check
* finetune.py  fine-tuning variants: full, OFT-style block layers, PEFT LoRA, PEFT OFT; merge + save
* compare.py   --compare: one table and one plot of validation loss vs step and vs wall time

Needs the optional extra ``pip install 'opt-fast[lm]'`` (transformers, tokenizers, safetensors, peft).
"""
import importlib

from ..guards import fail

EXTRA_HINT = "pip install 'opt-fast[lm]'"


def require(*modules: str) -> None:
    """Import-check the optional LM dependencies; a one-line error naming the extra if one is missing."""
    for name in modules or ("transformers", "tokenizers", "safetensors"):
        try:
            importlib.import_module(name)
        except ImportError as e:
            fail(f"the language-model workflow needs the package {name!r}, which is not installed ({e}); "
                 f"install the extra: {EXTRA_HINT}")


def is_lm(dataset: str = None, model: str = None) -> bool:
    """Whether CLI arguments select the LM workflow."""
    return (model or "").startswith("llama-") or dataset in ("stdlib", "text")
