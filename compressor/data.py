"""Calibration and evaluation data: ``--data PATH`` and ``--eval-data PATH``.

:func:`load_data` accepts three kinds of ``PATH`` and returns a :class:`Dataset`:

``.npz`` file (``kind="npz"``)
    An array ``x`` of shape ``(N, C, H, W)`` and optionally ``y`` of shape ``(N,)`` with integer class
    labels (``numpy.savez(path, x=x, y=y)``). Other arrays in the file are ignored. It is always read
    with ``allow_pickle=False``: object arrays are refused. ``float16/32/64`` inputs are used as they
    are (cast to float32, *not* normalized); ``uint8`` inputs are scaled ``/ 255`` and normalized per
    channel, one batch at a time (a large uint8 file is never converted to float32 as a whole). The
    whole file is loaded and checked at load time.

Folder of images (``kind="images"``)
    ``PATH/<class>/<image>`` (the ImageFolder layout): class folders sorted by name give the label
    indices 0, 1, ...; images may sit in nested folders below their class folder. A class folder with
    no images keeps its index, so labels still match the model's classes. A folder holding images
    directly and no class folders is accepted as *unlabeled* data (labels ``None``); a folder with
    both is refused as ambiguous. Names starting with ``.`` are skipped. Extensions (any case):
    :data:`IMAGE_EXTENSIONS`. Files are listed at load time and decoded lazily with Pillow, one batch
    at a time: converted to RGB (``L`` when the model takes 1 channel; other channel counts are
    refused), resized with bilinear filtering so that the image just covers ``(H, W)`` (the shorter
    side becomes the target size when ``H == W``), center-cropped to ``(H, W)``, scaled ``/ 255`` and
    normalized. There is no extra crop margin (no 256 -> 224 style resize). GIFs use their first frame.

``MODULE:FUNCTION`` (``kind="callable"``, a string with a colon that is not an existing path)
    The module is imported (the current directory is put on ``sys.path`` first, as ``python -m``
    does) and the function is called with no arguments. It must return an iterable of float
    ``(N, C, H, W)`` tensors, or of ``(inputs, labels)`` pairs (tensors or numpy arrays; labels are
    ``(N,)`` integers); every item must be of the same kind. The inputs are used as they are: *no*
    scaling or normalization, and integer inputs are refused. At load time the function is called
    once and its first item is checked; after that the function is called again for every
    :meth:`Dataset.batches` pass (and for :meth:`Dataset.count` until the total is known), so it
    must return a fresh iterable (a list, a new generator, a ``DataLoader``) with the same items in
    the same order on every call. Items are re-batched to the requested batch size and checked as
    they are yielded. :meth:`Dataset.split` and :meth:`Dataset.shuffled` need random access and
    therefore hold all samples of a callable in memory (once, cached).

Normalization (``uint8`` arrays and image files only): ``(x / 255 - mean) / std`` per channel, with
the recipe's ``data.mean`` / ``data.std``; each defaults to ImageNet's values for 3 channels
(:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`), otherwise to mean 0 / std 1. When given, they must
have one value per model input channel (checked for every kind of source).

Order: batches come in file order (npz), class then file name (images, so the first samples of a
``limit`` all belong to the first classes: use :meth:`Dataset.shuffled` for a mixed subset, as
calibration does), or the function's order (callables). Every user error is one line in a :class:`~compressor.errors.DataError`.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
import zipfile
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import numpy as np
import torch

from compressor.errors import DataError, describe_error

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "Dataset", "load_data"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

_FORMATS = (
    "a .npz file with an array x (N, C, H, W) and optional integer labels y (N,) or masks (N, H, W), "
    "a folder of images (PATH/<class>/<image>, or images directly in PATH for unlabeled data), "
    "or MODULE:FUNCTION returning an iterable of (N, C, H, W) tensors or (inputs, labels) pairs"
)
_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_SCAN_ROWS = 256  # samples per chunk when counting NaN/inf in a float array


# ----------------------------------------------------------------------------------------------------------------------
# small helpers


def _fmt_shape(shape: Sequence[int]) -> str:
    return str(tuple(int(d) for d in shape))


def _expected(shape: tuple[int, int, int]) -> str:
    return "(N, {}, {}, {})".format(*shape)


def _check_inputs_shape(where: str, found: Sequence[int], shape: tuple[int, int, int]) -> None:
    """``where`` names the array (``"{path}: array x"``); ``shape`` is the model input's (C, H, W)."""
    channels, height, width = shape
    if len(found) != 4:
        raise DataError(
            f"{where} has shape {_fmt_shape(found)} ({len(found)}-D); "
            f"expected 4-D batches {_expected(shape)} matching the model input"
        )
    if found[1] != channels:
        raise DataError(
            f"{where} has {found[1]} channel(s) (shape {_fmt_shape(found)}); "
            f"expected {channels} channel(s), {_expected(shape)}, matching the model input"
        )
    if (found[2], found[3]) != (height, width):
        raise DataError(
            f"{where} has spatial size {found[2]}x{found[3]} (shape {_fmt_shape(found)}); "
            f"expected {height}x{width}, {_expected(shape)}, matching the model input"
        )


