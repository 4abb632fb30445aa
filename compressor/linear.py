"""Input statistics of the ``nn.Linear`` layers a recipe rewrites (``low_rank``, opt-in per rule).

A Linear is the 1x1 conv of :func:`compressor.layers.conv_view` applied at every position of its
input's leading dimensions, so its whitening statistic is the (in x in) second moment of its input
vectors: for a 1x1 conv the ``patches`` that ``low_rank`` whitens with and the ``channels`` are the
same matrix. :func:`compressor.calibrate.collect_statistics` reads conv geometry (kernel, stride,
padding) that a Linear does not have; these hooks ride along on the same pass of the data instead
of running a second one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from compressor import layers
from compressor.calibrate import LayerStatistics


@contextmanager
def linear_statistics(model: nn.Module, requests: dict[str, Sequence[str]]) -> Iterator[dict[str, LayerStatistics]]:
    """While open, every forward of ``model`` adds to the statistics of the Linears named in
    ``requests`` (name -> statistic kinds); the hooks are removed on exit."""
    statistics = {name: LayerStatistics() for name in requests}
    handles = []

    def hook(name: str, kinds: Sequence[str]):
        def accumulate(module, args, kwargs):
            inputs = args[0] if args else kwargs["input"]
            vectors = layers.as_conv_input(inputs.detach()).flatten(1).to(torch.float64)
            gram, stats = vectors.T @ vectors, statistics[name]
            for kind in dict.fromkeys(kinds):
                stats.sums[kind] = stats.sums[kind] + gram if kind in stats.sums else gram
                stats.counts[kind] = stats.counts.get(kind, 0) + vectors.shape[0]

        return accumulate

    try:
        for name, kinds in requests.items():
            module = model.get_submodule(name)
            if type(module) is not nn.Linear:
                raise TypeError(f"Expected an nn.Linear at {name}, got {type(module).__name__}")
            handles.append(module.register_forward_pre_hook(hook(name, kinds), with_kwargs=True))
        yield statistics
    finally:
        for handle in handles:
            handle.remove()
