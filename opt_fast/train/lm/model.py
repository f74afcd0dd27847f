"""Llama language models built from a ``transformers.LlamaConfig`` (random init, nothing downloaded), and
the OPT conversion of their projections.

Sizes (untied embeddings and lm_head; widths multiples of 32 so every side takes b = 32 blocks whole):

    llama-tiny   hidden 128, 4 layers, 4 heads, MLP 352, vocab 4096:   1.85 M parameters (CI / tests)
    llama-small  hidden 256, 8 layers, 8 heads, MLP 704, vocab 8192:  10.6 M parameters

POET-style pretraining converts every attention / MLP projection (q, k, v, o, gate, up, down: the
weights inside the blocks) with sides="both"; the embeddings and lm_head stay plain (they are lookup
tables / a classifier whose scale must move, which rotations cannot do). W0 is the model's own random
init (keep_weights=True; std 0.02) unless --fresh-w0 asks for the block layer's own N(0, 1/in) draw.
"""
from typing import Dict

import torch
from torch import nn

from ..guards import fail
from . import require

SIZES: Dict[str, dict] = {
    "llama-tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=352,
                       vocab_size=4096),
    "llama-small": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, intermediate_size=704,
                        vocab_size=8192),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_config(size: str, vocab_size: int, seq_len: int):
    require("transformers")
    from transformers import LlamaConfig
    if size not in SIZES:
        fail(f"unknown --model {size!r}; LM sizes: {', '.join(SIZES)}")
    kw = dict(SIZES[size], vocab_size=vocab_size)
    return LlamaConfig(**kw, num_key_value_heads=kw["num_attention_heads"], max_position_embeddings=seq_len,
                       tie_word_embeddings=False, use_cache=False, attention_dropout=0.0,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)


def build_llama(size: str, vocab_size: int, seq_len: int, seed: int) -> nn.Module:
    require("transformers")
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(size, vocab_size, seq_len))
    model.config.use_cache = False
    return model


def projection_names(model: nn.Module):
    """Qualified names of the attention / MLP projections (the layers OPT converts)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in PROJECTIONS]


def convert_projections(model: nn.Module, method: str, block_size: int, sides: str, keep_weights: bool,
                        terms: int = 5, seed: int = 0) -> nn.Module:
    """convert(...) every projection to OPTBlockLinear. The permutation seeds (and a fresh W0) are drawn
    from ``seed``, so every DDP rank builds the same layers."""
    from opt_fast.nn import convert
    torch.manual_seed(seed + 1)
    try:
        return convert(model, method=method, block_size=block_size, sides=sides, keep_weights=keep_weights,
                       include=projection_names(model), terms=terms)
    except ValueError as e:
        fail(str(e))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameters (trainable only, or all plus the frozen W0 of block layers: the model's size)."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
    if not trainable_only:   # W0 is a buffer (a parameter, counted above, after prepare_fsdp)
        from opt_fast.nn import OPTBlockLinear
        n += sum(m.W0.numel() for m in model.modules()
                 if isinstance(m, OPTBlockLinear) and not isinstance(m.W0, nn.Parameter))
    return n
