"""Graph passes: :mod:`match` plans (read-only), :mod:`rewrite` edits (the only mutator)."""

from compressor.passes.computed import ComputedConv, match_computed_convs
from compressor.passes.functional import FunctionalConv, match_functional_convs
from compressor.passes.match import LayerPlan, plan_layers
from compressor.passes.rewrite import fold_computed_convs_, lift_functional_convs_, rewrite_, swap_
from compressor.passes.trace import Traced, trace

__all__ = [
    "ComputedConv",
    "FunctionalConv",
    "fold_computed_convs_",
    "match_computed_convs",
    "LayerPlan",
    "lift_functional_convs_",
    "match_functional_convs", "Traced", "plan_layers", "rewrite_", "swap_", "trace"]
