"""Does FSDP2 (torch.distributed.fsdp.fully_shard) train an OPT-converted Llama on gloo (CPU)?

    torchrun --nproc_per_node 2 scripts/lm_fsdp_probe.py [--per-layer] [--ungroup] [--shard-w0] [--reset] [--method ...]

Builds llama-tiny (random tokens, no corpus needed), converts its projections (sides both, b = 32),
shards it with fully_shard (the root only, or each decoder layer and the root), trains a few AdamW steps
on the same global batch as one process would, with a merge_and_reset (of both) half way, and prints
each step's loss next to the single-process loss computed by every rank on an unsharded copy. Exits 1
when they differ by more than 1e-4 relative (tests/test_lm.py runs it). --shard-w0 calls
opt_fast.nn.prepare_fsdp first, and checks that every W0 is then a shard (its local part 1/world of it).
--reset re-initialises every block layer (reset_parameters, seeded) after sharding, and the unsharded copy
alike: the sharded draw must give the same values.
"""
import argparse
import copy
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="cayley_neumann")
    p.add_argument("--per-layer", action="store_true", help="fully_shard each decoder layer, then the root")
    p.add_argument("--ungroup", action="store_true", help="remove the grouped block calls (one call per layer)")
    p.add_argument("--shard-w0", action="store_true", help="prepare_fsdp: W0 a frozen parameter, sharded too")
    p.add_argument("--reset", action="store_true", help="reset_parameters() of the block layers after sharding")
    p.add_argument("--steps", type=int, default=6)
    a = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.fsdp import fully_shard

    from opt_fast.nn import OPTBlockLinear, merge_and_reset, prepare_fsdp, ungroup
    from opt_fast.train.lm.model import build_llama, convert_projections
    model = convert_projections(build_llama("llama-tiny", 512, 64, seed=0), a.method, 32, "both",
                                keep_weights=True, seed=0)
    if a.ungroup:
        ungroup(model)
    ref = copy.deepcopy(model)
    if a.shard_w0:
        prepare_fsdp(model)
    if a.per_layer:
        for layer in model.model.layers:
            fully_shard(layer)
    fully_shard(model)
    if a.shard_w0:
        from torch.distributed.tensor import DTensor
        for m in model.modules():
            if isinstance(m, OPTBlockLinear):
                W0 = m.W0
                if not (isinstance(W0, DTensor) and W0.to_local().numel() * world == W0.numel()):
                    raise SystemExit(f"rank {rank}: W0 of {m} is not sharded in {world}: {type(W0).__name__}")
    if a.reset:   # the same seeded draws on the sharded model and on its unsharded copy
        for net in (model, ref):
            torch.manual_seed(7)
            for m in net.modules():
                if isinstance(m, OPTBlockLinear):
                    m.reset_parameters()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=5e-3)
    ref_opt = torch.optim.AdamW([q for q in ref.parameters() if q.requires_grad], lr=5e-3)
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for step in range(a.steps):
        if step == a.steps // 2:   # merge-then-reinitialize, sharded and not
            merge_and_reset(model, opt)
            merge_and_reset(ref, ref_opt)
        x = torch.randint(0, 512, (4, 65), generator=g)
        mine = x[rank * 4 // world:(rank + 1) * 4 // world]
        loss = F.cross_entropy(model(input_ids=mine[:, :-1]).logits.flatten(0, 1), mine[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        lv = loss.detach().clone()
        dist.all_reduce(lv)
        ref_loss = F.cross_entropy(ref(input_ids=x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        mine_loss, one = lv.item() / world, ref_loss.item()
        worst = max(worst, abs(mine_loss - one) / abs(one))
        if rank == 0:
            print(f"step {step}: FSDP2 loss {mine_loss:.6f}  one process {one:.6f}", flush=True)
    dist.destroy_process_group()
    if rank == 0:
        print(f"max relative difference {worst:.2e}", flush=True)
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
