"""OPT layers, model conversion and grouped batching (see docs/methods.md).

    model = opt_fast.nn.convert(model, method="gram_schmidt")   # swap Linear/Conv for OPT layers
    ...train...
    plain = opt_fast.nn.merge(model)                            # plain layers with W = R W0
"""
from .convert import convert, merge
from .group import Grouping, LayerGroup, group_layers, ungroup
from .layers import OPTConv1d, OPTConv2d, OPTLayer, OPTLinear, resample
from .methods import INITS, METHODS
from .regularization import orth_reg_loss

__all__ = ["OPTLayer", "OPTLinear", "OPTConv1d", "OPTConv2d", "convert", "merge", "group_layers", "ungroup",
           "Grouping", "LayerGroup", "resample", "orth_reg_loss", "METHODS", "INITS"]
