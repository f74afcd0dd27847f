"""Model surgery: ``convert`` swaps nn.Linear / nn.Conv1d / nn.Conv2d for OPT layers, ``merge`` swaps them
back for plain layers holding W = R W0 (inference, export)."""
import copy
import warnings
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from .group import Grouping, group_layers
from .layers import OPTConv1d, OPTConv2d, OPTLayer, OPTLinear
from .methods import get_method, normalize_init

_TARGETS = {nn.Linear: OPTLinear, nn.Conv1d: OPTConv1d, nn.Conv2d: OPTConv2d}


def _why_not(module: nn.Module) -> Optional[str]:
    """None if ``module`` can become an OPT layer, else the reason it cannot."""
    kind = type(module)
    if kind not in _TARGETS:
        base = next((t.__name__ for t in _TARGETS if isinstance(module, t)), None)
        if base is not None:  # e.g. MultiheadAttention's out_proj, whose weight its parent reads directly
            return f"{kind.__name__} is a subclass of nn.{base}; only exact nn.Linear/Conv1d/Conv2d are converted"
        return f"{kind.__name__} is not supported (only nn.Linear, nn.Conv1d, nn.Conv2d)"
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) or isinstance(
            module.weight, nn.parameter.UninitializedParameter):
        return "its weight is not initialised yet (lazy module)"
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups != 1:
            return f"groups={module.groups} (OPT rotates the whole fan-in: groups=1 only)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only 'zeros')"
    return None


def _candidates(model: nn.Module) -> Dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not isinstance(m, OPTLayer)}


def _build(module: nn.Module, keep_weights: bool, layer_kwargs) -> OPTLayer:
    w = module.weight
    kwargs = dict(layer_kwargs, bias=module.bias is not None, device=w.device, dtype=w.dtype)
    if isinstance(module, nn.Linear):
        layer = OPTLinear(module.in_features, module.out_features, **kwargs)
    else:
        layer = _TARGETS[type(module)](module.in_channels, module.out_channels, module.kernel_size,
                                       stride=module.stride, padding=module.padding, dilation=module.dilation,
                                       **kwargs)
    if keep_weights:
        layer.load_weight(w.detach())
        if module.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(module.bias)
    layer.train(module.training)
    return layer


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    # Every place the module is registered (a shared module is replaced everywhere).
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, name, new)


def convert(model: nn.Module, method: str = "gram_schmidt", *, keep_weights: bool = False,
            init: Optional[str] = None, include: Optional[Iterable[str]] = None,
            exclude: Iterable[str] = (), strict: bool = False, group: bool = True,
            stochastic: Optional[float] = None, sample: str = "coordinate",
            num_reflectors: Optional[int] = None) -> nn.Module:
    """Replace ``model``'s nn.Linear / nn.Conv1d / nn.Conv2d (groups=1) by OPT layers, in place.

    method: see opt_fast.nn.METHODS. init: None / "default" (the released code's init, except
    orth_reg: a random orthogonal R), "reference" (the released code's init) or "identity" (R = I; the
    default when keep_weights=True).
    keep_weights: use each layer's pretrained weight as W0 (and copy its bias) with R = I, so the
    converted model computes what the original did (orthogonal fine-tuning); otherwise W0 is a fresh
    He-normal draw. include: qualified module names to convert (each must be convertible, else
    ValueError); default all. exclude: names to leave alone. Modules that cannot be converted are
    skipped with a warning that says why (strict=True makes that an error).
    group: batch same-shaped layers (group_layers). Returns the model (a new OPT layer if ``model``
    itself is a Linear/Conv).
    """
    get_method(method)
    init = normalize_init("identity" if init is None and keep_weights else init)
    layer_kwargs = dict(method=method, init=init, stochastic=stochastic, sample=sample,
                        num_reflectors=num_reflectors)
    candidates = _candidates(model)
    exclude = set(exclude)
    if include is not None:
        include = list(include)
        named = dict(model.named_modules())
        for name in include:
            if name not in named:
                raise ValueError(f"opt_fast.nn.convert: no module named {name!r} in the model")
            reason = "it is already an OPT layer" if isinstance(named[name], OPTLayer) else _why_not(named[name])
            if reason is not None:
                raise ValueError(f"opt_fast.nn.convert: cannot convert {name!r}: {reason}")
        candidates = {name: named[name] for name in include}

    skipped: List[Tuple[str, str]] = []
    converted = {}
    for name, module in candidates.items():
        if name in exclude:
            continue
        reason = _why_not(module)
        if reason is not None:
            skipped.append((name, reason))
            continue
        if id(module) not in converted:
            converted[id(module)] = (module, _build(module, keep_weights, layer_kwargs))
    if skipped:
        msg = "; ".join(f"{n or '<root>'}: {r}" for n, r in skipped)
        if strict:
            raise ValueError(f"opt_fast.nn.convert: cannot convert {msg}")
        warnings.warn(f"opt_fast.nn.convert: left {len(skipped)} layer(s) unconverted: {msg}", stacklevel=2)

    for old, new in converted.values():
        if old is model:
            model = new
        else:
            _replace(model, old, new)
    if group:
        group_layers(model)
    return model


@torch.no_grad()
def _plain(layer: OPTLayer) -> nn.Module:
    w = layer.effective_weight().detach()
    kwargs = dict(bias=layer.bias is not None, device=w.device, dtype=w.dtype)
    if isinstance(layer, OPTLinear):
        plain = nn.Linear(layer.in_features, layer.out_features, **kwargs)
    else:
        kind = nn.Conv2d if isinstance(layer, OPTConv2d) else nn.Conv1d
        plain = kind(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                     padding=layer.padding, dilation=layer.dilation, **kwargs)
    plain.weight.copy_(w)
    if layer.bias is not None:
        plain.bias.copy_(layer.bias)
    plain.train(layer.training)
    return plain


def merge(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose OPT layers are plain nn.Linear / nn.Conv1d / nn.Conv2d holding
    W = R W0 (no R computation at inference; exportable). ``model`` is left untouched."""
    if isinstance(model, OPTLayer):
        return _plain(model)
    merged = copy.deepcopy(model)
    for module in list(merged.modules()):
        grouping = module.__dict__.get("_opt_grouping")
        if isinstance(grouping, Grouping):
            grouping.remove()
    for layer in [m for m in merged.modules() if isinstance(m, OPTLayer)]:
        _replace(merged, layer, _plain(layer))
    return merged
