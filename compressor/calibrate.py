"""Streaming statistics over calibration data, and the least-squares refit of a factor stack.

Two data-aware steps (Zhang, Zou, He, Sun, "Accelerating Very Deep Convolutional Networks for
Classification and Detection", TPAMI 2016):

* :func:`collect_statistics` runs the calibration batches once through the uncompressed model and
  accumulates, per layer, the float64 second-moment matrices its methods whiten with. Memory is
  bounded by the Gram sizes (and one chunk of patches), never by the dataset.
* :func:`refit_last_factor_` solves, in closed form, for the last factor of a stack so that the
  stack fed by the *compressed* upstream network reproduces the *original* layer's output on the
  original network (the asymmetric objective): layers are processed in execution order, so errors
  made upstream are absorbed downstream instead of compounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor import layers, tree
from compressor.decompose.whiten import Whitening, whitening

Batches = Callable[[], Iterable[torch.Tensor]]
"""A callable that returns a fresh iterable of input batches each time (several passes are made)."""

Pairs = Iterable[tuple[torch.Tensor, torch.Tensor, int]]
"""Per batch and call of a conv: (its output in the original network, its input in the compressed
network, the batch size on a batch's first call and 0 after), as :func:`paired_calls` yields them."""

_CHUNK_ELEMENTS = 1 << 24  # patches materialized at once, per chunk of a batch


class _Stop(Exception):
    """Raised by a hook once a layer has seen all its calls: the rest of the forward is not needed."""


@dataclass
class LayerStatistics:
    """Sums of outer products per statistic kind, and how many vectors went into each."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def covariance(self, kind: str) -> torch.Tensor:
        return self.sums[kind] / max(self.counts[kind], 1)

    def whitening(self, kind: str) -> Whitening:
        return whitening(self.covariance(kind))


def _chunks(inputs: torch.Tensor, width: int) -> Iterable[torch.Tensor]:
    per_sample = max(inputs[0].numel() * width, 1)
    step = max(1, _CHUNK_ELEMENTS // per_sample)
    return inputs.split(step)


def _gram(kind: str, conv: nn.Conv2d, extractor: nn.Conv2d | None, inputs: torch.Tensor) -> tuple[torch.Tensor, int]:
    channels = conv.in_channels
    if extractor is None:
        vectors = inputs.transpose(0, 1).reshape(channels, -1).to(torch.float64)
        return vectors @ vectors.T, vectors.shape[1]
    patches = extractor(inputs)
    taps = patches.shape[1] // channels
    if kind == "channel_patches":
        per_channel = patches.reshape(patches.shape[0], channels, taps, -1).permute(1, 2, 0, 3)
        per_channel = per_channel.reshape(channels, taps, -1).to(torch.float64)
        return per_channel @ per_channel.transpose(1, 2), per_channel.shape[2]
    vectors = patches.transpose(0, 1).reshape(channels * taps, -1).to(torch.float64)
    return vectors @ vectors.T, vectors.shape[1]


def _input_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


def _to_model(batch: torch.Tensor, model: nn.Module) -> torch.Tensor:
    parameter = tree.first_parameter(model)
    if parameter is None:
        return batch
    return batch.to(device=parameter.device, dtype=parameter.dtype)


def collect_statistics(
    model: nn.Module, requests: dict[str, Sequence[str]], batches: Batches
) -> dict[str, LayerStatistics]:
    """One pass of ``batches`` through ``model``; for each conv named in ``requests``, the sums of the
    statistic kinds listed there (see ``methods.STATISTICS``), over every call of the conv."""
    statistics = {name: LayerStatistics() for name in requests}
    handles = []

    def hook(name: str, conv: nn.Conv2d, extractors: dict[str, nn.Conv2d | None]):
        def accumulate(module, args, kwargs):
            inputs = _input_of(args, kwargs).detach()
            stats = statistics[name]
            for kind, extractor in extractors.items():
                width = 1 if extractor is None else extractor.out_channels // conv.in_channels
                for chunk in _chunks(inputs, width):
                    gram, count = _gram(kind, conv, extractor, chunk)
                    stats.sums[kind] = stats.sums[kind] + gram if kind in stats.sums else gram
                    stats.counts[kind] = stats.counts.get(kind, 0) + count

        return accumulate

    try:
        for name, kinds in requests.items():
            conv = model.get_submodule(name)
            extractors = {kind: layers.patch_extractor_for(conv, kind) for kind in dict.fromkeys(kinds)}
            handles.append(conv.register_forward_pre_hook(hook(name, conv, extractors), with_kwargs=True))
        with torch.no_grad():
            for batch in batches():
                model(_to_model(batch, model))
    finally:
        for handle in handles:
            handle.remove()
    return statistics


def _captured_calls(model: nn.Module, module: nn.Module, batch: torch.Tensor, calls: int, *, output: bool) -> list[torch.Tensor]:
    """Inputs (or outputs) of ``module``'s first ``calls`` calls in one forward of ``model`` on ``batch``."""
    seen: list[torch.Tensor] = []

    def stop_when_done() -> None:
        if len(seen) >= calls:
            raise _Stop

    if output:
        def record(mod, args, result):
            seen.append(result.detach())
            stop_when_done()

        handle = module.register_forward_hook(record)
    else:
        def record(mod, args, kwargs):
            seen.append(_input_of(args, kwargs).detach())
            stop_when_done()

        handle = module.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model(_to_model(batch, model))
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen


def paired_calls(
    original: nn.Module, working: nn.Module, name: str, calls: int, batches: Batches
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Per batch and call of conv ``name``: (its output in ``original``, its input in ``working``,
    the batch size, given with the first call of each batch only and 0 after)."""
    target_conv, input_conv = original.get_submodule(name), working.get_submodule(name)
    with torch.no_grad():
        for batch in batches():
            targets = _captured_calls(original, target_conv, batch, calls, output=True)
            inputs = _captured_calls(working, input_conv, batch, calls, output=False)
            for index, (target, hidden) in enumerate(zip(targets, inputs)):
                yield target, hidden, batch.shape[0] if index == 0 else 0


@dataclass
class Refit:
    """Calibration output error of a stack before and after the refit (relative to the original output)."""

    error_before: float
    error_after: float
    samples: int


def _last_factor_patches(last: nn.Conv2d) -> nn.Conv2d | None:
    plain = last.kernel_size == (1, 1) and last.stride == (1, 1) and last.padding in ((0, 0), "valid")
    if plain:
        return None
    return layers.build_patch_extractor(
        last, last.kernel_size, stride=last.stride, padding=last.padding, dilation=last.dilation
    )


def _columns(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.transpose(0, 1).reshape(tensor.shape[1], -1).to(torch.float64)


def refit_last_factor_(
    original: nn.Module,
    working: nn.Module,
    name: str,
    stack: nn.Sequential,
    calls: int,
    batches: Batches,
    ridge: float = 1e-6,
) -> Refit:
    """Refit ``stack[-1]`` (weight, and bias if it has one) in place by least squares.

    ``original`` must still hold the original conv at ``name``; ``working`` too (the conv is what
    the hooks catch), with every layer processed so far already replaced by its stack. The target is
    the original conv's output on the original network's activations; the regressors are the
    stack's last-factor inputs computed from the working network's activations. The new weights are
    kept only if they lower the calibration error, so the refit can never make it worse.
    """
    return fit_last_factor_(stack, paired_calls(original, working, name, calls, batches), ridge)


def _dense_weights(last: nn.Conv2d) -> torch.Tensor:
    """``last``'s weight as one (out, groups * in/groups * kh * kw) matrix: block diagonal when grouped."""
    weight = last.weight.detach().to(torch.float64).cpu().reshape(last.out_channels, -1)
    if last.groups == 1:
        return weight
    rows, columns = last.out_channels // last.groups, weight.shape[1]
    return torch.block_diag(*(weight[g * rows:(g + 1) * rows] for g in range(last.groups))).reshape(
        last.out_channels, last.groups * columns
    )


def _grouped_weights(dense: torch.Tensor, last: nn.Conv2d) -> torch.Tensor:
    """The inverse of :func:`_dense_weights`: the diagonal blocks, in ``last.weight``'s shape."""
    rows, columns = last.out_channels // last.groups, dense.shape[1] // last.groups
    blocks = [dense[g * rows:(g + 1) * rows, g * columns:(g + 1) * columns] for g in range(last.groups)]
    return torch.cat(blocks).reshape(last.weight.shape)


def _solve_blocks(gram: torch.Tensor, cross: torch.Tensor, groups: int, with_bias: bool, ridge: float) -> torch.Tensor:
    """Ridge least squares for ``[W | b]``; with groups, each output group regresses on its own input
    group (and the constant) only, so the solution keeps the grouped conv's block structure."""
    outputs, size = cross.shape
    features = size - int(with_bias)
    solved = torch.zeros_like(cross)
    rows, columns = outputs // groups, features // groups
    for g in range(groups):
        index = list(range(g * columns, (g + 1) * columns)) + ([features] if with_bias else [])
        block = gram[index][:, index]
        scale = float(torch.diagonal(block).mean().clamp_min(1e-300))
        eye = torch.eye(len(index), dtype=torch.float64)
        part = torch.linalg.solve(block + ridge * scale * eye, cross[g * rows:(g + 1) * rows, index].T).T
        solved[g * rows:(g + 1) * rows, index] = part
    return solved


def fit_last_factor_(stack: nn.Sequential, pairs: Pairs, ridge: float = 1e-6) -> Refit:
    """The least squares of :func:`refit_last_factor_` on ``pairs``, wherever they come from
    (re-run networks, or :mod:`compressor.walk`'s one pass). ``stack[:-1]`` runs as a module, so
    it may hold any layers, not only convs."""
    head, last = stack[:-1], stack[-1]
    extractor = _last_factor_patches(last)
    with_bias = last.bias is not None
    size = last.weight[0].numel() * last.groups + int(with_bias)
    gram = torch.zeros(size, size, dtype=torch.float64)
    cross = torch.zeros(last.out_channels, size, dtype=torch.float64)
    energy, samples = 0.0, 0
    with torch.no_grad():
        for target, hidden, batch_size in pairs:
            samples += batch_size
            features = head(hidden)
            patches = _columns(features if extractor is None else extractor(features))
            if with_bias:
                patches = torch.cat([patches, torch.ones(1, patches.shape[1], dtype=torch.float64)])
            wanted = _columns(target)
            gram += (patches @ patches.T).cpu()
            cross += (wanted @ patches.T).cpu()
            energy += float((wanted**2).sum())
    current = _dense_weights(last)
    if with_bias:
        current = torch.cat([current, last.bias.detach().to(torch.float64).cpu()[:, None]], dim=1)

    def squared_error(weights: torch.Tensor) -> float:
        return energy - 2 * float((weights * cross).sum()) + float(((weights @ gram) * weights).sum())

    solved = _solve_blocks(gram, cross, last.groups, with_bias, ridge)
    before, after = squared_error(current), squared_error(solved)
    if not torch.isfinite(solved).all() or after >= before:
        after, solved = before, current
    else:
        with torch.no_grad():
            last.weight.copy_(_grouped_weights(solved[:, : solved.shape[1] - int(with_bias)], last).to(last.weight.dtype))
            if with_bias:
                last.bias.copy_(solved[:, -1].to(last.bias.dtype))
    denominator = max(energy, 1e-300)
    return Refit(max(before, 0.0) ** 0.5 / denominator**0.5, max(after, 0.0) ** 0.5 / denominator**0.5, samples)
