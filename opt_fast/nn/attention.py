"""OPT for nn.MultiheadAttention: its q, k, v in-projections and its out_proj as four OPT layers.

nn.MultiheadAttention packs its in-projection into one Parameter ([3E, E] ``in_proj_weight``, or
``q/k/v_proj_weight`` when kdim / vdim differ from E) and reads ``out_proj.weight`` itself, so its Linear child
cannot just be swapped. ``OPTMultiheadAttention`` is an nn.MultiheadAttention whose projections are OPTLinear
layers ``q_proj`` (E <- E), ``k_proj`` (E <- kdim), ``v_proj`` (E <- vdim) and ``out_proj`` (E <- E), each with
its own R: the packed q/k/v blocks are treated as the three layers they are (one R shared by all three would
only conjugate the attention scores' bilinear form, not rotate q and k independently). ``in_proj_weight``,
``in_proj_bias`` and ``q/k/v_proj_weight`` are the effective weights, computed on access and read-only, so
nn.MultiheadAttention's forward (its fast path included) and nn.TransformerEncoderLayer's fast path run
unchanged on them. Same-shaped projections share one batched op call through group_layers, like any OPT layers.
"""
from typing import Optional

import torch
from torch import Tensor, nn

from .layers import OPTLinear
from .torchscript import RefuseScripting

_DERIVED = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight")


