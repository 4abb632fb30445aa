"""Graph passes: :mod:`match` plans (read-only), :mod:`rewrite` edits (the only mutator)."""

from compressor.passes.match import LayerPlan, plan_layers
from compressor.passes.rewrite import rewrite_, swap_
from compressor.passes.trace import Traced, trace

__all__ = ["LayerPlan", "Traced", "plan_layers", "rewrite_", "swap_", "trace"]
