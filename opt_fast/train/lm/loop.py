"""The LM training loop (pretraining and fine-tuning): see the package docstring for the overview.

Per step: rank r's share of global step s (data.Windows), mean next-token cross-entropy, DDP gradient
average, global-norm clip, optimizer + schedule steps, the merge schedule. The recorded train loss is the
global mean (one all-reduce of a scalar). Every --eval-every steps (and at steps 0 and the last) the
validation loss over the first --val-tokens of the validation split (sharded across ranks, summed) and its
perplexity. Wall time counts training steps only (evaluation and checkpoints excluded), so curves vs wall
time compare methods, not evaluation cost.

Checkpoints (atomic) hold the model (W0, rotations, permutations, merge counts), optimizers, schedulers,
the merge schedule's step count, RNG states, the tokenizer and the history; the data position is the step
itself, so ``--resume`` continues the same curve. Under torchrun the process group is gloo on CPU and NCCL
on GPU; DDP runs with broadcast_buffers=False (W0 and the permutations change only at merges, which every
rank computes identically from the same seeds; after each merge a fingerprint of those buffers is
compared across ranks and a mismatch stops the run).
"""
import contextlib
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from opt_fast.nn import MergeSchedule, OPTBlockLinear

from .. import checkpoint as ckpt
from ..core import rng_state, set_rng_state
from ..guards import step_failed
from ..distributed import Dist
from . import data as data_mod
from . import finetune as ft
from . import optim as optim_mod
from .config import LMConfig, fail, validate
from .model import count_parameters

FORMAT = "opt_fast.train.lm/1"
_RESUME_KEYS = ("model", "method", "optimizer", "corpus", "corpus_mb", "tokenizer", "vocab_size", "seed", "steps",
                "batch_size", "seq_len", "block_size", "sides", "merge_every", "terms", "fresh_w0", "lr", "opt_lr",
                "weight_decay", "warmup", "clip")


def _progress(step, steps, loss, tok_s, val, enabled):
    if not enabled:
        return
    w = 20
    k = int(w * step / steps)
    v = f" val {val:.3f}" if val is not None else ""
    sys.stderr.write(f"\r  [{'#' * k}{'.' * (w - k)}] {step}/{steps} loss {loss:.3f}{v} {tok_s:,.0f} tok/s ")
    if step == steps:
        sys.stderr.write("\n")
    sys.stderr.flush()


def autocast_context(autocast, device):
    """torch.autocast for --autocast bf16 (the block layers' maps run in float32 inside it), else none."""
    if autocast == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, windows: data_mod.Windows, n_windows: int, batch: int, dist, device, autocast=None) -> float:
    """Mean next-token loss over the first n_windows windows (rank r takes every world-th one)."""
    was = model.training
    model.eval()
    mine = list(range(dist.rank, min(n_windows, windows.count), dist.world))
    total = count = 0.0
    for i in range(0, len(mine), batch):
        x = windows.stack(mine[i:i + batch]).to(device)
        with autocast_context(autocast, device):
            logits = model(input_ids=x[:, :-1]).logits
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum"))
        count += x[:, 1:].numel()
    total, count = dist.all_sum([total, count], device)
    model.train(was)
    return total / max(count, 1.0)


def block_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, OPTBlockLinear)]


@torch.no_grad()
def spectrum_check(model) -> dict:
    """Per block layer: max_i |s_i(W) − s_i(W0)| / s_i(W0) and the same over s_max(W0), where W is the
    effective weight and W0 the frozen weight of the last merge (svdvals in float64)."""
    per, per_norm = {}, {}
    for n, m in block_layers(model):
        s0 = torch.linalg.svdvals(m.W0.double())
        s = torch.linalg.svdvals(m.effective_weight().double())
        per[n] = float(((s - s0).abs() / s0.clamp_min(1e-300)).max())
        per_norm[n] = float((s - s0).abs().max() / s0.max())
    return {"max_rel": max(per.values()) if per else None,
            "max_rel_to_norm": max(per_norm.values()) if per_norm else None, "per_layer": per}


