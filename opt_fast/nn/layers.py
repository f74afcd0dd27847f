"""OPT layers: frozen random neurons W0 (a buffer) rotated by a learned orthogonal R on the fan-in.

In PyTorch weight layout W0 is [out, in, *k]; flattened to V0 [n, d] (rows = neurons, d = fan-in) the
layer uses V = V0 Rᵀ, i.e. every neuron w_j becomes R w_j (docs/methods.md). R comes from the layer's
method (methods.py); layers of one model that share a method and shape are batched by group.py.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair, _single

from . import extra_state
from . import stochastic as _stoch
from .checkpointing import maps_saved_as_they_are
from .methods import METHODS, Method, get_method, normalize_init
from .optimizer_state import clear_state
from .torchscript import RefuseScripting, refuse_tracing

_HALF = (torch.float16, torch.bfloat16)


def apply_keeping_float32(module: nn.Module, fn, recurse: bool, names) -> nn.Module:
    """nn.Module._apply(fn) whose casts to a half dtype leave the named float32/float64 parameters and buffers
    float32 (orthogonality needs float32's precision; a float64 one becomes float32)."""
    tensors = {**module._buffers, **module._parameters}
    keep = {n: tensors[n].detach().clone() for n in names
            if tensors.get(n) is not None and tensors[n].dtype in (torch.float32, torch.float64)}
    grads = {n: tensors[n].grad.detach().clone() for n in keep if tensors[n].grad is not None}
    nn.Module._apply(module, fn, recurse)
    tensors = {**module._buffers, **module._parameters}
    for name, data in keep.items():
        if tensors[name].dtype in _HALF:
            tensors[name].data = data.to(tensors[name].device, torch.float32)
            if name in grads:   # the gradient too (torch cast it with the parameter): optimizers need both alike
                tensors[name].grad = grads[name].to(tensors[name].device, torch.float32)
    return module


def keep_warm_start(buffer: Tensor, R: Tensor) -> None:
    """buffer <- R, the next step's starting guess. Not under torch.func's transforms: they refuse in-place
    writes to captured tensors, and R there may be per-sample (vmap); the op then starts from the last
    guess kept outside them (a guess only: the result is the same)."""
    if not torch._C._are_functorch_transforms_active():
        buffer.copy_(R.detach())


class OPTLayer(RefuseScripting, nn.Module):
    """Shared machinery of OPTLinear / OPTConv1d / OPTConv2d (not used directly).

    OPT options (keyword-only on the concrete layers):
      method: "cayley", "gram_schmidt" (default), "householder", "householder_qr", "lowdin", "ogd",
        "orth_reg" or "none" (see docs/methods.md).
      init: None / "default" (the released code's init, except orth_reg: a random orthogonal R),
        "reference" (the released code's init) or "identity" (R = I; alias "zero").
      stochastic: fraction of the fan-in rotated by stochastic OPT (None = full OPT); sample:
        "coordinate" or "channel". num_reflectors: k for "householder" (default d).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Tuple[int, ...], bias: bool,
                 method, init: Optional[str], stochastic: Optional[float], sample: str,
                 num_reflectors: Optional[int], device, dtype):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.method: Method = get_method(method)
        self.init_mode = normalize_init(init)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.fan_in = d = in_channels * math.prod(kernel_size)
        self.stochastic, self.sample = stochastic, sample
        # options of another method or mode are refused, not ignored (as convert does)
        if num_reflectors is not None and self.method.name != "householder":
            raise ValueError(f"opt_fast.nn: num_reflectors is an option of method 'householder', not "
                             f"{self.method.name!r}")
        if sample not in _stoch.SAMPLES:
            raise ValueError(f"opt_fast.nn: unknown sample {sample!r}; valid: {', '.join(_stoch.SAMPLES)}")

        W0 = torch.empty((out_channels, in_channels) + tuple(kernel_size), **factory)
        self.register_buffer("W0", W0)
        if stochastic is not None:
            if not self.method.stochastic_ok:
                ok = [name for name, m in METHODS.items() if m.stochastic_ok]
                raise ValueError(f"opt_fast.nn: stochastic OPT needs a method whose identity init is exactly "
                                 f"R = I; {self.method.name!r} is not one of {ok}")
            m = _stoch.subset_size(d, in_channels, stochastic, sample)
            self.register_buffer("idx", torch.empty(m, dtype=torch.int64, device=W0.device))
            shape = (m, m)
        else:
            shape = self.method.shape(d, out_channels, num_reflectors)
        # an op-based method's parameter stays float32 in a half-precision layer: the maps need it (and
        # orthogonality needs float32's precision); the weight is formed in float32, then cast
        p_factory = dict(factory, dtype=torch.float32) if self.method.uses_op and W0.dtype in _HALF else factory
        self.register_parameter(self.method.param_name, nn.Parameter(torch.empty(shape, **p_factory)))
        if self.method.warm_start:  # lowdin: the previous step's R, not saved (a speed-up only)
            self.register_buffer("R0", torch.empty(shape, **p_factory), persistent=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self._opt_group = None        # set by group.group_layers: the LayerGroup that batches this layer
        self._opt_group_index = 0
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw what construction draws, in its order (the same values under the same seed): W0, the
        stochastic subset, P by the layer's init, the bias. After ``to_empty`` of a model built on the meta
        device this initialises the layer. It replaces a W0 set by load_weight (convert(keep_weights=True))."""
        d = self.fan_in
        # W0 ~ N(0, 2/d), He-normal on the fan-in and not normalised, as released (docs/methods.md).
        self.W0.normal_(0.0, math.sqrt(2.0 / d) if d else 0.0)
        P = self.learnable
        init = self.init_mode
        if self.stochastic is not None:
            self.idx.copy_(_stoch.sample_indices(d, self.in_channels, self.stochastic, self.sample))
            init = "identity"  # S-OPT starts every P_s at I (docs/methods.md)
        P.copy_(self.method.init(tuple(P.shape), init, dtype=P.dtype, device=P.device))
        if self.method.name == "none":
            P.copy_(self._V0())
        self._refresh_warm_start()
        if self.bias is not None:
            bound = 1.0 / math.sqrt(d) if d else 0.0  # nn.Linear / nn.Conv's default bias init
            self.bias.uniform_(-bound, bound)

    # ---- what the method computes ---------------------------------------------------------------------
    @property
    def learnable(self) -> Tensor:
        """The learnable tensor (P, V, R or weight, depending on the method)."""
        return self._parameters[self.method.param_name]  # not getattr: "weight" is also the property below

    @property
    def direct(self) -> bool:
        """True if the method maps V0 to the weight without forming R (householder with n < d, none)."""
        return self.stochastic is None and self.method.direct(self.fan_in, self.out_channels)

    def _V0(self) -> Tensor:
        return self.W0.reshape(self.out_channels, self.fan_in)

    def _core(self) -> Tensor:
        """R (R_s for stochastic layers), or the weight V itself when ``direct``; from the group's one
        batched call during the grouped model's forward, else from a call of its own."""
        g = self._opt_group
        if g is not None and g.active:
            return g.result(self._opt_group_index)
        with maps_saved_as_they_are():   # (a checkpoint recomputing this layer: checkpointing.py)
            return self._own_core()

    def _own_core(self) -> Tensor:
        P = self.learnable
        if self.direct:
            return self.method.apply(P, self._V0().to(P.dtype))
        if not self.method.warm_start:
            return self.method.rotation(P)
        # Pass a snapshot: the buffer is overwritten below, and must not alias what the op returns.
        R = self.method.rotation(P, self.R0.clone())
        keep_warm_start(self.R0, R)
        return R

    def weight_matrix(self) -> Tensor:
        """The effective weight V = V0 Rᵀ as an [n, d] matrix (in W0's dtype; formed in R's)."""
        refuse_tracing(self)
        core = self._core()
        V0 = self._V0()
        if self.direct:
            return core.to(V0.dtype)
        if self.stochastic is not None:  # rotate the sampled columns, pass the others through
            return V0.index_copy(1, self.idx, (V0.index_select(1, self.idx).to(core.dtype) @ core.mT).to(V0.dtype))
        return (V0.to(core.dtype) @ core.mT).to(V0.dtype)

    def effective_weight(self) -> Tensor:
        """The weight the layer uses, in PyTorch layout [out, in, *k] (what merge() stores)."""
        return self.weight_matrix().reshape(self.W0.shape)

    @property
    def weight(self) -> Tensor:
        """The effective weight [out, in, *k], as nn.Linear / nn.Conv's ``.weight`` (code written for those
        layers, e.g. torch's Transformer fast path, reads it). Computed from the parameters on every access
        (differentiable; in-place changes to it do not reach the layer) and read-only: assigning raises.
        For method "none" it is the learnable Parameter itself (its state_dict key stays ``weight``)."""
        plain = self.__dict__.get("_parameters", {}).get("weight")
        if plain is not None:  # method "none"
            return plain if plain.shape == self.W0.shape else plain.view(self.W0.shape)
        if self.method.name == "none":  # still in __init__: lets register_parameter("weight") proceed
            raise AttributeError("weight")
        try:
            return self.effective_weight()
        except AttributeError as e:  # not swallowed by nn.Module.__getattr__ into "no attribute 'weight'"
            raise RuntimeError(f"opt_fast.nn: computing {type(self).__name__}.weight failed: {e}") from e

    def __setattr__(self, name: str, value) -> None:
        if name == "weight" and "weight" not in self.__dict__.get("_parameters", {}):
            raise AttributeError(
                f"opt_fast.nn: {type(self).__name__}.weight is the effective weight W0 Rᵀ computed from the layer's "
                f"parameters and cannot be assigned; use load_weight(W) to make the layer compute W (it sets W0), "
                f"or change the learnable parameter {self.method.name!r} uses ({self.method.param_name!r})")
        super().__setattr__(name, value)

    def rotation(self) -> Tensor:
        """The full d×d R (identity outside the sampled block for stochastic layers); for diagnostics,
        one op call of its own, no side effects."""
        R = self.method.rotation(self.learnable, self.R0 if self.method.warm_start else None)
        if self.stochastic is None:
            return R
        full = torch.eye(self.fan_in, dtype=R.dtype, device=R.device)
        return full.index_put((self.idx[:, None], self.idx[None, :]), R)

    @torch.no_grad()
    def _refresh_warm_start(self):
        if self.method.warm_start:
            R = self.method.rotation(self.learnable)
            if self.R0.is_meta and not R.is_meta:   # P loaded with assign=True into a meta-built layer
                self.R0 = R
            else:
                self.R0.copy_(R)

    def _apply(self, fn, recurse=True):
        """model.to(torch.bfloat16) / .half(): an op-based method's parameter (and warm start) stay float32,
        as at construction in a half dtype."""
        return apply_keeping_float32(self, fn, recurse,
                                     [self.method.param_name, "R0"] if self.method.uses_op else [])

    # ---- setting weights --------------------------------------------------------------------------------
    @torch.no_grad()
    def load_weight(self, weight: Tensor) -> None:
        """Make the layer compute ``weight`` ([out, in, *k]) now: W0 = weight rotated back by the current
        R (W0 = weight itself when R = I, e.g. init="identity"). Used by convert(keep_weights=True)."""
        if tuple(weight.shape) != tuple(self.W0.shape):
            raise ValueError(f"opt_fast.nn: load_weight expects shape {list(self.W0.shape)}, got {list(weight.shape)}")
        V = weight.reshape(self.out_channels, self.fan_in).to(self.W0)
        if self.method.name == "none":
            self.learnable.copy_(V)
        else:
            R = self.rotation()  # V0 Rᵀ = V  <=>  V0 = V R (R orthogonal, or exactly I)
            if not torch.equal(R, torch.eye(self.fan_in, dtype=R.dtype, device=R.device)):
                if not self.method.orthogonal:
                    raise ValueError(f"opt_fast.nn: load_weight needs R = I for method {self.method.name!r}; "
                                     "use init='identity'")
                V = V.to(R.dtype) @ R
        self.W0.copy_(V.reshape(self.W0.shape))

    @torch.no_grad()
    def resample(self, optimizer=None, generator: Optional[torch.Generator] = None) -> None:
        """Stochastic OPT: merge R_s into W0, reset P_s to I and draw a new subset (see stochastic.py)."""
        if self.stochastic is None:
            raise ValueError(f"opt_fast.nn: resample needs a stochastic OPT layer, got {type(self).__name__} "
                             f"with stochastic=None")
        # Merge: W0 <- the effective weight (only the columns I change).
        self.W0.copy_(self.effective_weight())
        P = self.learnable
        P.copy_(self.method.init(P.shape, "identity", P.dtype, P.device))
        self.idx.copy_(_stoch.sample_indices(self.fan_in, self.in_channels, self.stochastic, self.sample,
                                             generator=generator, device=self.idx.device))
        clear_state(optimizer, P)  # momentum of the old subset means nothing for the new one
        self._refresh_warm_start()

    # ---- state_dict ---------------------------------------------------------------------------------------
    def get_extra_state(self):
        return extra_state.encode({"method": self.method.name, "stochastic": self.stochastic})

    def set_extra_state(self, state):
        state = extra_state.decode(state)
        if state.get("method") != self.method.name:
            raise ValueError(f"opt_fast.nn: state_dict was saved from an OPT layer with method "
                             f"{state.get('method')!r}, but this {type(self).__name__} uses {self.method.name!r}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # torch passes strict=True here even for load_state_dict(strict=False): refuse only a state_dict that
        # sets this layer's weight or rotation without its W0 (a plain layer's, or R for other neurons), not
        # a partial one that leaves them out (torch's missing_keys report W0; strict loading refuses it)
        sets_weight = any(prefix + k in state_dict for k in (self.method.param_name, "weight"))
        if strict and sets_weight and prefix + "W0" not in state_dict:
            hint = (" (it looks like a plain layer's state_dict: use opt_fast.nn.convert(model, "
                    "keep_weights=True) to start from pretrained weights)" if prefix + "weight" in state_dict
                    and self.method.name != "none" else "")
            error_msgs.append(f"opt_fast.nn: {type(self).__name__} at {prefix or '<root>'!r} needs its frozen "
                              f"neurons {prefix + 'W0'!r} in the state_dict{hint}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._refresh_warm_start()

    def extra_repr(self):
        s = f"method={self.method.name!r}, fan_in={self.fan_in}, bias={self.bias is not None}"
        if self.stochastic is not None:
            s += f", stochastic={self.stochastic} ({self.sample}, m={self.idx.numel()})"
        return s


def _method_kwargs(method, init, stochastic, sample, num_reflectors, device, dtype):
    return dict(method=method, init=init, stochastic=stochastic, sample=sample,
                num_reflectors=num_reflectors, device=device, dtype=dtype)


class OPTLinear(OPTLayer):
    """nn.Linear's signature plus the OPT options; y = x Vᵀ + b with V = W0 Rᵀ ([out, in])."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, method="gram_schmidt", *,
                 init: Optional[str] = None, stochastic: Optional[float] = None, sample: str = "coordinate",
                 num_reflectors: Optional[int] = None, device=None, dtype=None):
        super().__init__(in_features, out_features, (), bias,
                         **_method_kwargs(method, init, stochastic, sample, num_reflectors, device, dtype))
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_matrix(), self.bias)


class _OPTConvNd(OPTLayer):
    _ntuple = staticmethod(_pair)
    _conv = staticmethod(F.conv2d)

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                 padding_mode, method, init, stochastic, sample, num_reflectors, device, dtype):
        if groups != 1:
            raise ValueError(f"opt_fast.nn: OPT conv layers need groups=1 (one R on the whole fan-in), "
                             f"got groups={groups}")
        if padding_mode != "zeros":
            raise ValueError(f"opt_fast.nn: OPT conv layers support padding_mode='zeros' only, got {padding_mode!r}")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"opt_fast.nn: padding must be 'same', 'valid' or ints, got {padding!r}")
            if padding == "same" and any(s != 1 for s in self._ntuple(stride)):
                raise ValueError("opt_fast.nn: padding='same' is not supported for strided convolutions")
        kernel_size = self._ntuple(kernel_size)
        super().__init__(in_channels, out_channels, kernel_size, bias,
                         **_method_kwargs(method, init, stochastic, sample, num_reflectors, device, dtype))
        self.kernel_size = kernel_size
        self.stride, self.dilation = self._ntuple(stride), self._ntuple(dilation)
        self.padding = padding if isinstance(padding, str) else self._ntuple(padding)
        self.groups, self.padding_mode = 1, "zeros"

    def forward(self, x: Tensor) -> Tensor:
        return self._conv(x, self.effective_weight(), self.bias, self.stride, self.padding, self.dilation, 1)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, " + super().extra_repr())


class OPTConv1d(_OPTConvNd):
    """nn.Conv1d's signature (groups=1, padding_mode='zeros') plus the OPT options."""
    _ntuple = staticmethod(_single)
    _conv = staticmethod(F.conv1d)

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", method="gram_schmidt", *,
                 init: Optional[str] = None, stochastic: Optional[float] = None, sample: str = "coordinate",
                 num_reflectors: Optional[int] = None, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, method, init, stochastic, sample, num_reflectors, device, dtype)


class OPTConv2d(_OPTConvNd):
    """nn.Conv2d's signature (groups=1, padding_mode='zeros') plus the OPT options."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", method="gram_schmidt", *,
                 init: Optional[str] = None, stochastic: Optional[float] = None, sample: str = "coordinate",
                 num_reflectors: Optional[int] = None, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, method, init, stochastic, sample, num_reflectors, device, dtype)


@torch.no_grad()
def resample(model: nn.Module, optimizer=None, reset_bn: bool = False,
             generator: Optional[torch.Generator] = None) -> int:
    """End an S-OPT episode for every stochastic layer of ``model``; returns how many were resampled.

    optimizer: if given, the optimizer state (momentum) of each P_s is dropped; the released code keeps it.
    reset_bn: reproduce the released code's side effect (gamma=1, beta=0 of the first BatchNorm that
    follows each stochastic layer in module order, before the next OPT layer). Running stats are kept.
    """
    count, pending_bn = 0, False
    for module in model.modules():
        if isinstance(module, OPTLayer):
            pending_bn = False
            if module.stochastic is not None:
                module.resample(optimizer=optimizer, generator=generator)
                count, pending_bn = count + 1, reset_bn
        elif pending_bn and isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            module.weight.fill_(1.0)
            module.bias.zero_()
            pending_bn = False
    return count
