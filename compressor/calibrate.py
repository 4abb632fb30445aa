"""Streaming statistics over calibration data, and the least-squares refit of a factor stack.

Two data-aware steps (Zhang, Zou, He, Sun, "Accelerating Very Deep Convolutional Networks for
Classification and Detection", TPAMI 2016):

* :func:`collect_statistics` runs the calibration batches once through the uncompressed model and
  accumulates, per layer, the float64 second-moment matrices its methods whiten with: patches
  written straight into im2col columns (:func:`patch_columns`), multiplied in the activations'
  precision one chunk at a time, chunks summed in float64; kinds that read the same patches share
  one product. Memory is bounded by the Gram sizes (and one chunk of patches), never by the dataset.
* :func:`refit_last_factor_` solves, in closed form, for the last factor of a stack so that the
  stack fed by the *compressed* upstream network reproduces the *original* layer's output on the
  original network (the asymmetric objective): layers are processed in execution order, so errors
  made upstream are absorbed downstream instead of compounding.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from compressor import layers, tree
from compressor.decompose.whiten import Whitening, whitening

Batches = Callable[[], Iterable[torch.Tensor]]
"""A callable that returns a fresh iterable of input batches each time (several passes are made)."""

Pairs = Iterable[tuple[torch.Tensor, torch.Tensor, int]]
"""Per batch and call of a conv: (its output in the original network, its input in the compressed
network, the batch size on a batch's first call and 0 after), as :func:`paired_calls` yields them."""

_CHUNK_ELEMENTS = 1 << 24  # patch columns materialized at once (64 MiB in float32)

Geometry = tuple[tuple[int, int], tuple[int, int], "tuple[int, int] | str", tuple[int, int]]
"""(kernel size, stride, padding, dilation) of the patches a statistic reads; 1x1 for plain channels."""

CHANNELS: Geometry = ((1, 1), (1, 1), (0, 0), (1, 1))


class _Stop(Exception):
    """Raised by a hook once a layer has seen all its calls: the rest of the forward is not needed."""


@dataclass
class LayerStatistics:
    """Sums of outer products per statistic kind, and how many vectors went into each."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    _whitenings: dict[str, tuple[int, Whitening]] = field(default_factory=dict, repr=False, compare=False)

    def covariance(self, kind: str) -> torch.Tensor:
        return self.sums[kind] / max(self.counts[kind], 1)

    def whitening(self, kind: str) -> Whitening:
        """Kept per kind (until more vectors are added): the budget asks for it once per method that
        reads the kind (grouped and cp share ``channels``) and the decomposition asks again."""
        count, kept = self._whitenings.get(kind, (-1, None))
        if count != self.counts[kind] or kept is None:
            kept = whitening(self.covariance(kind))
            self._whitenings[kind] = (self.counts[kind], kept)
        return kept


def _padding(size: int, dilation: int, padding: int | str) -> tuple[int, int]:
    if padding == "valid":
        return 0, 0
    if padding == "same":  # as nn.Conv2d pads it: an odd total puts the extra row/column last
        total = dilation * (size - 1)
        return total // 2, total - total // 2
    return padding, padding


_SCRATCH = threading.local()


@contextmanager
def reused_buffers() -> Iterator[None]:
    """Within the block, :func:`patch_columns` with a ``slot`` writes into one buffer per slot kept
    between calls, instead of a fresh tensor per chunk.

    A fresh 64 MiB tensor is mapped and zeroed by the kernel page by page on first write, which
    cost more than the copy into it: 0.082 s against 0.023 s for one chunk of 16x32x32 patches
    (float32; float64 0.149 s against 0.034 s), measured. The buffers go when the outermost block ends.
    """
    outermost = getattr(_SCRATCH, "buffers", None) is None
    if outermost:
        _SCRATCH.buffers = {}
    try:
        yield
    finally:
        if outermost:
            _SCRATCH.buffers = None


def _buffer(slot: str | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    buffers = getattr(_SCRATCH, "buffers", None)
    size = math.prod(shape)
    if buffers is None or slot is None:
        return torch.empty(shape, dtype=dtype, device=device)
    kept = buffers.get((slot, dtype, device))
    if kept is None or kept.numel() < size:
        kept = buffers[(slot, dtype, device)] = torch.empty(size, dtype=dtype, device=device)
    return kept[:size].view(shape)


def patch_columns(
    inputs: torch.Tensor, geometry: Geometry, dtype: torch.dtype | None = None, slot: str | None = None
) -> torch.Tensor:
    """The im2col matrix of ``inputs`` (N, C, H, W): ``(C*kh*kw, N*Ho*Wo)``, row ``c*kh*kw + i*kw + j``
    (the column order of ``weight.reshape(out, -1)``), zero padded as ``nn.Conv2d`` pads.

    Written tap by tap with one strided copy each (converting to ``dtype`` on the way), straight into
    the layout a Gram matrix multiplies: no one-hot conv and no transposed copy of its output.
    With a ``slot`` inside :func:`reused_buffers`, the result is that slot's buffer: valid until the
    slot's next use.
    """
    (kh, kw), (sh, sw), padding, (dh, dw) = geometry
    pads = padding if isinstance(padding, str) else tuple(padding)
    (top, bottom) = _padding(kh, dh, pads if isinstance(pads, str) else pads[0])
    (left, right) = _padding(kw, dw, pads if isinstance(pads, str) else pads[1])
    if top or bottom or left or right:
        inputs = F.pad(inputs, (left, right, top, bottom))
    n, c, h, w = inputs.shape
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    source = inputs.transpose(0, 1)  # a view: (C, N, H, W)
    columns = _buffer(slot, (c, kh, kw, n, ho, wo), dtype or inputs.dtype, inputs.device)
    for i in range(kh):
        for j in range(kw):
            top_row, left_column = i * dh, j * dw
            columns[:, i, j] = source[:, :, top_row : top_row + sh * (ho - 1) + 1 : sh, left_column : left_column + sw * (wo - 1) + 1 : sw]
    return columns.reshape(c * kh * kw, -1)


def _geometry(extractor: nn.Conv2d | None) -> Geometry:
    if extractor is None:
        return CHANNELS
    return (extractor.kernel_size, extractor.stride, extractor.padding, extractor.dilation)


def chunk_samples(inputs: torch.Tensor, width: int) -> int:
    """Samples of ``inputs`` per chunk, so that their patches (``width`` per element) stay under
    ``_CHUNK_ELEMENTS``."""
    return max(1, _CHUNK_ELEMENTS // max(inputs[0].numel() * width, 1))


def _pair_chunk_samples(target: torch.Tensor, reference: torch.Tensor) -> int:
    """Samples per chunk of a refit's (target, hidden) batch: the patch columns (a row per column of
    ``reference``, the last factor's input patch) and the target columns (a row per output channel)
    both stay under ``_CHUNK_ELEMENTS``, one column per output pixel. Bounding by the stack's input
    instead missed a last factor wider than it (CP at R=752 after a 512-channel input) and a wide
    output of a narrow input (a 64->256 1x1 at 56x56: 0.5 GB of float64 targets a chunk)."""
    pixels = target[0, 0].numel()
    return max(1, _CHUNK_ELEMENTS // max(pixels * max(reference.shape), 1))


def _chunks(inputs: torch.Tensor, width: int) -> Iterable[torch.Tensor]:
    return inputs.split(chunk_samples(inputs, width))


def _gram(columns: torch.Tensor) -> torch.Tensor:
    """``columns @ columns.T`` in the columns' own precision, returned in float64.

    A float32 product over one chunk (at most ``_CHUNK_ELEMENTS`` entries) is accurate to about
    1e-7 relative (measured against float64), far below the whitening's eigenvalue floor (1e-4 of
    the mean); the caller sums chunks in float64. Wide matrices skip the lower-left block, the
    mirror of the upper-right one: 3/4 of the multiplications, 15-25% less time measured at 288-576
    rows (a product of two halves is less efficient than one whole).
    """
    size = columns.shape[0]
    if size < 256:
        return (columns @ columns.T).to(torch.float64)
    half = size // 2
    gram = torch.empty(size, size, dtype=torch.float64, device=columns.device)
    top = columns[:half] @ columns.T
    gram[:half] = top
    gram[half:, :half] = top[:, half:].T
    gram[half:, half:] = columns[half:] @ columns[half:].T
    return gram


def _channel_blocks(gram: torch.Tensor, channels: int) -> torch.Tensor:
    """The per-channel diagonal blocks ``(C, T, T)`` of a patch Gram ordered ``c*T + t``."""
    taps = gram.shape[0] // channels
    blocks = gram.reshape(channels, taps, channels, taps).diagonal(dim1=0, dim2=2)  # (T, T, C)
    return blocks.permute(2, 0, 1).contiguous()


def _kind_geometries(conv: nn.Conv2d, kinds: Iterable[str]) -> dict[str, Geometry]:
    return {kind: _geometry(layers.patch_extractor_for(conv, kind)) for kind in dict.fromkeys(kinds)}


def _axis_taps(full: tuple, sub: tuple) -> list[int] | None:
    """Taps of one axis ``(kernel, stride, padding, dilation)`` of ``full`` whose patches are exactly
    ``sub``'s along that axis (same positions, same order), or ``None``.

    Equal axes share every tap. A plain axis (1, 1, 0, 1) is the centre tap of a stride-1 axis
    padded by ``dilation * (kernel - 1) / 2`` on each side: that tap reads every input position once,
    as the plain axis does.
    """
    if full == sub:
        return list(range(full[0]))
    kernel, stride, padding, dilation = full
    if sub == (1, 1, 0, 1) and stride == 1 and 2 * padding == dilation * (kernel - 1) and padding % dilation == 0:
        return [padding // dilation]
    return None


def _taps_within(full: Geometry, sub: Geometry) -> list[int] | None:
    """Indices, among ``full``'s ``kh*kw`` taps, of the patches of ``sub``; ``None`` when ``sub``'s
    patches are not a subset of ``full``'s (then its Gram is not a block of ``full``'s)."""
    if full == sub:
        return list(range(full[0][0] * full[0][1]))
    if isinstance(full[2], str) or isinstance(sub[2], str):
        return None
    rows, columns = (_axis_taps(tuple(part[axis] for part in full), tuple(part[axis] for part in sub)) for axis in (0, 1))
    if rows is None or columns is None:
        return None
    return [i * full[0][1] + j for i in rows for j in columns]


def _sum_products(inputs: torch.Tensor, geometry: Geometry, channels: int, per_channel: bool) -> tuple[torch.Tensor, int]:
    """The Gram of ``inputs``' patches (or only its per-channel blocks), summed over chunks in float64."""
    taps = geometry[0][0] * geometry[0][1]
    total, count = None, 0
    for chunk in _chunks(inputs, taps):
        columns = patch_columns(chunk, geometry, slot="patches")
        if per_channel:
            blocks = columns.reshape(channels, taps, -1)
            part = torch.bmm(blocks, blocks.transpose(1, 2)).to(torch.float64)
        else:
            part = _gram(columns)
        total = part if total is None else total + part
        count += columns.shape[1]
    return total, count