def _spectrum_summary(final: dict, at_merges: list) -> dict:
    """The check at every merge (the merged weight vs the W0 it replaces) and at the end of training."""
    vals = [m["max_rel"] for m in at_merges] + ([final["max_rel"]] if final["max_rel"] is not None else [])
    return {"max_rel": max(vals) if vals else None, "at_merges": at_merges, "final": final}


def _fingerprint(model, device) -> torch.Tensor:
    parts = []
    for _, m in block_layers(model):
        parts.append(m.W0.double().sum())
        for side in m.sides_used():
            perm = getattr(m, f"{side}_perm")
            if perm is not None:
                parts.append((perm.double() * torch.arange(1, perm.numel() + 1, device=perm.device)).sum())
    return torch.stack(parts).to(device) if parts else torch.zeros(1, dtype=torch.float64, device=device)


def _check_ranks_agree(model, dist, device, step):
    if not dist.enabled:
        return
    import torch.distributed as td
    fp = _fingerprint(model, device)
    lo, hi = fp.clone(), fp.clone()
    td.all_reduce(lo, op=td.ReduceOp.MIN)
    td.all_reduce(hi, op=td.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        fail(f"after the merge at step {step} the ranks hold different W0 / permutations")


def _check_resume(cfg: LMConfig, state) -> None:
    ckpt.check_format(state, cfg.resume, FORMAT)
    saved = state["config"]
    for key in _RESUME_KEYS + ("from_checkpoint",):
        if saved.get(key) != getattr(cfg, key):
            fail(f"--resume {cfg.resume} was written with --{key.replace('_', '-')} {saved.get(key)!r}, this run "
                 f"has {getattr(cfg, key)!r}; pass the same options or start a fresh run")


# ----------------------------------------------------------------------------------------------------------
def train_lm(cfg: LMConfig, return_model: bool = False):
    """Pretrain (or, with from_checkpoint, fine-tune) one Llama as configured; returns the metrics dict."""
    cfg = cfg.resolved()
    validate(cfg)
    from . import require
    require()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif cfg.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # as the CNN CLI: spinning OpenMP threads on a shared CPU cost more than they gain
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {cfg.device} requested but CUDA is not available; use --device cpu")
    dist = Dist(cfg.device)
    try:
        return _train(cfg, dist, return_model)
    finally:
        dist.close()


def _corpus(cfg, dist, tokenizer_json, splits):
    def load():
        return data_mod.prepare(cfg.corpus, cfg.tokenizer, cfg.vocab_size, cfg.corpus_mb, cfg.cache_dir,
                                tokenizer_json, splits)
    if not dist.enabled:
        return load()
    import torch.distributed as td
    corpus = load() if dist.rank == 0 else None  # rank 0 fills the cache, the others then read it
    td.barrier()
    return corpus if corpus is not None else load()


def _device(name: str, dist) -> torch.device:
    if not (dist.enabled and name.startswith("cuda")):
        return torch.device(name)
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per rank
    torch.cuda.set_device(local)
    return local


def _train(cfg: LMConfig, dist, return_model: bool):
    device = _device(cfg.device, dist)
    state = None
    if cfg.resume:
        state = ckpt.load(cfg.resume)
        _check_resume(cfg, state)
    main = dist.rank == 0
    if main and cfg.resume and not cfg.out:
        print(f"opt_fast.train: warning: --resume without --out: this run saves no checkpoint, metrics or model "
              f"(add --out FOLDER, e.g. --out {os.path.dirname(os.path.abspath(cfg.resume))})", file=sys.stderr,
              flush=True)
    if cfg.batch_size % dist.world:
        fail(f"--batch-size {cfg.batch_size} must be a multiple of the number of processes ({dist.world})")

    base = base_cfg = None
    tokenizer_json = state["tokenizer"] if state is not None else None
    if cfg.finetune:
        base, base_tok, base_cfg = ft.load_base(cfg.from_checkpoint)
        tokenizer_json = tokenizer_json or base_tok
    splits = ("finetune_train", "finetune_validation") if cfg.finetune else ("train", "validation")
    corpus = _corpus(cfg, dist, tokenizer_json, splits)
    train_w = data_mod.Windows(corpus.tokens[splits[0]], cfg.seq_len, splits[0])
    val_w = data_mod.Windows(corpus.tokens[splits[1]], cfg.seq_len, splits[1])
    n_val = min(val_w.count, max(1, cfg.val_tokens // cfg.seq_len))

    if cfg.finetune:
        if base.config.vocab_size != corpus.vocab_size:
            fail(f"--from-checkpoint model has vocabulary {base.config.vocab_size}, its tokenizer {corpus.vocab_size}")
        if base_cfg.get("model", cfg.model) != cfg.model:
            fail(f"--from-checkpoint was pretrained as --model {base_cfg.get('model')}, this run has --model {cfg.model}")
        model = ft.attach(base, cfg)
    else:
        model = ft.build_pretrain(cfg, corpus.vocab_size)
    model.to(device)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opts = optim_mod.build(model, cfg.optimizer, cfg.lr, cfg.opt_lr, cfg.weight_decay)
    scheds = optim_mod.schedule(opts, cfg.steps, cfg.warmup)
    merger = MergeSchedule(model, cfg.merge_every, opts[0]) if cfg.merge_every and block_layers(model) else None
    history, losses, spectra, step, train_time = [], [], [], 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        stateful = [*zip(opts, state["optimizers"]), *zip(scheds, state["schedulers"])]
        if merger is not None:
            stateful.append((merger, state["merge_schedule"]))
        for obj, saved in stateful:
            obj.load_state_dict(saved)
        set_rng_state(state["rng"])
        history, losses, spectra = state["history"], state["losses"], state["spectra"]
        step, train_time = state["step"], state["train_time"]
    else:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

    net = model
    if dist.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  broadcast_buffers=False)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params, n_train = count_parameters(model), count_parameters(model, trainable_only=True)
    out = cfg.out
    if main and out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
    if main:
        print(f"{cfg.model} ({n_params / 1e6:.2f} M parameters, {n_train / 1e6:.3f} M trained) method {cfg.method} "
              f"optimizer {cfg.optimizer}{' fine-tuning' if cfg.finetune else ''}; {corpus.files[splits[0]]} files / "
              f"{len(train_w.tokens):,} tokens to train on, {n_val * cfg.seq_len:,} validation tokens; "
              f"vocab {corpus.vocab_size} ({cfg.tokenizer}); {dist.world} process(es)", flush=True)

    def save_checkpoint():
        if not (main and out):
            return
        ckpt.atomic_save({"format": FORMAT, "config": cfg.to_dict(), "step": step, "model": model.state_dict(),
                          "optimizers": [o.state_dict() for o in opts], "schedulers": [s.state_dict() for s in scheds],
                          "merge_schedule": merger.state_dict() if merger else None, "rng": rng_state(),
                          "history": history, "losses": losses, "spectra": spectra, "train_time": train_time,
                          "tokenizer": corpus.tokenizer.to_json(), "vocab_size": corpus.vocab_size},
                         os.path.join(out, "checkpoint.pt"))

    def record(mark_time, mark_tokens, mark_losses):
        val = evaluate(model, val_w, n_val, 2 * cfg.batch_size, dist, device, cfg.autocast)
        tokens = step * cfg.batch_size * cfg.seq_len
        dt = train_time - mark_time
        rec = {"step": step, "tokens": tokens, "train_time": train_time, "val_loss": val,
               "val_ppl": math.exp(min(val, 50.0)),
               "train_loss": float(np.mean(losses[mark_losses:])) if len(losses) > mark_losses else None,
               "tokens_per_s": (tokens - mark_tokens) / dt if dt > 0 else None}
        history.append(rec)
        if main:
            tl = f"train {rec['train_loss']:.4f} " if rec["train_loss"] is not None else ""
            ts = f"{rec['tokens_per_s']:,.0f} tok/s" if rec["tokens_per_s"] else ""
            print(f"\rstep {step}/{cfg.steps} {tl}val {val:.4f} ppl {rec['val_ppl']:.2f} {ts}", flush=True)
        return rec

    last = cfg.stop_after or cfg.steps
    if not history:
        record(0.0, 0, 0)
    # from the last record (not the resumed step): a resumed run's next train loss and tokens/s average over
    # the same steps as an uninterrupted run's
    h = history[-1]
    mark = (h["train_time"], h["tokens"], max(0, len(losses) - (step - h["step"])))
    model.train()
    val_now = history[-1]["val_loss"]
    while step < last:
        t0 = time.perf_counter()
        x = train_w.train_batch(step, cfg.batch_size, cfg.seed, dist.rank, dist.world).to(device)
        phase = "forward"
        try:
            with autocast_context(cfg.autocast, device):
                logits = net(input_ids=x[:, :-1]).logits
            phase = "step (loss, backward, update)"
            loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            optim_mod.step_all(opts, scheds, params, cfg.clip)
        except RuntimeError as e:  # LinAlgError, an op that fails on the current parameters, ...
            step_failed(phase, f"step {step + 1}", f"{cfg.method}, optimizer {cfg.optimizer}", e, model,
                        os.path.join(out, "checkpoint.pt") if out else cfg.resume)
        step += 1
        pause = 0.0
        if merger is not None and (merger.steps + 1) % merger.every == 0:  # the weights this merge folds in
            tp = time.perf_counter()
            sp = spectrum_check(model)
            spectra.append({"step": step, "max_rel": sp["max_rel"], "max_rel_to_norm": sp["max_rel_to_norm"]})
            pause = time.perf_counter() - tp  # a check, not training: kept out of the wall time
        if merger is not None and merger.step():
            _check_ranks_agree(model, dist, device, step)
        lv = dist.all_sum([float(loss.detach())], device)[0] / dist.world
        train_time += time.perf_counter() - t0 - pause
        if not math.isfinite(lv):
            fail(f"loss became {lv} at step {step} (method {cfg.method}, optimizer {cfg.optimizer}); lower --lr")
        losses.append(lv)
        done_tokens = step * cfg.batch_size * cfg.seq_len
        _progress(step, last, lv, (done_tokens - mark[1]) / max(train_time - mark[0], 1e-9), val_now,
                  cfg.progress and main)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val_now = record(*mark)["val_loss"]
            mark = (train_time, done_tokens, len(losses))
        if cfg.save_every and step % cfg.save_every == 0:
            save_checkpoint()
    save_checkpoint()
    final = history[-1]
    if final["step"] != step:   # stopped (--stop-after) between evaluations: the end's own validation
        val = evaluate(model, val_w, n_val, 2 * cfg.batch_size, dist, device, cfg.autocast)
        final = {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}

    metrics = {"config": cfg.to_dict(), "method": cfg.method, "optimizer": cfg.optimizer, "model": cfg.model,
               "finetune": cfg.finetune, "world_size": dist.world, "parameters": n_params,
               "trained_parameters": n_train, "vocab_size": corpus.vocab_size, "steps_done": step,
               "tokens": step * cfg.batch_size * cfg.seq_len, "train_time": train_time,
               "tokens_per_s": step * cfg.batch_size * cfg.seq_len / train_time if train_time > 0 else None,
               "step_time": train_time / step if step else None, "history": history, "losses": losses,
               "final_val_loss": final["val_loss"], "final_val_ppl": final["val_ppl"],
               "spectrum": _spectrum_summary(spectrum_check(model), spectra), "threads": torch.get_num_threads()}
    if step == cfg.steps and main and out:
        sample = val_w.stack(range(min(2, val_w.count))).to(device)[:, :-1]
        metrics["export"] = ft.export(model, cfg.method, corpus.tokenizer, os.path.join(out, "model"), sample)
    if main and out:
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
    if main:
        sp = metrics["spectrum"]["max_rel"]
        print(f"done: {step} steps, {metrics['tokens']:,} tokens in {train_time:.1f} s "
              f"({metrics['tokens_per_s'] or 0:,.0f} tok/s); val loss {metrics['final_val_loss']:.4f} "
              f"ppl {metrics['final_val_ppl']:.2f}" + (f"; spectrum max rel diff {sp:.2e}" if sp is not None else ""),
              flush=True)
    return (metrics, model) if return_model else metrics
