"""Building the trained model of a run (pretraining or fine-tuning variant), and merging + exporting it.

Fine-tuning (``--from-checkpoint PATH``: a pretraining run folder, its checkpoint.pt, or an exported
model folder) starts from the pretrained weights and trains on the held-out fine-tuning slice:

* ``none``: full fine-tuning (every parameter, AdamW).
* a block method (cayley_neumann, cayley, gram_schmidt, householder, lowdin): OFT-style,
  ``convert(..., keep_weights=True, sides="in", block_size=32)`` on every attention / MLP projection;
  only the rotations train (embeddings, norms and lm_head frozen, as PEFT does).
* ``peft-lora``: PEFT LoRA, r = 16 (alpha 32, no dropout) on the same projections.
* ``peft-oft``: PEFT OFT at its defaults (oft_block_size 32, Cayley–Neumann with 5 terms) on the same
  projections. PEFT's 5-term series I + 2Q + 2Q² + 2Q³ + Q⁴ is opt_fast's terms = 3, the fine-tuning
  default, so both compute the same rotation.

Export: merge to plain nn.Linear (opt_fast.nn.merge, or PEFT's merge_and_unload), ``save_pretrained``
(safetensors) with the tokenizer, reload with ``from_pretrained`` and compare logits.
"""
import json
import os

import torch
from torch import nn

from opt_fast.nn import BLOCK_METHODS, merge

from . import require
from .config import fail
from .model import PROJECTIONS, build_llama, convert_projections

TOKENIZER_FILE = "opt_fast_tokenizer.json"


def _quiet():
    """No tqdm bars from save_pretrained / from_pretrained in the run's log."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()


def build_pretrain(cfg, vocab_size: int) -> nn.Module:
    model = build_llama(cfg.model, vocab_size, cfg.seq_len, cfg.seed)
    if cfg.method != "none":
        model = convert_projections(model, cfg.method, cfg.block_size, cfg.sides, keep_weights=not cfg.fresh_w0,
                                    terms=cfg.terms, seed=cfg.seed)
    return model


def load_base(path: str):
    """(plain LlamaForCausalLM, tokenizer json, the pretraining run's config dict or {}) from PATH."""
    require("transformers")
    from transformers import LlamaForCausalLM
    _quiet()
    given = path
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        fail(f"--from-checkpoint {given}: no such file or folder (give a pretraining run's folder, its "
             f"checkpoint.pt or its model/ folder)")
    folder = os.path.join(path, "model") if os.path.isdir(os.path.join(path, "model")) else path
    # a run folder without model/ (stopped with --stop-after) holds the run's own config.json, not a
    # Hugging Face one: take its checkpoint.pt
    run_folder_ckpt = folder == path and os.path.isfile(os.path.join(path, "checkpoint.pt"))
    if os.path.isdir(folder) and os.path.isfile(os.path.join(folder, "config.json")) and not run_folder_ckpt:
        tok_path = os.path.join(folder, TOKENIZER_FILE)
        if not os.path.isfile(tok_path):
            fail(f"--from-checkpoint {path}: {TOKENIZER_FILE} missing next to the model (not an opt_fast export)")
        with open(tok_path) as f:
            tok_json = f.read()
        cfg = {}
        run_cfg = os.path.join(os.path.dirname(folder), "config.json")
        if folder != path or os.path.isfile(run_cfg):
            try:
                with open(run_cfg) as f:
                    cfg = json.load(f)
            except (OSError, ValueError):
                cfg = {}
        try:
            return LlamaForCausalLM.from_pretrained(folder), tok_json, cfg
        except Exception as e:
            fail(f"--from-checkpoint {given}: the model in {folder} does not load ({type(e).__name__}: "
                 f"{(str(e).splitlines() or [''])[0]})")
    ckpt_path = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    if not os.path.isfile(ckpt_path):
        fail(f"--from-checkpoint {given}: the folder holds neither model/ nor checkpoint.pt (give a pretraining "
             f"run's folder, its checkpoint.pt or its model/ folder)")
    from .. import checkpoint as ckpt
    state = ckpt.load(ckpt_path, flag="--from-checkpoint")
    ckpt.check_format(state, ckpt_path, ckpt.LM_FORMAT, flag="--from-checkpoint")
    from .config import FINETUNE_ONLY, LMConfig
    saved = LMConfig(**state["config"])
    if saved.method in FINETUNE_ONLY:   # its checkpoint holds the PEFT-wrapped model: the export is the plain one
        fail(f"--from-checkpoint {given} is a {saved.method} fine-tuning run's checkpoint (PEFT adapters); start "
             f"from its merged model/ folder ({os.path.join(os.path.dirname(ckpt_path), 'model')}) instead")
    model = build_pretrain(saved, state["vocab_size"])
    model.load_state_dict(state["model"])
    return plain_model(model, saved.method), state["tokenizer"], state["config"]


def attach(model: nn.Module, cfg) -> nn.Module:
    """Apply the fine-tuning variant ``cfg.method`` to the pretrained plain model."""
    if cfg.method == "none":
        return model
    if cfg.method in BLOCK_METHODS:
        model = convert_projections(model, cfg.method, cfg.block_size, cfg.sides, keep_weights=True,
                                    terms=cfg.terms, seed=cfg.seed)
        for n, p in model.named_parameters():
            p.requires_grad_(n.endswith("_blocks"))
        return model
    require("peft")
    import peft
    if cfg.method == "peft-lora":
        conf = peft.LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0,
                               target_modules=list(PROJECTIONS))
    else:
        conf = peft.OFTConfig(target_modules=list(PROJECTIONS))
    torch.manual_seed(cfg.seed + 2)
    return peft.get_peft_model(model, conf)


def plain_model(model: nn.Module, method: str) -> nn.Module:
    """A plain LlamaForCausalLM with the trained weights folded in (a copy for OPT; PEFT merges in place)."""
    if method.startswith("peft-"):
        return model.merge_and_unload()
    return merge(model) if method != "none" else model


@torch.no_grad()
def export(model: nn.Module, method: str, tokenizer, folder: str, sample: torch.Tensor) -> dict:
    """Merge, save_pretrained (safetensors) + tokenizer, reload; logits of ``sample`` before and after."""
    from transformers import LlamaForCausalLM
    _quiet()
    was_training = model.training
    model.eval()
    logits_model = model(input_ids=sample).logits
    plain = plain_model(model, method)
    plain.eval()
    logits_merged = plain(input_ids=sample).logits
    plain.save_pretrained(folder, safe_serialization=True)
    with open(os.path.join(folder, TOKENIZER_FILE), "w") as f:
        f.write(tokenizer.to_json())
    if hasattr(tokenizer, "hf_tokenizer"):
        tokenizer.hf_tokenizer().save_pretrained(folder)
    reloaded = LlamaForCausalLM.from_pretrained(folder).eval()
    logits_reloaded = reloaded(input_ids=sample).logits
    model.train(was_training)
    types = sorted({type(m).__name__ for m in reloaded.modules() if isinstance(m, nn.Linear)})
    return {"folder": folder, "linear_types": types,
            "reload_identical": bool(torch.equal(logits_merged, logits_reloaded)),
            "max_abs_logit_diff_reload": float((logits_merged - logits_reloaded).abs().max()),
            "max_abs_logit_diff_merge": float((logits_model - logits_merged).abs().max())}