def _accumulate(stats: LayerStatistics, conv: nn.Conv2d, geometries: dict[str, Geometry], inputs: torch.Tensor) -> None:
    """Add ``inputs``' (one call of ``conv``) outer products to ``stats`` for every kind in ``geometries``.

    Kinds whose patches are among another kind's share its Gram (a block of it, same positions):
    ``channel_patches`` is the block diagonal of ``patches``; ``column_patches`` (kh x 1) and
    ``channels`` are the centre-column and centre taps of a stride-1 conv padded to keep its size.
    Only the Grams nothing else contains are multiplied; a ``channel_patches`` that no Gram holds is
    computed per channel.
    """
    channels = conv.in_channels
    wanted = list(dict.fromkeys(g for kind, g in geometries.items() if kind != "channel_patches"))
    sources = [g for g in wanted if not any(other != g and _taps_within(other, g) is not None for other in wanted)]
    grams = {g: _sum_products(inputs, g, channels, per_channel=False) for g in sources}
    for kind, geometry in geometries.items():
        source = next((g for g in sources if _taps_within(g, geometry) is not None), None)
        if source is None:
            value, count = _sum_products(inputs, geometry, channels, per_channel=True)
        else:
            gram, count = grams[source]
            if source != geometry:
                within = _taps_within(source, geometry)
                taps = source[0][0] * source[0][1]
                index = torch.tensor([c * taps + t for c in range(channels) for t in within])
                gram = gram[index][:, index]
            value = _channel_blocks(gram, channels) if kind == "channel_patches" else gram
        stats.sums[kind] = stats.sums[kind] + value if kind in stats.sums else value
        stats.counts[kind] = stats.counts.get(kind, 0) + count


