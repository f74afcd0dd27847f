"""torch.distributed for opt_fast.train under torchrun (WORLD_SIZE > 1): the process group (gloo on CPU, nccl
on GPU), sums of per-rank counters, and BatchNorm running statistics averaged over the ranks."""
import os
from typing import List

import torch
from torch import nn


class Dist:
    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world > 1
        self.own_group = False
        if self.enabled:
            import torch.distributed as dist
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
                self.own_group = True

    def all_sum(self, values: List[float], device) -> List[float]:
        if not self.enabled:
            return values
        import torch.distributed as dist
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def average_bn_stats(self, model: nn.Module):
        """Average the BatchNorm running statistics over the ranks (each rank normalised its own shard),
        so every replica evaluates and checkpoints the same model."""
        if not self.enabled:
            return
        import torch.distributed as dist
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                for b in (m.running_mean, m.running_var):
                    dist.all_reduce(b)
                    b.div_(self.world)

    def close(self):
        if self.own_group:
            import torch.distributed as dist
            dist.destroy_process_group()
