"""Model surgery: ``convert`` swaps nn.Linear / nn.Conv1d / nn.Conv2d / nn.MultiheadAttention for OPT layers
(or, with a block size, nn.Linear for block-orthogonal layers), ``merge`` swaps them back for plain layers
holding the effective weight (inference, export). transformers' ``Conv1D`` (GPT-2's linear layer, weight
stored [in, out]) is taken as the nn.Linear it is, and merged back into a Conv1D."""
import copy
import warnings
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from . import attention as _attention
from .attention import OPTMultiheadAttention
from .block import SIDES, OPTBlockLinear
from .block_methods import BLOCK_METHODS, get_block_method
from .group import Grouping, group_layers
from .layers import OPTConv1d, OPTConv2d, OPTLayer, OPTLinear
from .methods import METHODS, get_method, normalize_init

_OPT_MODULES = (OPTLayer, OPTBlockLinear, OPTMultiheadAttention)

_TARGETS = {nn.Linear: OPTLinear, nn.Conv1d: OPTConv1d, nn.Conv2d: OPTConv2d,
            nn.MultiheadAttention: OPTMultiheadAttention}


def _is_gpt_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2, OpenAI GPT, ImageGPT): y = x W + b with W [in, out], a transposed Linear.
    Recognised by class without importing transformers."""
    kind = type(module)
    return (kind.__name__ == "Conv1D" and kind.__module__.split(".")[0] == "transformers"
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2)


def _as_linear(module: nn.Module) -> Tuple[int, int, torch.Tensor]:
    """(in_features, out_features, weight in PyTorch layout [out, in, ...]) of an nn.Linear (or a module
    with a weight) or a transformers Conv1D."""
    if _is_gpt_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1], module.weight.mT
    return getattr(module, "in_features", None), getattr(module, "out_features", None), module.weight


def _why_not(module: nn.Module, block: bool = False) -> Optional[str]:
    """None if ``module`` can become an OPT layer, else the reason it cannot."""
    kind = type(module)
    if _is_gpt_conv1d(module):
        return None
    if block and kind in _TARGETS and kind is not nn.Linear:
        return f"{kind.__name__}: block-orthogonal layers (block_size set) replace nn.Linear only"
    if kind not in _TARGETS:
        base = next((t.__name__ for t in _TARGETS if isinstance(module, t)), None)
        if base is not None:  # e.g. MultiheadAttention's out_proj, converted with its parent
            return (f"{kind.__name__} is a subclass of nn.{base}; only exact nn.Linear/Conv1d/Conv2d/"
                    f"MultiheadAttention are converted (an attention's out_proj is converted with it)")
        return (f"{kind.__name__} is not supported (only nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention "
                f"and transformers' Conv1D)")
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
            if (isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention)) or _is_gpt_conv1d(m))
            and not isinstance(m, _OPT_MODULES) and id(m) not in inside_attention}


def _tied_to(model: nn.Module) -> Dict[int, List[Tuple[str, nn.Module]]]:
    """id(parameter) -> (name, module) of every module holding it (a shared module under each of its names)."""
    owners: Dict[int, List[Tuple[str, nn.Module]]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append((name, m))
    return owners


def _tied_reason(module: nn.Module, owners) -> Optional[str]:
    w = getattr(module, "weight", None) if not isinstance(module, nn.MultiheadAttention) else None
    others = [n for n, m in owners.get(id(w), ()) if m is not module] if isinstance(w, torch.Tensor) else []
    if others:
        return (f"its weight is tied to the weight of {others[0] or '<root>'!r} (an OPT layer's weight is "
                f"W0 Rᵀ: converting it would untie them)")
    return None


def _carry_over(module: nn.Module, new: nn.Module) -> nn.Module:
    """A frozen weight (requires_grad=False) freezes the new layer's rotation parameters, a frozen bias its
    bias: layers left out of training stay out."""
    if isinstance(module, nn.MultiheadAttention):
        return new
    if not module.weight.requires_grad:
        for name, p in new.named_parameters():
            if name != "bias":
                p.requires_grad_(False)
    if module.bias is not None and not module.bias.requires_grad:
        new.bias.requires_grad_(False)
    return new


def _keep_bias_tie(module: nn.Module, new: nn.Module, owners) -> None:
    """A bias that other modules share stays shared: the converted layer holds that same Parameter."""
    b = None if isinstance(module, nn.MultiheadAttention) else module.bias
    if b is None or len({id(m) for _, m in owners.get(id(b), ())}) < 2:
        return
    if b.shape == new.bias.shape and b.dtype == new.bias.dtype and b.device == new.bias.device:
        new.bias = b


def _has_hooks(module: nn.Module) -> bool:
    """Hooks a user registered (not those of a grouping's forward session)."""
    return any(not isinstance(getattr(hook, "__self__", None), Grouping)
               for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
               for hook in (getattr(module, h, None) or {}).values())


def _excluded(name: str, exclude) -> bool:
    return any(name == e or name.startswith(e + ".") for e in exclude)


def _names(spec) -> Optional[List[str]]:
    if spec is None:
        return None
    return [spec] if isinstance(spec, str) else list(spec)


def _build(module: nn.Module, keep_weights: bool, layer_kwargs) -> nn.Module:
    if isinstance(module, nn.MultiheadAttention):
        return OPTMultiheadAttention.from_module(module, keep_weights, **layer_kwargs)
    w = module.weight
    kwargs = dict(layer_kwargs, bias=module.bias is not None, device=w.device, dtype=w.dtype)
    if isinstance(module, nn.Linear) or _is_gpt_conv1d(module):
        fan_in, fan_out, w = _as_linear(module)
        layer = OPTLinear(fan_in, fan_out, **kwargs)
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


def _build_block(module: nn.Module, keep_weights: bool, block_kwargs) -> OPTBlockLinear:
    fan_in, fan_out, w = _as_linear(module)
    layer = OPTBlockLinear(fan_in, fan_out, bias=module.bias is not None, device=w.device, dtype=w.dtype,
                           **block_kwargs)
    if keep_weights:  # R = I at the start: the layer computes what the module did
        with torch.no_grad():
            layer.W0.copy_(w)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
    layer.train(module.training)
    return layer


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    # Every place the module is registered (a shared module is replaced under each of its names: not
    # named_children, which lists a module registered twice in one parent once).
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
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
    transformers' Conv1D (GPT-2) counts as the nn.Linear it is; merge() gives a Conv1D back.

    method: see opt_fast.nn.METHODS (default "gram_schmidt"). init: None / "default" (the released code's
    init, except orth_reg: a random orthogonal R), "reference" (the released code's init) or "identity"
    (R = I; the default when keep_weights=True).
    keep_weights: use each layer's pretrained weight as W0 (and copy its bias) with R = I, so the
    converted model computes what the original did (orthogonal fine-tuning); otherwise W0 is a fresh
    random draw. include: qualified module names to convert (each must be convertible, else
    ValueError); default all. exclude: names to leave alone, with everything inside them (a single name
    may be a string). Modules that cannot be converted (also a Linear whose weight is tied to another
    module's, e.g. an LM head tied to the embedding) are skipped with a warning that says why
    (strict=True makes that an error). A frozen weight or bias (requires_grad=False) stays frozen; a bias
    shared by several modules stays shared (the converted layers hold that same Parameter and its values).
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
        if (init not in (None, "identity", "zero") or stochastic is not None or num_reflectors is not None
                or sample != "coordinate"):
            raise ValueError("opt_fast.nn.convert: block layers (block_size set) start at R = I and take no "
                             "init / stochastic / sample / num_reflectors options")
        block_kwargs = dict(method=method, block_size=block_size, sides=sides, permute=permute, terms=terms,
                            recompute=recompute)
    else:
        block_only = [f"{k}={v!r}" for k, v, default in (("sides", sides, "both"), ("permute", permute, True),
                                                          ("terms", terms, 5), ("recompute", recompute, False))
                      if v != default]
        if block_only:
            raise ValueError(f"opt_fast.nn.convert: {', '.join(block_only)} set without block_size: these are "
                             "options of block-orthogonal layers (pass block_size=b)")
        method = "gram_schmidt" if method is None else method
        if isinstance(method, str) and method in BLOCK_METHODS and method not in METHODS:
            raise ValueError(f"opt_fast.nn.convert: method {method!r} is a map of block-orthogonal layers only: "
                             "pass block_size=b")
        get_method(method)
        if num_reflectors is not None and method != "householder":
            raise ValueError(f"opt_fast.nn.convert: num_reflectors is an option of method 'householder', not "
                             f"{method!r}")
        init = normalize_init("identity" if init is None and keep_weights else init)
        layer_kwargs = dict(method=method, init=init, stochastic=stochastic, sample=sample,
                            num_reflectors=num_reflectors)
    candidates = _candidates(model)
    owners = _tied_to(model)
    exclude, include = _names(exclude), _names(include)
    named = dict(model.named_modules())
    unknown = [e for e in exclude if e not in named]
    if unknown:
        warnings.warn(f"opt_fast.nn.convert: exclude names no module of the model: {unknown}", stacklevel=2)
    if include is not None:
        for name in include:
            if name not in named:
                raise ValueError(f"opt_fast.nn.convert: no module named {name!r} in the model")
            reason = ("it is already an OPT layer" if isinstance(named[name], _OPT_MODULES)
                      else _why_not(named[name], block) or _tied_reason(named[name], owners))
            if reason is not None:
                raise ValueError(f"opt_fast.nn.convert: cannot convert {name!r}: {reason}")
        candidates = {name: named[name] for name in include}

    skipped: List[Tuple[str, str]] = []
    if include is None:   # converting a converted model keeps its OPT layers: say so, a method may differ
        opt = [n for n, m in model.named_modules() if isinstance(m, _OPT_MODULES) and not _excluded(n, exclude)]
        outer = [n for n in opt if not any(n.startswith(o + ".") or (o == "" and n) for o in opt if o != n)]
        skipped += [(n, f"already an OPT layer ({type(model.get_submodule(n)).__name__}; merge() first to "
                        f"convert it anew)") for n in outer]
    converted, hooked = {}, []
    for name, module in candidates.items():
        if _excluded(name, exclude):
            continue
        reason = _why_not(module, block) or _tied_reason(module, owners)
        if reason is not None:
            skipped.append((name, reason))
            continue
        if id(module) not in converted:
            new = (_build_block(module, keep_weights, block_kwargs) if block
                   else _build(module, keep_weights, layer_kwargs))
            if _is_gpt_conv1d(module):
                new._opt_merge_as = type(module)  # merge() gives a Conv1D again (checkpoints keep their layout)
            _keep_bias_tie(module, new, owners)
            converted[id(module)] = (module, _carry_over(module, new))
            if _has_hooks(module):
                hooked.append(name or "<root>")
    if hooked:
        warnings.warn(f"opt_fast.nn.convert: hooks registered on {hooked} stay with the replaced module(s); "
                      "register them again on the converted layer(s)", stacklevel=2)
    if skipped:
        msg = "; ".join(f"{n or '<root>'}: {r}" for n, r in skipped)
        if strict:
            raise ValueError(f"opt_fast.nn.convert: cannot convert {msg}")
        warnings.warn(f"opt_fast.nn.convert: left {len(skipped)} layer(s) unconverted: {msg}", stacklevel=2)
    if not converted:
        warnings.warn("opt_fast.nn.convert: no layer was converted (nothing convertible outside `exclude`: "
                      "nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention, transformers' Conv1D"
                      + (", nn.Linear only with block_size" if block else "") + ")", stacklevel=2)

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
    merge_as = layer.__dict__.get("_opt_merge_as")
    if merge_as is not None:  # transformers' Conv1D(nf, nx): weight [in, out]
        plain = merge_as(layer.out_features, layer.in_features).to(device=w.device, dtype=w.dtype)
        w = w.mT
    elif isinstance(layer, (OPTLinear, OPTBlockLinear)):
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


def _warn_hooks(names: List[str]) -> None:
    if names:
        warnings.warn(f"opt_fast.nn.merge: hooks registered on {[n or '<root>' for n in names]} are not carried "
                      "to the plain layers that replace them; register them again there", stacklevel=3)


def merge(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose OPT layers are plain nn.Linear / nn.Conv1d / nn.Conv2d /
    nn.MultiheadAttention holding the effective weight (W = W0 Rᵀ, or R_out W0 R_inᵀ for block layers; no
    rotation computed at inference; exportable). ``model`` is left untouched."""
    if isinstance(model, (OPTLayer, OPTBlockLinear)):
        _warn_hooks([""] if _has_hooks(model) else [])
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
    layers = [m for m in merged.modules() if isinstance(m, (OPTLayer, OPTBlockLinear))]
    _warn_hooks([n for n, m in merged.named_modules() if isinstance(m, _OPT_MODULES) and _has_hooks(m)])
    for layer in layers:
        _replace(merged, layer, _plain(layer))
    return merged
