"""The layers' settings in their state_dict ("<prefix>._extra_state") as a uint8 tensor of JSON.

A tensor, not a dict, because safetensors stores tensors only: Hugging Face's ``save_pretrained`` and the
Trainer's checkpoints go through it. State dicts written before (a dict) still load.
"""
import json
from typing import Any, Dict

import torch


def encode(settings: Dict[str, Any]) -> torch.Tensor:
    return torch.tensor(list(json.dumps(settings, sort_keys=True).encode("utf-8")), dtype=torch.uint8)


def decode(state) -> Dict[str, Any]:
    if isinstance(state, dict):
        return state
    if isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == 1:
        return json.loads(bytes(state.cpu().tolist()).decode("utf-8"))
    raise ValueError(f"opt_fast.nn: unreadable layer settings in the state_dict (expected a uint8 tensor of JSON "
                     f"or a dict), got {type(state).__name__}")