def _normalization(
    source: str, channels: int, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float32 mean and std, defaults filled in, checked against the channel count."""
    default_mean = IMAGENET_MEAN if channels == 3 else (0.0,) * channels
    default_std = IMAGENET_STD if channels == 3 else (1.0,) * channels
    values = []
    for name, given, default in (("mean", mean, default_mean), ("std", std, default_std)):
        if given is None:
            values.append(np.asarray(default, dtype=np.float32))
            continue
        given = [float(v) for v in given]
        if len(given) != channels:
            raise DataError(
                f"{source}: data.{name} has {len(given)} value(s) {given} but the model input has {channels} "
                f"channel(s); expected one value per channel"
            )
        if not all(math.isfinite(v) for v in given) or (name == "std" and min(given) <= 0):
            rule = "finite and > 0" if name == "std" else "finite"
            raise DataError(f"{source}: data.{name} must be {rule} for every channel; got {given}")
        values.append(np.asarray(given, dtype=np.float32))
    return values[0], values[1]


def scale_uint8(batch: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """``(batch / 255 - mean) / std`` per channel, for a ``(n, C, H, W)`` uint8 array, as float32."""
    out = torch.from_numpy(np.ascontiguousarray(batch)).to(torch.float32).div_(255.0)
    out.sub_(torch.from_numpy(mean).view(1, -1, 1, 1)).div_(torch.from_numpy(std).view(1, -1, 1, 1))
    return out


def _count_nonfinite(x: np.ndarray) -> tuple[int, int]:
    """(number of NaN/inf values, index of the first sample holding one), scanning in chunks."""
    bad, first = 0, -1
    for start in range(0, x.shape[0], _SCAN_ROWS):
        flags = ~np.isfinite(x[start : start + _SCAN_ROWS]).reshape(min(_SCAN_ROWS, x.shape[0] - start), -1)
        count = int(flags.sum())
        if count and first < 0:
            first = start + int(np.flatnonzero(flags.any(axis=1))[0])
        bad += count
    return bad, first


# ----------------------------------------------------------------------------------------------------------------------
# random-access sources: arrays (npz, or a materialized callable) and image files


class _Arrays:
    """Samples held in memory: ``x`` uint8 (normalized per batch) or float (cast per batch), ``y`` integer or None."""

    def __init__(self, x: np.ndarray, y: Optional[np.ndarray], mean: np.ndarray, std: np.ndarray) -> None:
        self.x, self.y, self.mean, self.std = x, y, mean, std

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def read(self, rows: np.ndarray) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        batch = self.x[rows]  # fancy indexing copies: batches never alias the dataset
        if batch.dtype == np.uint8:
            inputs = scale_uint8(batch, self.mean, self.std)
        else:
            inputs = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        labels = None if self.y is None else torch.from_numpy(self.y[rows].astype(np.int64))
        return inputs, labels


class _Images:
    """Image files decoded on demand: resized to cover (H, W), center-cropped, scaled and normalized."""

    def __init__(
        self,
        root: str,
        files: list[Path],
        labels: Optional[np.ndarray],
        shape: tuple[int, int, int],
        mean: np.ndarray,
        std: np.ndarray,
    ) -> None:
        self.root, self.files, self.labels, self.shape = root, files, labels, shape
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, file: Path) -> np.ndarray:
        from PIL import Image

        channels, height, width = self.shape
        try:
            with Image.open(file) as image:
                image = image.convert("L" if channels == 1 else "RGB")
                scale = max(height / image.height, width / image.width)
                size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
                if size != image.size:
                    image = image.resize(size, getattr(Image, "Resampling", Image).BILINEAR)
                left, top = (size[0] - width) // 2, (size[1] - height) // 2
                image = image.crop((left, top, left + width, top + height))
                pixels = np.asarray(image, dtype=np.uint8)
        except Exception as err:  # Pillow raises many types: UnidentifiedImageError, OSError, SyntaxError, ...
            raise DataError(
                f"{self.root}: cannot decode image {file}: {describe_error(err)}; "
                "expected an image file Pillow can read"
            ) from err
        return pixels.reshape(height, width, channels).transpose(2, 0, 1)

    def read(self, rows: np.ndarray) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        batch = np.stack([self._decode(self.files[int(i)]) for i in rows])
        labels = None if self.labels is None else torch.from_numpy(self.labels[rows])
        return scale_uint8(batch, self.mean, self.std), labels


# ----------------------------------------------------------------------------------------------------------------------
# streaming source: MODULE:FUNCTION


class _Stream:
    """A function returning an iterable of batches, called again for every pass."""

    def __init__(self, spec: str, function: Callable[[], Any], shape: tuple[int, int, int]) -> None:
        self.spec, self.function, self.shape = spec, function, shape
        self.name = getattr(function, "__qualname__", spec.partition(":")[2])
        self.labeled: Optional[bool] = None  # set by the first item ever seen
        self.total: Optional[int] = None  # known once a pass has run to the end
        self.arrays: Optional[_Arrays] = None  # everything, once split()/shuffled() needed it
        self._last_iterator: Any = None

    def _open(self) -> Iterator[Any]:
        try:
            result = self.function()
        except Exception as err:
            raise DataError(
                f"{self.spec}: calling {self.name}() with no arguments failed: {describe_error(err)}"
            ) from err
        if isinstance(result, (torch.Tensor, np.ndarray)):
            raise DataError(
                f"{self.spec}: {self.name}() returned a single {type(result).__name__} of shape "
                f"{_fmt_shape(result.shape)}; expected an iterable of batches {_expected(self.shape)} "
                "or (inputs, labels) pairs, e.g. return [x] or [(x, y)]"
            )
        try:
            iterator = iter(result)
        except TypeError as err:
            raise DataError(
                f"{self.spec}: {self.name}() returned a {type(result).__name__}, which is not iterable; expected an "
                f"iterable of batches {_expected(self.shape)} or (inputs, labels) pairs"
            ) from err
        if iterator is result:  # a generator or other one-shot iterator: must be a new one every call
            if result is self._last_iterator:
                raise DataError(
                    f"{self.spec}: {self.name}() returned the same {type(result).__name__} object again; expected a "
                    "fresh iterable on every call (the data is read several times), e.g. a list or a new generator"
                )
            self._last_iterator = result
        return iterator

    def _tensor(self, value: Any, what: str) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value.detach().cpu()
        if isinstance(value, np.ndarray):
            try:
                return torch.from_numpy(value)
            except TypeError as err:
                raise DataError(
                    f"{self.spec}: {what} are a numpy array of dtype {value.dtype}; expected a numeric array"
                ) from err
        raise DataError(f"{self.spec}: {what} are a {type(value).__name__}; expected a torch.Tensor or numpy array")

    def _check(self, item: Any, index: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        where = f"item {index} of {self.name}()"
        if isinstance(item, (torch.Tensor, np.ndarray)):
            inputs, labels, pair = item, None, False
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            (inputs, labels), pair = item, True
        else:
            found = f"a {type(item).__name__} of length {len(item)}" if isinstance(item, (tuple, list)) else (
                f"a {type(item).__name__}"
            )
            raise DataError(
                f"{self.spec}: {where} is {found}; "
                f"expected a {_expected(self.shape)} tensor or an (inputs, labels) pair"
            )
        if self.labeled is None:
            self.labeled = pair
        elif pair != self.labeled:
            kinds = ("plain inputs", "(inputs, labels) pairs")
            raise DataError(
                f"{self.spec}: {where} is {'an (inputs, labels) pair' if pair else 'plain inputs'} but earlier items "
                f"were {kinds[self.labeled]}; expected every item to be of the same kind"
            )
        x = self._tensor(inputs, f"the inputs of {where}")
        if not x.dtype.is_floating_point:
            raise DataError(
                f"{self.spec}: the inputs of {where} have dtype {x.dtype}; expected floating-point inputs "
                "(a function's batches are used as given, without scaling or normalization)"
            )
        _check_inputs_shape(f"{self.spec}: the inputs of {where}", tuple(x.shape), self.shape)
        x = x.to(torch.float32).contiguous()
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise DataError(
                f"{self.spec}: the inputs of {where} hold {bad} NaN/inf value(s) out of {x.numel()}; "
                "expected finite values"
            )
        if labels is None:
            return x, None
        y = self._tensor(labels, f"the labels of {where}")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise DataError(
                f"{self.spec}: the labels of {where} have dtype {y.dtype}; expected integer class indices"
            )
        if y.dim() not in (1, 3) or y.shape[0] != x.shape[0]:  # (N, H, W): segmentation masks
            raise DataError(
                f"{self.spec}: the labels of {where} have shape {_fmt_shape(y.shape)}; "
                f"expected ({x.shape[0]},), one integer label per input, or ({x.shape[0]}, H, W) class masks"
            )
        return x, y.to(torch.int64)

    def items(self) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """One pass: every item of a fresh call, checked, unbatched."""
        iterator = self._open()
        index = 0
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            except Exception as err:
                raise DataError(
                    f"{self.spec}: iterating the result of {self.name}() failed at item {index + 1}: "
                    f"{describe_error(err)}"
                ) from err
            index += 1
            yield self._check(item, index)

    def _empty(self) -> DataError:
        return DataError(
            f"{self.spec}: {self.name}() yielded no samples on this pass; expected at least one "
            "(a fresh iterable with the same items on every call)"
        )

    def peek(self) -> None:
        """Load-time check: call the function and validate its first item only."""
        passing = self.items()
        try:
            for x, _ in passing:
                if x.shape[0]:
                    return
        finally:
            passing.close()
        raise self._empty()

    def batches(self, batch_size: int, limit: Optional[int]) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        if limit == 0:
            return
        buffer: deque[tuple[torch.Tensor, Optional[torch.Tensor]]] = deque()
        buffered = total = 0
        exhausted = True
        for x, y in self.items():
            if limit is not None and total + x.shape[0] > limit:
                x, y = x[: limit - total], None if y is None else y[: limit - total]
            if x.shape[0] == 0:
                continue
            buffer.append((x, y))
            buffered += x.shape[0]
            total += x.shape[0]
            while buffered >= batch_size:
                yield _take(buffer, batch_size)
                buffered -= batch_size
            if limit is not None and total >= limit:
                exhausted = False
                break
        if buffered:
            yield _take(buffer, buffered)
        if total == 0:
            raise self._empty()
        if exhausted:
            self.total = total

    def count(self, limit: Optional[int]) -> int:
        if self.total is None:
            total = 0
            for x, _ in self.items():
                total += x.shape[0]
                if limit is not None and total >= limit:
                    return limit
            if total == 0:
                raise self._empty()
            self.total = total
        return self.total if limit is None else min(self.total, limit)

    def materialize(self) -> _Arrays:
        if self.arrays is None:
            xs, ys = [], []
            for x, y in self.items():
                xs.append(x.numpy())
                ys.append(None if y is None else y.numpy())
            if not xs or sum(x.shape[0] for x in xs) == 0:
                raise self._empty()
            y_all = None if self.labeled is False else np.concatenate(ys)
            empty = np.zeros(0, dtype=np.float32)
            self.arrays = _Arrays(np.concatenate(xs), y_all, empty, empty)
            self.total = len(self.arrays)
        return self.arrays


def _take(buffer: deque, n: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The first ``n`` samples of a queue of (inputs, labels) chunks, removed from it."""
    xs, ys = [], []
    while n:
        x, y = buffer[0]
        if x.shape[0] <= n:
            buffer.popleft()
        else:
            buffer[0] = (x[n:], None if y is None else y[n:])
            x, y = x[:n], None if y is None else y[:n]
        xs.append(x)
        ys.append(y)
        n -= x.shape[0]
    inputs = xs[0] if len(xs) == 1 else torch.cat(xs)
    labels = None if ys[0] is None else (ys[0] if len(ys) == 1 else torch.cat(ys))
    return inputs, labels


# ----------------------------------------------------------------------------------------------------------------------
# the dataset


@dataclass(eq=False)
class Dataset:
    """Data loaded by :func:`load_data`; iterate it with :meth:`batches`.

    ``shape`` is the model input's ``(C, H, W)``; ``labeled`` tells whether batches carry labels;
    ``classes`` are the class folder names of an image folder (label ``i`` is ``classes[i]``), else None.
    """

    source: str
    kind: Literal["npz", "images", "callable"]
    shape: tuple[int, int, int]
    labeled: bool
    classes: Optional[list[str]] = None
    _data: Union[_Arrays, _Images, _Stream, None] = field(default=None, repr=False)
    _order: Optional[np.ndarray] = field(default=None, repr=False)  # rows of _data, for split/shuffled views

    def batches(
        self, batch_size: int, limit: Optional[int] = None
    ) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Float32 ``(inputs, labels-or-None)`` batches of ``batch_size`` (the last one may be smaller).

        At most ``limit`` samples in total (all when None). The order is fixed, so every call yields
        the same batches; call it as often as needed. Labels are int64 ``(n,)`` tensors.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
        if isinstance(self._data, _Stream):
            yield from self._data.batches(batch_size, limit)
            return
        rows = self._rows()[:limit]
        for start in range(0, len(rows), batch_size):
            yield self._data.read(rows[start : start + batch_size])

    def count(self, limit: Optional[int] = None) -> int:
        """Number of samples :meth:`batches` yields with this ``limit``.

        For a callable this runs one pass over the function's result (only up to ``limit``), and caches
        the total once a pass has reached the end.
        """
        if isinstance(self._data, _Stream):
            return self._data.count(limit)
        total = len(self._rows())
        return total if limit is None else min(total, limit)

    def __len__(self) -> int:
        return self.count()

    def shuffled(self, seed: int = 0) -> Dataset:
        """The same samples in a fixed pseudo-random order (``seed``): a mixed subset for a ``limit``."""
        rows = self._rows()
        return self._view(rows[np.random.default_rng(seed).permutation(len(rows))])

    def split(self, holdout: Union[int, float], seed: int = 0) -> tuple[Dataset, Dataset]:
        """``(rest, held_out)``: a deterministic shuffle (``seed``) cut in two disjoint parts.

        ``holdout`` is a count (``1 <= holdout < len``) or a fraction (``0 < holdout < 1``, rounded, at
        least 1 sample on each side). Both parts keep the shuffled order.
        """
        rows = self._rows()
        total = len(rows)
        if total < 2:
            raise DataError(f"{self.source}: cannot split {total} sample(s) in two; expected at least 2 samples")
        if isinstance(holdout, bool) or not isinstance(holdout, (int, float)):
            raise DataError(f"{self.source}: holdout must be a count or a fraction; got {holdout!r}")
        if isinstance(holdout, int):
            if not 1 <= holdout < total:
                raise DataError(
                    f"{self.source}: cannot hold out {holdout} of {total} samples; "
                    f"expected a count from 1 to {total - 1}"
                )
            count = holdout
        else:
            if not 0 < holdout < 1:
                raise DataError(f"{self.source}: holdout fraction {holdout} is not in (0, 1); expected e.g. 0.1")
            count = min(max(round(holdout * total), 1), total - 1)
        order = rows[np.random.default_rng(seed).permutation(total)]
        return self._view(order[count:]), self._view(order[:count])

    def take(self, positions: Sequence[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The samples at ``positions`` (indices into this view's order) as one ``(inputs, labels)`` batch.

        Random access for samplers (fine-tuning draws a fresh permutation every epoch); a callable's
        samples are materialized on first use.
        """
        rows = self._rows()[np.asarray(positions, dtype=np.int64)]
        data = self._data.materialize() if isinstance(self._data, _Stream) else self._data
        return data.read(rows)

    def _rows(self) -> np.ndarray:
        """The rows of the random-access data, in order (materializes a callable's samples)."""
        if self._order is not None:
            return self._order
        if isinstance(self._data, _Stream):
            return np.arange(len(self._data.materialize()))
        return np.arange(len(self._data))

    def _view(self, rows: np.ndarray) -> Dataset:
        data = self._data.materialize() if isinstance(self._data, _Stream) else self._data
        return Dataset(self.source, self.kind, self.shape, self.labeled, self.classes, data, rows)


# ----------------------------------------------------------------------------------------------------------------------
# loaders


def _read_member(archive: Any, name: str, source: str) -> np.ndarray:
    try:
        return archive[name]
    except ValueError as err:
        if "pickle" in str(err):
            raise DataError(
                f"{source}: array {name!r} holds Python objects (dtype=object), which are refused because loading "
                f"them would unpickle code; expected a numeric array (x: uint8 or float, y: integer)"
            ) from err
        raise DataError(
            f"{source}: cannot read array {name!r}: {describe_error(err)}; expected a numeric array"
        ) from err
    except Exception as err:
        raise DataError(
            f"{source}: cannot read array {name!r}, the file looks corrupt: {describe_error(err)}; "
            "expected a file written by numpy.savez"
        ) from err


def _load_npz(source: str, shape: tuple[int, int, int], mean: np.ndarray, std: np.ndarray) -> Dataset:
    expected_file = "expected a .npz archive written by numpy.savez(path, x=..., y=...)"
    try:
        with open(source, "rb") as handle:
            magic = handle.read(6)
        is_zip = zipfile.is_zipfile(source)
    except OSError as err:
        raise DataError(f"{source}: cannot read the file: {describe_error(err)}; {expected_file}") from err
    if magic == b"\x93NUMPY":
        raise DataError(f"{source}: is a .npy file holding a single array; {expected_file}")
    if not is_zip:
        raise DataError(f"{source}: is not a .npz archive (not a zip file, or a truncated one); {expected_file}")
    try:
        archive = np.load(source, allow_pickle=False)
    except Exception as err:
        raise DataError(f"{source}: cannot read it as a .npz archive: {describe_error(err)}; {expected_file}") from err
    with archive:
        names = list(archive.files)
        if "x" not in names:
            found = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "") or "none"
            raise DataError(f"{source}: has no array named 'x'; {expected_file}; found arrays: {found}")
        x = _read_member(archive, "x", source)
        y = _read_member(archive, "y", source) if "y" in names else None
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise DataError(
            f"{source}: array x has dtype {x.dtype}; expected uint8 (scaled /255 and normalized) "
            "or float32/float64 (used as is)"
        )
    if x.ndim == 4 and x.shape[0] == 0:
        raise DataError(f"{source}: array x holds 0 samples (shape {_fmt_shape(x.shape)}); expected at least one")
    _check_inputs_shape(f"{source}: array x", x.shape, shape)
    if x.dtype != np.uint8:
        bad, first = _count_nonfinite(x)
        if bad:
            raise DataError(
                f"{source}: array x holds {bad} NaN/inf value(s) (first in sample {first}); expected finite values"
            )
    if y is not None:
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{source}: array y has dtype {y.dtype}; expected integer class labels")
        # (N, H, W): segmentation masks; their H, W are checked against the model's output when used.
        if y.ndim not in (1, 3) or y.shape[0] != x.shape[0]:
            raise DataError(
                f"{source}: array y has shape {_fmt_shape(y.shape)}; expected ({x.shape[0]},), "
                f"one integer label per sample of x, or ({x.shape[0]}, H, W) segmentation masks"
            )
    return Dataset(source, "npz", shape, y is not None, None, _Arrays(x, y, mean, std))


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_below(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / name for name in sorted(files) if _is_image(name))
    return found


def _load_images(source: str, shape: tuple[int, int, int], mean: np.ndarray, std: np.ndarray) -> Dataset:
    channels = shape[0]
    if channels not in (1, 3):
        raise DataError(
            f"{source}: a folder of images gives 1-channel (grayscale) or 3-channel (RGB) inputs, but the model "
            f"input has {channels} channels; expected a .npz file or MODULE:FUNCTION for other channel counts"
        )
    try:
        entries = sorted((e for e in os.scandir(source) if not e.name.startswith(".")), key=lambda e: e.name)
        top = [Path(e.path) for e in entries if e.is_file() and _is_image(e.name)]
        class_dirs = [e for e in entries if e.is_dir()]
        per_class = [_images_below(Path(e.path)) for e in class_dirs]
    except OSError as err:
        raise DataError(f"{source}: cannot list the folder: {describe_error(err)}") from err
    in_classes = sum(len(files) for files in per_class)
    if top and in_classes:
        raise DataError(
            f"{source}: has {len(top)} image(s) directly in it and {in_classes} in class sub-folders; expected "
            "either PATH/<class>/<image> (labeled) or images directly in PATH (unlabeled), not both"
        )
    if not top and not in_classes:
        raise DataError(
            f"{source}: no images found; expected image files ({' '.join(IMAGE_EXTENSIONS)}, any case) in class "
            f"sub-folders PATH/<class>/<image> or directly in PATH; found {len(entries)} other entries"
        )
    if top:
        return Dataset(source, "images", shape, False, None, _Images(source, top, None, shape, mean, std))
    files = [file for files_of_class in per_class for file in files_of_class]
    labels = np.concatenate([np.full(len(f), i, dtype=np.int64) for i, f in enumerate(per_class)])
    classes = [e.name for e in class_dirs]
    return Dataset(source, "images", shape, True, classes, _Images(source, files, labels, shape, mean, std))


def _load_callable(spec: str, shape: tuple[int, int, int]) -> Dataset:
    module_name, _, attribute = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # console scripts do not put the user's folder on the path
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or whatever the module raises while it runs
        raise DataError(
            f"{spec}: cannot import module {module_name!r}: {describe_error(err)}; expected an importable "
            "MODULE:FUNCTION, or an existing .npz file or image folder"
        ) from err
    if not hasattr(module, attribute):
        raise DataError(f"{spec}: module {module_name!r} has no attribute {attribute!r}; expected a function there")
    function = getattr(module, attribute)
    if not callable(function):
        raise DataError(
            f"{spec}: {attribute!r} is a {type(function).__name__}, not callable; "
            "expected a function returning an iterable of batches"
        )
    stream = _Stream(spec, function, shape)
    stream.peek()
    return Dataset(spec, "callable", shape, bool(stream.labeled), None, stream)


def load_data(
    path: Union[str, os.PathLike],
    *,
    input_shape: Sequence[int],
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> Dataset:
    """Open ``--data`` / ``--eval-data``: a ``.npz`` file, a folder of images or ``MODULE:FUNCTION``.

    ``input_shape`` is the model input ``(N, C, H, W)`` (N is ignored): every sample must be
    ``(C, H, W)``. ``mean``/``std`` (the recipe's ``data.mean``/``data.std``) normalize uint8 arrays
    and image files; None gives the defaults described in the module docstring. Raises
    :class:`~compressor.errors.DataError` with a one-line message for every problem with the data.
    """
    source = os.fspath(path)
    if (
        not isinstance(input_shape, Sequence)
        or len(input_shape) != 4
        or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in input_shape)
        or min(input_shape) < 1
    ):
        raise DataError(f"{source}: input_shape must be 4 positive ints (N, C, H, W); got {input_shape!r}")
    shape = (int(input_shape[1]), int(input_shape[2]), int(input_shape[3]))
    mean_values, std_values = _normalization(source, shape[0], mean, std)
    if os.path.isdir(source):
        return _load_images(source, shape, mean_values, std_values)
    if os.path.exists(source):
        return _load_npz(source, shape, mean_values, std_values)
    if _SPEC.fullmatch(source):
        return _load_callable(source, shape)
    raise DataError(f"{source}: no such file or folder, and not MODULE:FUNCTION; expected {_FORMATS}")
