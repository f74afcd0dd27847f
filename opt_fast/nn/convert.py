"""Model surgery: ``convert`` swaps nn.Linear / nn.Conv1d / nn.Conv2d / nn.MultiheadAttention for OPT layers
(or, with a block size, nn.Linear for block-orthogonal layers), ``merge`` swaps them back for plain layers
holding the effective weight (inference, export)."""
import copy
import warnings
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from . import attention as _attention
from .attention import OPTMultiheadAttention
from .block import SIDES, OPTBlockLinear
from .block_methods import get_block_method
from .group import Grouping, group_layers
from .layers import OPTConv1d, OPTConv2d, OPTLayer, OPTLinear
from .methods import get_method, normalize_init

_OPT_MODULES = (OPTLayer, OPTBlockLinear, OPTMultiheadAttention)

_TARGETS = {nn.Linear: OPTLinear, nn.Conv1d: OPTConv1d, nn.Conv2d: OPTConv2d,
            nn.MultiheadAttention: OPTMultiheadAttention}


def _why_not(module: nn.Module, block: bool = False) -> Optional[str]:
    """None if ``module`` can become an OPT layer, else the reason it cannot."""
    kind = type(module)
    if block and kind in _TARGETS and kind is not nn.Linear:
        return f"{kind.__name__}: block-orthogonal layers (block_size set) replace nn.Linear only"
    if kind not in _TARGETS:
        base = next((t.__name__ for t in _TARGETS if isinstance(module, t)), None)
        if base is not None:  # e.g. MultiheadAttention's out_proj, converted with its parent
            return (f"{kind.__name__} is a subclass of nn.{base}; only exact nn.Linear/Conv1d/Conv2d/"
                    f"MultiheadAttention are converted (an attention's out_proj is converted with it)")
        return f"{kind.__name__} is not supported (only nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)"
    if kind is nn.MultiheadAttention:
        return _attention.why_not(module)
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
    inside_attention = _attention.out_projections(model)
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention))
            and not isinstance(m, _OPT_MODULES) and id(m) not in inside_attention}


def _build(module: nn.Module, keep_weights: bool, layer_kwargs) -> nn.Module:
    if isinstance(module, nn.MultiheadAttention):
        return OPTMultiheadAttention.from_module(module, keep_weights, **layer_kwargs)
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


def _build_block(module: nn.Linear, keep_weights: bool, block_kwargs) -> OPTBlockLinear:
    w = module.weight
    layer = OPTBlockLinear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=w.device, dtype=w.dtype, **block_kwargs)
    if keep_weights:  # R = I at the start: the layer computes what the module did
        with torch.no_grad():
            layer.W0.copy_(w)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
    layer.train(module.training)
    return layer


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    # Every place the module is registered (a shared module is replaced everywhere).
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, name, new)


