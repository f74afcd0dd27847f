"""Training step time of the LM variants, interleaved (round-robin steps, so machine load hits all alike).

    python scripts/lm_step_timing.py --mode finetune [--model llama-small] [--rounds 20] [--batch 8] [--seq 256]
    python scripts/lm_step_timing.py --mode pretrain --variants none+adamw,none+muon,cayley_neumann,cayley

Builds the model once per variant (random weights: the step time does not depend on them), exactly as
the CLI does (same conversion, parameter groups and optimizers), then times forward + backward +
optimizer step of each in turn. finetune: full fine-tuning (none), OFT-style block layers (sides="in",
b = 32, terms 3 = PEFT's 5-term series), PEFT LoRA r = 16 and PEFT OFT at its defaults (b = 32), all on
the same projections. pretrain: POET-style block layers (sides="both") and plain AdamW / Muon. Prints the
median and interquartile range per variant and the ratios to the reference variants.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-small")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mode", default="finetune", choices=("finetune", "pretrain"))
    p.add_argument("--variants", default=None, help="method or method+optimizer, comma-separated")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from opt_fast.train.lm import optim as optim_mod
    from opt_fast.train.lm.config import LMConfig
    from opt_fast.train.lm.finetune import attach, build_pretrain
    from opt_fast.train.lm.model import SIZES, build_llama
    vocab = SIZES[a.model]["vocab_size"]
    ft = a.mode == "finetune"
    refs = ("peft-lora", "peft-oft") if ft else ("none+adamw",)
    variants = a.variants or ("none,cayley_neumann,cayley,peft-lora,peft-oft" if ft else
                              "none+adamw,none+muon,cayley_neumann,cayley,gram_schmidt,householder,lowdin")
    runs = {}
    for v in variants.split(","):
        method, _, optimizer = v.partition("+")
        cfg = LMConfig(model=a.model, method=method, optimizer=optimizer or "adamw", seq_len=a.seq,
                       from_checkpoint="-" if ft else None).resolved()
        model = (attach(build_llama(a.model, vocab, a.seq, seed=0), cfg) if ft else build_pretrain(cfg, vocab))
        opts = optim_mod.build(model, cfg.optimizer, cfg.lr, cfg.opt_lr, cfg.weight_decay)
        runs[v] = (model, opts, [])
    x = torch.randint(0, vocab, (a.batch, a.seq + 1), generator=torch.Generator().manual_seed(0))

    def step(model, opts):
        loss = F.cross_entropy(model(input_ids=x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()

    for r in range(a.rounds + 2):  # two warm-up rounds
        for v, (model, opt, times) in runs.items():
            t0 = time.perf_counter()
            step(model, opt)
            if r >= 2:
                times.append(time.perf_counter() - t0)
    res = {}
    for v, (_, _, times) in runs.items():
        q = statistics.quantiles(times, n=4)
        res[v] = {"median_s": statistics.median(times), "q1_s": q[0], "q3_s": q[2]}
    for v, r in res.items():
        rel = "".join(f"  {r['median_s'] / res[b]['median_s']:.2f}x {b}" for b in refs if b in res)
        print(f"{v:16s} {r['median_s'] * 1e3:8.1f} ms/step (IQR {r['q1_s'] * 1e3:.1f}-{r['q3_s'] * 1e3:.1f}){rel}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": res}, f, indent=1)


if __name__ == "__main__":
    main()