def _input_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


def _to_model(batch: torch.Tensor, model: nn.Module) -> torch.Tensor:
    parameter = tree.first_parameter(model)
    if parameter is None:
        return batch
    return batch.to(device=parameter.device, dtype=parameter.dtype)


def collect_statistics(
    model: nn.Module,
    requests: dict[str, Sequence[str]],
    batches: Batches,
    started: Callable[[str], None] = lambda name: None,
) -> dict[str, LayerStatistics]:
    """One pass of ``batches`` through ``model``; for each conv named in ``requests``, the sums of the
    statistic kinds listed there (see ``methods.STATISTICS``), over every call of the conv.
    ``started(name)`` is told as each call's statistics begin (a progress bar)."""
    statistics = {name: LayerStatistics() for name in requests}
    handles = []

    def hook(name: str, conv: nn.Conv2d, geometries: dict[str, Geometry]):
        def accumulate(module, args, kwargs):
            started(name)
            _accumulate(statistics[name], conv, geometries, _input_of(args, kwargs).detach())

        return accumulate

    try:
        for name, kinds in requests.items():
            conv = model.get_submodule(name)
            handles.append(conv.register_forward_pre_hook(hook(name, conv, _kind_geometries(conv, kinds)), with_kwargs=True))
        with torch.no_grad(), reused_buffers():
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
    """Calibration output error of a stack before and after the refit, relative to its target (the
    original layer's output, or a block target: see :func:`compressor.walk.walk_`)."""

    error_before: float
    error_after: float
    samples: int


