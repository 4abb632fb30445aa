"""Pure tensor math: a conv kernel in, factors out (and back, to measure the error).

No ``nn.Module`` here. Every function computes in float64 and returns tensors in the input's dtype,
on the input's device; one method per module, each citing its paper.
"""

from compressor.decompose.block_term import block_term, block_term_reconstruct
from compressor.decompose.cp import CPDegenerateError, cp, cp_reconstruct
from compressor.decompose.depthwise import depthwise_separable, depthwise_separable_reconstruct
from compressor.decompose.grouped_tucker import grouped_tucker2, grouped_tucker2_reconstruct
from compressor.decompose.low_rank import low_rank, low_rank_reconstruct
from compressor.decompose.spatial import spatial_separable, spatial_separable_reconstruct
from compressor.decompose.tucker import tucker2, tucker2_reconstruct

__all__ = [
    "CPDegenerateError",
    "block_term",
    "block_term_reconstruct",
    "cp",
    "cp_reconstruct",
    "depthwise_separable",
    "depthwise_separable_reconstruct",
    "grouped_tucker2",
    "grouped_tucker2_reconstruct",
    "low_rank",
    "low_rank_reconstruct",
    "spatial_separable",
    "spatial_separable_reconstruct",
    "tucker2",
    "tucker2_reconstruct",
]
