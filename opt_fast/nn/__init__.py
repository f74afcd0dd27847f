"""OPT layers, model conversion and grouped batching (see docs/methods.md).

    model = opt_fast.nn.convert(model, method="gram_schmidt")   # swap Linear/Conv/MultiheadAttention for OPT
    ...train...
    plain = opt_fast.nn.merge(model)                            # plain layers with W = R W0

    model = opt_fast.nn.convert(llm, method="cayley_neumann", block_size=256, sides="both")  # POET-style
    opt_fast.nn.merge_and_reset(model, optimizer)               # every T steps (or MergeSchedule)
"""
from .attention import OPTMultiheadAttention
from .block import OPTBlockLinear, prepare_fsdp
from .block_methods import BLOCK_METHODS
from .convert import convert, merge
from .group import BlockGroup, Grouping, LayerGroup, group_layers, ungroup
from .layers import OPTConv1d, OPTConv2d, OPTLayer, OPTLinear, resample
from .merging import MergeSchedule, merge_and_reset
from .methods import INITS, METHODS
from .regularization import orth_reg_loss

__all__ = ["OPTLayer", "OPTLinear", "OPTConv1d", "OPTConv2d", "OPTMultiheadAttention", "OPTBlockLinear", "convert",
           "merge", "merge_and_reset", "MergeSchedule", "group_layers", "ungroup", "Grouping", "LayerGroup",
           "BlockGroup", "prepare_fsdp", "resample", "orth_reg_loss", "METHODS", "INITS", "BLOCK_METHODS"]
