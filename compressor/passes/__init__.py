"""Graph passes: :mod:`match` plans (read-only), :mod:`rewrite` edits (the only mutator)."""

from compressor.passes.functional import FunctionalConv, match_functional_convs
from compressor.passes.match import LayerPlan, plan_layers
from compressor.passes.rewrite import lift_functional_convs_, rewrite_, swap_
from compressor.passes.trace import Traced, trace

__all__ = [
    "FunctionalConv",
    "LayerPlan",
    "lift_functional_convs_",
    "match_functional_convs", "Traced", "plan_layers", "rewrite_", "swap_", "trace"]
