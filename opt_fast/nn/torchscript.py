"""TorchScript (torch.jit.script / torch.jit.trace, both deprecated by torch) cannot compile the OPT layers'
Python (grouped op calls, caches, custom autograd): it failed deep inside the compiler ("unordered_map::at",
"try blocks aren't supported", "graphs differed"). Refuse it up front and say what works instead."""
import torch

_INSTEAD = ("use torch.compile or torch.export.export (both handle OPT layers), or opt_fast.nn.merge(model) for "
            "plain layers holding the effective weight (inference, ONNX), which TorchScript handles as usual")


class RefuseScripting:
    """Mixin: torch.jit.script calls ``__prepare_scriptable__`` on every submodule before compiling."""

    def __prepare_scriptable__(self):
        raise RuntimeError(f"opt_fast.nn: torch.jit.script cannot compile {type(self).__name__}; {_INSTEAD}")


def refuse_tracing(layer) -> None:
    if torch.jit.is_tracing():
        raise RuntimeError(f"opt_fast.nn: torch.jit.trace cannot record {type(layer).__name__}; {_INSTEAD}")
