"""The device guard of the Triton launchers.

Triton launches on the *current* CUDA device and that device's current stream. A launcher called with
tensors on cuda:1 while cuda:0 is current would launch there (an illegal address, or a silent wrong
answer with peer access), so every launcher runs with its input's device made current, which also makes
the stream the input device's current stream: the one PyTorch's own ops on that tensor use.
"""
import functools

import torch


def on_input_device(fn):
    """Decorate a launcher whose first argument is a tensor: run it with that tensor's device current."""
    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        if x.device.type != "cuda":
            return fn(x, *args, **kwargs)
        with torch.cuda.device(x.device):
            return fn(x, *args, **kwargs)
    return wrapper