def convert(model: nn.Module, method: Optional[str] = None, *, keep_weights: bool = False,
            init: Optional[str] = None, include: Optional[Iterable[str]] = None,
            exclude: Iterable[str] = (), strict: bool = False, group: bool = True,
            stochastic: Optional[float] = None, sample: str = "coordinate",
            num_reflectors: Optional[int] = None, block_size: Optional[int] = None, sides: str = "both",
            permute: bool = True, terms: int = 5, recompute: bool = False) -> nn.Module:
    """Replace ``model``'s nn.Linear / nn.Conv1d / nn.Conv2d (groups=1) by OPT layers, in place, and each
    nn.MultiheadAttention by an OPTMultiheadAttention (its q, k, v and out projections as OPT layers).

    method: see opt_fast.nn.METHODS (default "gram_schmidt"). init: None / "default" (the released code's
    init, except orth_reg: a random orthogonal R), "reference" (the released code's init) or "identity"
    (R = I; the default when keep_weights=True).
    keep_weights: use each layer's pretrained weight as W0 (and copy its bias) with R = I, so the
    converted model computes what the original did (orthogonal fine-tuning); otherwise W0 is a fresh
    random draw. include: qualified module names to convert (each must be convertible, else
    ValueError); default all. exclude: names to leave alone. Modules that cannot be converted are
    skipped with a warning that says why (strict=True makes that an error).
    group: batch same-shaped layers (group_layers). Returns the model (a new OPT layer if ``model``
    itself is a Linear/Conv).

    block_size=b swaps every nn.Linear for an OPTBlockLinear instead (block-orthogonal rotations of size b
    on the ``sides`` "in", "out" or "both" of W0, conjugated by random permutations if ``permute``;
    method one of opt_fast.nn.BLOCK_METHODS, default "cayley_neumann" with ``terms`` Neumann terms;
    ``recompute`` trades one GEMM per backward for the memory of nn.Linear). Block layers always start at
    R = I. keep_weights=True, sides="in" is OFT-style fine-tuning; sides="both" from a random W0 is
    POET-style training. block_size=None (the default) gives the dense OPT layers above.
    """
    block = block_size is not None
    if block:
        method = "cayley_neumann" if method is None else method
        get_block_method(method)
        if sides not in SIDES:
            raise ValueError(f"opt_fast.nn.convert: sides must be one of {SIDES}, got {sides!r}")
        if init not in (None, "identity", "zero") or stochastic is not None or num_reflectors is not None:
            raise ValueError("opt_fast.nn.convert: block layers (block_size set) start at R = I and take no "
                             "init / stochastic / num_reflectors options")
        block_kwargs = dict(method=method, block_size=block_size, sides=sides, permute=permute, terms=terms,
                            recompute=recompute)
    else:
        method = "gram_schmidt" if method is None else method
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
            reason = ("it is already an OPT layer" if isinstance(named[name], _OPT_MODULES)
                      else _why_not(named[name], block))
            if reason is not None:
                raise ValueError(f"opt_fast.nn.convert: cannot convert {name!r}: {reason}")
        candidates = {name: named[name] for name in include}

    skipped: List[Tuple[str, str]] = []
    if include is None:   # converting a converted model keeps its OPT layers: say so, a method may differ
        opt = [n for n, m in model.named_modules() if isinstance(m, _OPT_MODULES) and n not in exclude]
        outer = [n for n in opt if not any(n.startswith(o + ".") or (o == "" and n) for o in opt if o != n)]
        skipped += [(n, f"already an OPT layer ({type(model.get_submodule(n)).__name__}; merge() first to "
                        f"convert it anew)") for n in outer]
    converted = {}
    for name, module in candidates.items():
        if name in exclude:
            continue
        reason = _why_not(module, block)
        if reason is not None:
            skipped.append((name, reason))
            continue
        if id(module) not in converted:
            new = (_build_block(module, keep_weights, block_kwargs) if block
                   else _build(module, keep_weights, layer_kwargs))
            converted[id(module)] = (module, new)
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
def _plain(layer: nn.Module) -> nn.Module:
    w = layer.effective_weight().detach()
    kwargs = dict(bias=layer.bias is not None, device=w.device, dtype=w.dtype)
    if isinstance(layer, (OPTLinear, OPTBlockLinear)):
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
    """A deep copy of ``model`` whose OPT layers are plain nn.Linear / nn.Conv1d / nn.Conv2d /
    nn.MultiheadAttention holding the effective weight (W = W0 Rᵀ, or R_out W0 R_inᵀ for block layers; no
    rotation computed at inference; exportable). ``model`` is left untouched."""
    if isinstance(model, (OPTLayer, OPTBlockLinear)):
        return _plain(model)
    merged = copy.deepcopy(model)
    for module in list(merged.modules()):
        grouping = module.__dict__.get("_opt_grouping")
        if isinstance(grouping, Grouping):
            grouping.remove()
    if isinstance(merged, OPTMultiheadAttention):
        return merged.merged()
    for attn in [m for m in merged.modules() if isinstance(m, OPTMultiheadAttention)]:
        _replace(merged, attn, attn.merged())
    for layer in [m for m in merged.modules() if isinstance(m, (OPTLayer, OPTBlockLinear))]:
        _replace(merged, layer, _plain(layer))
    return merged