class OPTMultiheadAttention(RefuseScripting, nn.MultiheadAttention):
    """nn.MultiheadAttention's signature plus the OPT options of OPTLinear (method, init, stochastic, sample,
    num_reflectors), applied to each of the four projections."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, method="gram_schmidt", *,
                 init: Optional[str] = None, stochastic: Optional[float] = None, sample: str = "coordinate",
                 num_reflectors: Optional[int] = None, device=None, dtype=None):
        nn.Module.__init__(self)  # not nn.MultiheadAttention's: it would register the packed Parameters
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"opt_fast.nn: OPTMultiheadAttention needs embed_dim > 0 divisible by num_heads > 0, "
                             f"got embed_dim={embed_dim}, num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        opt = dict(method=method, init=init, stochastic=stochastic, sample=sample, num_reflectors=num_reflectors,
                   device=device, dtype=dtype)
        self.q_proj = OPTLinear(embed_dim, embed_dim, bias, **opt)
        self.k_proj = OPTLinear(self.kdim, embed_dim, bias, **opt)
        self.v_proj = OPTLinear(self.vdim, embed_dim, bias, **opt)
        self.out_proj = OPTLinear(embed_dim, embed_dim, bias, **opt)
        if add_bias_kv:
            self.bias_k = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, 1, embed_dim, device=device, dtype=dtype)))
            self.bias_v = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, 1, embed_dim, device=device, dtype=dtype)))
        else:
            self.bias_k = self.bias_v = None
        self._weights = None  # effective weights cached during one forward (see forward)

    # ---- the packed views nn.MultiheadAttention's code reads ----------------------------------------------
    def _cached(self, name: str, compute):
        cache = self.__dict__.get("_weights")
        if cache is None:
            return compute()
        if name not in cache:
            cache[name] = compute()
        return cache[name]

    @property
    def in_proj_weight(self) -> Optional[Tensor]:
        if not self._qkv_same_embed_dim:
            return None
        return self._cached("in", lambda: torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))

    @property
    def in_proj_bias(self) -> Optional[Tensor]:
        if self.q_proj.bias is None:
            return None
        return torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])

    @property
    def q_proj_weight(self) -> Optional[Tensor]:
        return None if self._qkv_same_embed_dim else self._cached("q", lambda: self.q_proj.weight)

    @property
    def k_proj_weight(self) -> Optional[Tensor]:
        return None if self._qkv_same_embed_dim else self._cached("k", lambda: self.k_proj.weight)

    @property
    def v_proj_weight(self) -> Optional[Tensor]:
        return None if self._qkv_same_embed_dim else self._cached("v", lambda: self.v_proj.weight)

    def __setattr__(self, name: str, value) -> None:
        if name in _DERIVED:
            raise AttributeError(f"opt_fast.nn: OPTMultiheadAttention.{name} is computed from the OPT layers "
                                 f"q_proj / k_proj / v_proj and cannot be assigned; set their weights with "
                                 f"load_weight")
        super().__setattr__(name, value)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        # nn.MultiheadAttention.forward reads in_proj_weight up to three times (fast-path checks, then the
        # call): computed once per forward.
        self._weights = {}
        try:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        finally:
            self._weights = None

    # ---- conversion ----------------------------------------------------------------------------------------
    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention, keep_weights: bool = False,
                    **layer_kwargs) -> "OPTMultiheadAttention":
        """An OPT version of ``mha`` (same configuration; bias_k / bias_v copied). keep_weights: its projection
        weights become the W0s (R = I needs init="identity") and its biases are copied, so it computes what
        ``mha`` did."""
        reason = why_not(mha)
        if reason is not None:
            raise ValueError(f"opt_fast.nn: cannot convert nn.MultiheadAttention: {reason}")
        same = mha._qkv_same_embed_dim
        w = mha.in_proj_weight if same else mha.q_proj_weight
        new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
                  add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim, vdim=mha.vdim,
                  batch_first=mha.batch_first, device=w.device, dtype=w.dtype, **layer_kwargs)
        with torch.no_grad():
            if mha.bias_k is not None:
                new.bias_k.copy_(mha.bias_k)
                new.bias_v.copy_(mha.bias_v)
            if keep_weights:
                blocks = mha.in_proj_weight.chunk(3) if same else (mha.q_proj_weight, mha.k_proj_weight,
                                                                    mha.v_proj_weight)
                for layer, block in zip(new._projections(), blocks):
                    layer.load_weight(block.detach())
                new.out_proj.load_weight(mha.out_proj.weight.detach())
                if mha.in_proj_bias is not None:
                    for layer, b in zip(new._projections(), mha.in_proj_bias.chunk(3)):
                        layer.bias.copy_(b)
                    new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new

    def _projections(self):
        return self.q_proj, self.k_proj, self.v_proj

    @torch.no_grad()
    def merged(self) -> nn.MultiheadAttention:
        """A plain nn.MultiheadAttention holding the effective weights (what opt_fast.nn.merge builds)."""
        w = self.q_proj.W0
        plain = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout,
                                      bias=self.q_proj.bias is not None, add_bias_kv=self.bias_k is not None,
                                      add_zero_attn=self.add_zero_attn, kdim=self.kdim, vdim=self.vdim,
                                      batch_first=self.batch_first, device=w.device, dtype=w.dtype)
        if self._qkv_same_embed_dim:
            plain.in_proj_weight.copy_(self.in_proj_weight)
        else:
            for dst, layer in zip((plain.q_proj_weight, plain.k_proj_weight, plain.v_proj_weight), self._projections()):
                dst.copy_(layer.weight)
        plain.out_proj.weight.copy_(self.out_proj.weight)
        if self.q_proj.bias is not None:
            plain.in_proj_bias.copy_(self.in_proj_bias)
            plain.out_proj.bias.copy_(self.out_proj.bias)
        if self.bias_k is not None:
            plain.bias_k.copy_(self.bias_k)
            plain.bias_v.copy_(self.bias_v)
        plain.train(self.training)
        return plain

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, vdim={self.vdim}, "
                f"batch_first={self.batch_first}")


def why_not(mha: nn.MultiheadAttention) -> Optional[str]:
    """None if ``mha`` can become an OPTMultiheadAttention, else the reason it cannot."""
    if (mha.in_proj_bias is None) != (mha.out_proj.bias is None):
        return "its in-projection and out_proj disagree on having a bias"
    return None


def out_projections(model: nn.Module) -> set:
    """ids of the out_proj Linear of every plain nn.MultiheadAttention in ``model``: converted with their parent."""
    return {id(m.out_proj) for m in model.modules()
            if isinstance(m, nn.MultiheadAttention) and not isinstance(m, OPTMultiheadAttention)}