def _product_dtype(activations: torch.Tensor) -> torch.dtype:
    """The precision :class:`Products` multiplies ``activations`` in: theirs, at least float32."""
    return torch.promote_types(activations.dtype, torch.float32)


@dataclass
class Products:
    """Sums over calibration positions for a least-squares fit of ``y ~ W [p; 1]`` near a reference
    ``W0`` (the weights in use): ``gram = sum [p; 1][p; 1]^T`` (the constant only ``with_constant``),
    the *residual* cross term ``cross = sum r [p; 1]^T`` and ``residual_energy = sum |r|^2`` with
    ``r = y - W0 [p; 1]``, and ``energy = sum |y|^2``.

    The products are float32 per chunk (half the time and bytes of float64 on this CPU), summed in
    float64. Errors are read about the reference, ``|r|^2 - 2 <W - W0, cross> + <W - W0, (W - W0) gram>``,
    so float32 rounding (1e-7 of each sum) is relative to the residual, not to ``|y|^2``: reading
    ``sum |y - W p|^2`` as a difference of the raw sums would lose an exact stack's 1e-10 relative
    error in the rounding of ``|y|^2`` (a relative error read as 3e-4 instead of 1e-5).
    """

    gram: torch.Tensor  # (size, size) float64
    cross: torch.Tensor  # (out, size) float64: residual cross term
    reference: torch.Tensor  # (out, size) float64
    energy: float = 0.0
    residual_energy: float = 0.0
    samples: int = 0

    @classmethod
    def zeros(cls, reference: torch.Tensor) -> Products:
        size = reference.shape[1]
        return cls(torch.zeros(size, size, dtype=torch.float64), torch.zeros_like(reference, dtype=torch.float64), reference.to(torch.float64))

    def add_(self, columns: torch.Tensor, wanted: torch.Tensor, with_constant: bool) -> None:
        """Add the positions of one chunk: patch ``columns`` (D, n) and targets ``wanted`` (out, n), float32."""
        size = columns.shape[0]
        reference = self.reference.to(columns.dtype)
        residual = wanted - reference[:, :size].to(columns.device) @ columns
        if with_constant:
            residual -= reference[:, size:].to(columns.device)
        self.gram[:size, :size] += _gram(columns).cpu()
        self.cross[:, :size] += (residual @ columns.T).to(torch.float64).cpu()
        if with_constant:
            sums = columns.sum(1, dtype=torch.float64).cpu()
            self.gram[:size, size] += sums
            self.gram[size, :size] += sums
            self.gram[size, size] += columns.shape[1]
            self.cross[:, size] += residual.sum(1, dtype=torch.float64).cpu()
        # float32 dot products (about 1e-7 relative, each relative to its own sum), no float64 copies
        self.energy += float(torch.dot(wanted.reshape(-1), wanted.reshape(-1)))
        self.residual_energy += float(torch.dot(residual.reshape(-1), residual.reshape(-1)))

    def target_cross(self) -> torch.Tensor:
        """``sum y [p; 1]^T`` (out, size), what a least-squares solve for ``W`` reads."""
        return self.cross + self.reference @ self.gram

    def squared_error(self, weights: torch.Tensor) -> float:
        """``sum |y - W [p; 1]|^2`` for ``weights`` (out, size), read about the reference."""
        delta = weights.to(torch.float64) - self.reference
        return self.residual_energy - 2 * float((delta * self.cross).sum()) + float(((delta @ self.gram) * delta).sum())

    def relative(self, squared_error: float) -> float:
        """``squared_error`` as a relative output error (the norm ratio the reports use)."""
        return max(squared_error, 0.0) ** 0.5 / max(self.energy, 1e-300) ** 0.5


def collect_products(
    reference: torch.Tensor, pairs: Pairs, geometry: Geometry, with_constant: bool, head: Callable = lambda x: x
) -> Products:
    """:class:`Products` about ``reference`` over ``pairs``: patches (under ``geometry``) of ``head``
    applied to each hidden batch, against the target batches, chunk by chunk."""
    products = Products.zeros(reference)
    with torch.no_grad(), reused_buffers():
        for target, hidden, batch_size in pairs:
            products.samples += batch_size
            step = _pair_chunk_samples(target, reference)
            for part_target, part_hidden in zip(target.split(step), hidden.split(step)):
                dtype = _product_dtype(part_target)
                columns = patch_columns(head(part_hidden), geometry, dtype, slot="patches")
                wanted = patch_columns(part_target, CHANNELS, dtype, slot="targets")
                products.add_(columns, wanted, with_constant)
    return products


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
    geometry = (last.kernel_size, last.stride, last.padding, last.dilation)
    with_bias = last.bias is not None
    current = _dense_weights(last)
    if with_bias:
        current = torch.cat([current, last.bias.detach().to(torch.float64).cpu()[:, None]], dim=1)
    products = collect_products(current, pairs, geometry, with_bias, head)
    solved = _solve_blocks(products.gram, products.target_cross(), last.groups, with_bias, ridge)
    before, after = products.residual_energy, products.squared_error(solved)
    if not torch.isfinite(solved).all() or after >= before:
        after, solved = before, current
    else:
        with torch.no_grad():
            last.weight.copy_(_grouped_weights(solved[:, : solved.shape[1] - int(with_bias)], last).to(last.weight.dtype))
            if with_bias:
                last.bias.copy_(solved[:, -1].to(last.bias.dtype))
    return Refit(products.relative(before), products.relative(after), products.samples)
