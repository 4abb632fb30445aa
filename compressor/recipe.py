"""Recipes: which Conv2d layers to rewrite, and how.

A recipe is a YAML mapping validated by the pydantic models below::

    name: mobile                      # optional
    description: "..."                # optional
    input_shape: [1, 3, 224, 224]     # optional, 4 positive ints (N, C, H, W)
    rules:                            # required, ordered, first match wins
      - match: "layer*.conv*"         # glob (whole name, ``*`` crosses dots) or "re:<regex>" (full match),
                                      # or a non-empty list of those (any may match)
        method: depthwise_separable   # depthwise_separable | spatial_separable | low_rank | grouped | cp | keep,
                                      # or a list of them (the budget solver picks one per layer; needs target)
        rank: full                    # positive int | "full" | {macs: f} | {params: f} (0 < f <= 1)
                                      # | {energy: e} (0 < e <= 1) | vbmf; unset: "full", or chosen by target
        round_to: auto                # intermediate channels of computed ranks a multiple of this (int), or
                                      # auto (default): ORT's NCHWc block on this CPU (16 AVX-512, 8 AVX2,
                                      # none elsewhere), ranks below one block allowed; null: no rounding
        groups: 1                     # positive int (default 1); > 1 only with method grouped
        kernel_size: 3                # optional filter: k (kh == kw == k) or [kh, kw]
        min_kernel_size: 3            # optional filter: kh >= n and kw >= n
        min_in_channels: 8            # optional filter
        min_out_channels: 8           # optional filter
        layer_type: conv              # conv (default): nn.Conv2d layers; linear: nn.Linear layers instead, opt-in,
                                      # only with method low_rank or keep, in/out features for the channel filters
    target: {macs: 0.4}               # optional global budget: {macs: f}, {params: f} or {latency: f}, 0 < f <= 1 of
                                      # the whole model; rules without a fixed rank are solved together
    data:                             # optional: how uint8 images and image folders are normalized
      mean: [0.485, 0.456, 0.406]     # per channel, after /255 (default: ImageNet for 3 channels, else 0)
      std: [0.229, 0.224, 0.225]      # per channel, > 0 (default: ImageNet for 3 channels, else 1)
    calibration:                      # optional, used with --data
      samples: 512                    # images used for statistics and refits (default 512)
      batch_size: 64                  # (default 64)
    reconstruct:                      # optional, needs --data: train each block's factors to its original output
      steps: 100                      # Adam steps per block, one calibration batch each (0 = off); lr, train
    finetune:                         # optional, needs --data: distillation from the original after the rewrite
      max_minutes: 10                 # budget: steps (0 = off), epochs, max_minutes; whichever ends first
      batch_size: 64                  # per process; optimizer adamw | sgd, lr, momentum, weight_decay, warmup
      temperature: 4.0                # KL on softened logits; alpha mixes it with cross-entropy (labels)
      feature_weight: 1.0             # match each rewritten layer's output to the original layer's
      batchnorm: frozen               # frozen | train (re-estimate statistics); augment, holdout, evaluations, seed
    export:                           # optional
      opset: 17                       # int >= 17 (default 17)
      tolerance: 1.0e-4               # float > 0 (default 1e-4), relative Frobenius error ORT vs torch
      quantize: none                  # none | dynamic | static (QDQ, per-channel, calibrated on --data)
      int8_tolerance: 0.05            # max fraction of top-1 disagreement INT8 vs float compressed (relative
                                      # output error for outputs without classes)
    bench:                            # optional: ONNX Runtime latency, original vs compressed
      threads: [1, 0]                 # intra-op threads per measurement (0 = all cores); [] skips
      runs: 50                        # timed runs per model and setting (0 skips), after warmup: 5
      providers: [CPUExecutionProvider]
      cache: ~/.cache/compressor/latency   # per-layer timings for target: {latency: f}
      layer_runs: 20
    task:                             # optional: what the outputs are (default: detected)
      kind: auto                      # auto | classification | segmentation | other
      ignore_index: 255               # segmentation labels to ignore
      weights: [1.0, 0.5]             # fine-tune loss weight per output (default 1 each)

Entry points: :func:`load_recipe` (path, dict or ``Recipe``, plus ``--set KEY=VALUE`` overrides) and
:func:`apply_overrides`. Every user error is raised as a single-line :class:`~compressor.errors.RecipeError`.
"""

from __future__ import annotations

import copy
import fnmatch
import os
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from compressor.errors import RecipeError

__all__ = [
    "METHODS",
    "REGEX_PREFIX",
    "ExportConfig",
    "BenchConfig",
    "Calibration",
    "FineTune",
    "DataConfig",
    "EnergyRank",
    "MacsRank",
    "ParamsRank",
    "Target",
    "TaskConfig",
    "Method",
    "Rank",
    "Recipe",
    "Rule",
    "apply_overrides",
    "load_recipe",
]

#: The rewrite methods a rule may name, in documentation order.
METHODS: tuple[str, ...] = ("depthwise_separable", "spatial_separable", "low_rank", "grouped", "cp", "keep")

#: A ``match`` pattern starting with this prefix is a regular expression (full match), not a glob.
REGEX_PREFIX = "re:"

Method = Literal["depthwise_separable", "spatial_separable", "low_rank", "grouped", "cp", "keep"]
#: The methods a ``layer_type: linear`` rule may name.
LINEAR_METHODS = ("low_rank", "keep")
assert get_args(Method) == METHODS  # keep the constant and the Literal in step

# Strict: rejects bools, strings and floats instead of silently coercing them.
PositiveStrictInt = Annotated[int, Field(strict=True, gt=0)]
_ROUND_TO = TypeAdapter(Optional[PositiveStrictInt])

_RANK_EXPECTED = (
    "expected a positive integer, 'full', 'vbmf', {macs: f}, {params: f} or {energy: f} with 0 < f <= 1"
)
_METHOD_EXPECTED = (
    "expected one of " + ", ".join(map(repr, METHODS)) + ", or a non-empty list of them"
)
_Fraction = Annotated[float, Field(strict=True, gt=0, le=1, allow_inf_nan=False)]
# Strict: an int is accepted (as a float), a bool or a string is not.
_Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
_Positive = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]
_MAX_REPR = 80


def _short_repr(value: Any) -> str:
    """``repr(value)`` on one line, truncated so that error messages stay readable."""
    text = " ".join(repr(value).split())
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."


def _one_line(text: str) -> str:
    """Collapse all whitespace runs (newlines included) to single spaces."""
    return " ".join(str(text).split())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class MacsRank(BaseModel):
    """Rank chosen per layer so that the rewritten layer keeps ``macs`` of the original MACs (0 < macs <= 1)."""

    model_config = ConfigDict(extra="forbid")

    macs: _Fraction


class ParamsRank(BaseModel):
    """Rank chosen per layer so that the rewritten layer keeps ``params`` of the original parameters."""

    model_config = ConfigDict(extra="forbid")

    params: _Fraction


class EnergyRank(BaseModel):
    """Smallest rank keeping fraction ``energy`` of the (whitened, with data) squared singular values."""

    model_config = ConfigDict(extra="forbid")

    energy: _Fraction


#: A rule's rank: a positive int, ``"full"``, ``"vbmf"``, or a budget/energy mapping.
Rank = Union[PositiveStrictInt, Literal["full", "vbmf"], MacsRank, ParamsRank, EnergyRank]


class Rule(BaseModel):
    """One recipe rule: a name pattern, optional shape filters, and what to do with matching layers.

    ``describe()`` needs the rule's position in the recipe: :class:`Recipe` stores it privately after
    validation (``rule.index``); a ``Rule`` built on its own has ``index is None`` unless you pass one to
    ``describe(index)``. Rule instances handed to ``Recipe(...)`` are re-validated into copies, so one
    ``Rule`` object used twice (or in two recipes) does not share its index.
    """

    model_config = ConfigDict(extra="forbid", revalidate_instances="always")

    match: Union[str, list[str]]
    method: Union[Method, list[Method]]
    #: ``None`` means "full" for a fixed rule and "chosen by the budget" under a recipe ``target``.
    rank: Optional[Rank] = None
    #: Computed ranks make intermediate channel counts multiples of this; "auto" (the default) is the
    #: NCHWc block of this machine's CPU (compressor.cpu), and leaves ranks below one block free.
    round_to: Union[Literal["auto"], PositiveStrictInt, None] = "auto"
    groups: PositiveStrictInt = 1
    kernel_size: Optional[tuple[int, int]] = None
    min_kernel_size: Optional[PositiveStrictInt] = None
    min_in_channels: Optional[PositiveStrictInt] = None
    min_out_channels: Optional[PositiveStrictInt] = None
    #: Which layers the rule selects: ``conv`` (``nn.Conv2d``) or ``linear`` (``nn.Linear``, whose
    #: in/out features are the channels). A Linear is rewritten only by a rule that says so, so
    #: ``match: "*"`` never reaches a model's classifier.
    layer_type: Literal["conv", "linear"] = "conv"

    _index: Optional[int] = PrivateAttr(default=None)

    @field_validator("round_to", mode="wrap")
    @classmethod
    def _check_round_to(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if value == "auto":
            return value
        try:
            return _ROUND_TO.validate_python(value)
        except ValidationError as err:  # one message, not one per member of the union
            reason = err.errors()[0]["msg"]
            raise PydanticCustomError("round_to_type", "{reason} (or 'auto', or null)", {"reason": reason}) from None

    @field_validator("match", mode="before")
    @classmethod
    def _check_match(cls, value: Any) -> Any:
        patterns = [value] if isinstance(value, str) else value
        if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) for p in patterns):
            raise ValueError(
                f"expected a pattern string or a non-empty list of pattern strings; got {_short_repr(value)}"
            )
        for pattern in patterns:
            if pattern == "" or pattern == REGEX_PREFIX:
                raise ValueError(f"empty pattern {pattern!r}")
            if pattern.startswith(REGEX_PREFIX):
                try:
                    re.compile(pattern[len(REGEX_PREFIX) :])
                except re.error as exc:
                    raise ValueError(f"invalid regex {pattern!r}: {exc}") from None
        return value

    @field_validator("rank", mode="wrap")
    @classmethod
    def _check_rank(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # The union yields one sub-error per member; report a single readable one instead.
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("rank_type", "{expected}; got {got}", {
                "expected": _RANK_EXPECTED, "got": _short_repr(value)
            }) from None

    @field_validator("kernel_size", mode="before")
    @classmethod
    def _normalize_kernel_size(cls, value: Any) -> Any:
        if value is None:
            return None
        if _is_int(value) and value > 0:
            return (value, value)
        if (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all(_is_int(v) and v > 0 for v in value)
        ):
            return tuple(value)
        raise ValueError(f"expected a positive int k or a pair [kh, kw] of positive ints; got {_short_repr(value)}")

    @field_validator("method", mode="wrap")
    @classmethod
    def _check_method(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # Like rank: the union yields one sub-error per member (with pydantic's ``literal[...]`` tags in
        # the location); report a single readable one that names the offending value instead.
        try:
            if not isinstance(value, (str, list, tuple)):  # a set would lose the order of the methods
                raise ValueError
            value = handler(value)
        except (ValidationError, ValueError):
            got = _short_repr(value)
            if isinstance(value, (list, tuple)):
                bad = [(i, m) for i, m in enumerate(value) if not (isinstance(m, str) and m in METHODS)]
                if bad:
                    i, m = bad[0]
                    got = f"{_short_repr(m)} (item {i} of {got})"
            raise PydanticCustomError("method_type", "{expected}; got {got}", {
                "expected": _METHOD_EXPECTED, "got": got
            }) from None
        if isinstance(value, list):
            if not value:
                raise ValueError(f"expected a method or a non-empty list of methods from {', '.join(METHODS)}")
            if len(set(value)) != len(value):
                raise ValueError(f"method list {value} names a method twice")
            if len(value) == 1:
                return value[0]
        return value

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Rule:
        if self.groups > 1 and "grouped" not in self.methods:
            raise ValueError(
                f"groups {self.groups} is only valid with method 'grouped'; got method {self.method!r}"
            )
        if "grouped" in self.methods and isinstance(self.rank, int) and self.rank % self.groups != 0:
            raise ValueError(f"rank {self.rank} is not divisible by groups {self.groups}")
        if self.layer_type == "linear":
            other = [m for m in self.methods if m not in LINEAR_METHODS]
            if other:
                raise ValueError(f"layer_type linear takes method {' or '.join(LINEAR_METHODS)}; got {', '.join(other)}")
            shaped = [key for key in ("kernel_size", "min_kernel_size") if getattr(self, key) is not None]
            if shaped:
                raise ValueError(f"{', '.join(shaped)} filter conv kernels; a layer_type linear rule has none")
        if isinstance(self.method, list) and self.rank is not None:
            raise ValueError(
                f"a list of methods ({', '.join(self.method)}) leaves method and rank to the budget solver; "
                "remove rank, or name a single method"
            )
        return self

    @property
    def methods(self) -> tuple[str, ...]:
        """The allowed methods as a tuple (one element for a single method)."""
        return (self.method,) if isinstance(self.method, str) else tuple(self.method)

    @property
    def solved(self) -> bool:
        """True when the budget solver chooses this rule's method and rank (no fixed rank given)."""
        return self.rank is None and self.methods != ("keep",)

    @property
    def patterns(self) -> tuple[str, ...]:
        """The ``match`` patterns as a tuple (one element when ``match`` is a single string)."""
        return (self.match,) if isinstance(self.match, str) else tuple(self.match)

    @property
    def index(self) -> Optional[int]:
        """Position of this rule in its recipe (set by :class:`Recipe` validation), or ``None``."""
        return self._index

    def matches_name(self, name: str) -> bool:
        """True when any pattern matches the whole qualified module name.

        Globs use :func:`fnmatch.fnmatchcase` (``*`` may cross dots); ``re:`` patterns use :func:`re.fullmatch`.
        """
        for pattern in self.patterns:
            if pattern.startswith(REGEX_PREFIX):
                if re.fullmatch(pattern[len(REGEX_PREFIX) :], name):
                    return True
            elif fnmatch.fnmatchcase(name, pattern):
                return True
        return False

    def selects(
        self,
        name: str,
        kernel_size: Union[tuple[int, int], int],
        in_channels: int,
        out_channels: int,
        *,
        linear: bool = False,
    ) -> bool:
        """True when the name matches a pattern and the layer (an ``nn.Linear`` when ``linear``, with
        kernel 1x1 and its features as channels) is of the rule's ``layer_type`` and passes its filters."""
        if linear != (self.layer_type == "linear") or not self.matches_name(name):
            return False
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if self.kernel_size is not None and (kh, kw) != self.kernel_size:
            return False
        if self.min_kernel_size is not None and (kh < self.min_kernel_size or kw < self.min_kernel_size):
            return False
        if self.min_in_channels is not None and in_channels < self.min_in_channels:
            return False
        if self.min_out_channels is not None and out_channels < self.min_out_channels:
            return False
        return True

    def describe(self, index: Optional[int] = None) -> str:
        """Short label such as ``rule 0 (match 'layer*.conv*')``.

        ``index`` defaults to the position stored by :class:`Recipe`; ``?`` when neither is known.
        """
        if index is None:
            index = self._index
        label = "?" if index is None else str(index)
        match = repr(self.match) if isinstance(self.match, str) else "[" + ", ".join(map(repr, self.match)) + "]"
        return f"rule {label} (match {match})"


class ExportConfig(BaseModel):
    """ONNX export settings and the ORT-vs-PyTorch parity tolerance."""

    model_config = ConfigDict(extra="forbid")

    opset: Annotated[int, Field(strict=True, ge=17)] = 17
    #: Max relative error ``||ort - torch||_F / ||torch||_F``.
    tolerance: Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)] = 1e-4
    #: INT8 copy of the compressed model (compressed.int8.onnx): none, dynamic (weights only, no data),
    #: or static (QDQ, per-channel weights, activations calibrated on --data).
    quantize: Literal["none", "dynamic", "static"] = "none"
    #: Largest fraction of samples on which the INT8 model's top-1 may differ from the float compressed
    #: model's; beyond it the run fails (exit 2).
    int8_tolerance: Annotated[float, Field(strict=True, ge=0, le=1, allow_inf_nan=False)] = 0.05


class BenchConfig(BaseModel):
    """ONNX Runtime latency of original.onnx vs compressed.onnx (``runs: 0`` or ``threads: []`` skips it)."""

    model_config = ConfigDict(extra="forbid")

    #: Intra-op thread counts, one measurement each; 0 means onnxruntime's default (all cores).
    threads: list[Annotated[int, Field(strict=True, ge=0)]] = Field(default_factory=lambda: [1, 0])
    runs: Annotated[int, Field(strict=True, ge=0)] = 50
    warmup: Annotated[int, Field(strict=True, ge=0)] = 5
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"], min_length=1)
    #: Folder of the per-layer latency cache used by ``target: {latency: f}`` (default
    #: ``$XDG_CACHE_HOME/compressor/latency`` or ``~/.cache/compressor/latency``).
    cache: Optional[str] = None
    #: Timed runs per candidate layer for ``target: {latency: f}``.
    layer_runs: Annotated[int, Field(strict=True, ge=1)] = 20


class Target(BaseModel):
    """A global budget: the compressed model keeps at most this fraction of the original's MACs or params."""

    model_config = ConfigDict(extra="forbid")

    #: The keys are alternatives (exactly one is set): ``--set target.macs=0.4`` on ``target: {params: 0.5}``
    #: replaces the mapping, switching the metric, instead of merging into an invalid ``{params, macs}``.
    _exclusive_keys: ClassVar[bool] = True

    macs: Optional[_Fraction] = None
    params: Optional[_Fraction] = None
    #: Measured ONNX Runtime latency (see compressor/latency.py for what the fraction is of).
    latency: Optional[_Fraction] = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Target:
        given = [key for key in ("macs", "params", "latency") if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError(f"expected exactly one of macs, params, latency (0 < f <= 1); got {given or 'none'}")
        return self

    @property
    def metric(self) -> str:
        return next(key for key in ("macs", "params", "latency") if getattr(self, key) is not None)

    @property
    def fraction(self) -> float:
        return getattr(self, self.metric)


class DataConfig(BaseModel):
    """Normalization of uint8 arrays and image files: ``(x / 255 - mean) / std`` per channel."""

    model_config = ConfigDict(extra="forbid")

    mean: Optional[Annotated[list[_Finite], Field(strict=True)]] = None
    std: Optional[Annotated[list[_Positive], Field(strict=True)]] = None

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _check_channels(cls, value: Any) -> Any:
        if isinstance(value, tuple):  # Python callers; YAML gives lists (strict lists reject sets, whose order is lost)
            value = list(value)
        if isinstance(value, list) and not value:
            raise ValueError("expected a non-empty list of numbers, one per channel; got []")
        return value

    @model_validator(mode="after")
    def _same_length(self) -> DataConfig:
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values but std has {len(self.std)}; give one per channel")
        return self


class Calibration(BaseModel):
    """How much of ``--data`` feeds the statistics, the least-squares refits and the budget's error estimates."""

    model_config = ConfigDict(extra="forbid")

    samples: PositiveStrictInt = 512
    batch_size: PositiveStrictInt = 64
    #: Calibration samples (of ``samples``) on which each layer's end-to-end sensitivity is measured
    #: for the budget solver (one backward pass; see compressor/sensitivity.py); 0: plain sum of errors.
    sensitivity_samples: Annotated[int, Field(strict=True, ge=0)] = 128
    #: The ``samples`` are a pseudo-random draw (this seed) from an npz or image folder ``--data``:
    #: files come class by class, so the first 512 of a sorted set may all be one class.
    seed: Annotated[int, Field(strict=True, ge=0)] = 0
    #: The refit's one pass holds every calibration image's live activations, of the original and the
    #: compressed network; past this many GiB they are stored in float16 (report: ``refit_activations``).
    activation_memory_gib: _Positive = 4.0
    #: A conv that feeds a residual addition (through its BatchNorm) is refitted so that the *sum*
    #: matches the original network's, absorbing the error the shortcut carries; ``false`` fits its own
    #: output only (as the re-run path does for a model FX cannot trace). Shared ResNet-32, half the MACs,
    #: no fine-tune, held-out, calibration seeds 0/1/2: -0.85/-1.06/-1.23 -> -0.60/-0.87/-1.18 pt.
    block_targets: Annotated[bool, Field(strict=True)] = True


class Reconstruct(BaseModel):
    """Block reconstruction after the refit (see :mod:`compressor.reconstruct`); needs ``--data``.

    Each piece of the graph that holds rewritten layers (a residual block) is trained for ``steps``
    Adam steps, one calibration batch each, to reproduce the original piece's output; the calibration
    images are all it reads (no labels).
    """

    model_config = ConfigDict(extra="forbid")

    #: Per piece; 0 turns it off.
    steps: Annotated[int, Field(strict=True, ge=0)] = 100
    #: Peak learning rate of the cosine schedule.
    lr: _Positive = 1e-3
    #: What a piece trains: ``all`` its parameters (the layers kept as they were too),
    #: ``factors_and_norms`` (the rewritten layers' and the normalization layers' affine parameters),
    #: ``factors``. ResNet-32 at half the MACs, three draws: all -0.50 mean, factors_and_norms -0.58.
    train: Literal["all", "factors_and_norms", "factors"] = "all"


class FineTune(BaseModel):
    """Brief distillation from the original model after the rewrite (see :mod:`compressor.finetune`).

    The budget is ``steps``, ``epochs`` and/or ``max_minutes``, whichever ends first; at least one must be
    set, and ``steps: 0`` turns fine-tuning off. ``max_minutes`` covers the whole step, evaluations included.
    """

    model_config = ConfigDict(extra="forbid")

    steps: Optional[Annotated[int, Field(strict=True, ge=0)]] = None
    epochs: Optional[_Positive] = None
    max_minutes: Optional[_Positive] = None
    #: Per process: under torchrun the global batch is ``batch_size x processes``.
    batch_size: PositiveStrictInt = 64
    optimizer: Literal["adamw", "sgd"] = "adamw"
    #: Peak learning rate; unset: 1e-3 for adamw, 1e-2 for sgd.
    lr: Optional[_Positive] = None
    momentum: Annotated[float, Field(strict=True, ge=0, lt=1, allow_inf_nan=False)] = 0.9
    weight_decay: Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)] = 1e-4
    #: Fraction of the budget with a linear warmup before the cosine decay.
    warmup: Annotated[float, Field(strict=True, ge=0, lt=1, allow_inf_nan=False)] = 0.05
    temperature: _Positive = 4.0
    #: Weight of the distillation (KL) term against cross-entropy when labels exist; 1 ignores labels.
    alpha: Annotated[float, Field(strict=True, ge=0, le=1, allow_inf_nan=False)] = 0.7
    #: Weight of the per-layer term matching each rewritten layer's output to the original layer's.
    #: Off by default: on held-out images it recovered less per minute than the output distillation alone.
    feature_weight: Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)] = 0.0
    #: ``frozen``: BatchNorm keeps the original running statistics; ``train``: they are re-estimated.
    batchnorm: Literal["frozen", "train"] = "frozen"
    #: Random crop (zero padding of 1/8 of the side) and horizontal flip; unset: on for 1- and 3-channel inputs.
    augment: Optional[bool] = None
    #: Held-out part of ``--data`` (a count, or a fraction < 1) the best weights are picked on.
    holdout: Union[int, float] = 0.1
    #: Held-out evaluations spread over the budget; the best weights seen are kept.
    evaluations: PositiveStrictInt = 2
    seed: Annotated[int, Field(strict=True, ge=0)] = 0

    @field_validator("holdout", mode="before")
    @classmethod
    def _check_holdout(cls, value: Any) -> Any:
        if (_is_int(value) and value >= 1) or (isinstance(value, float) and 0 < value < 1):
            return value
        raise ValueError(f"expected a count >= 1 or a fraction 0 < f < 1 of --data; got {_short_repr(value)}")

    @model_validator(mode="after")
    def _needs_budget(self) -> FineTune:
        if self.steps is None and self.epochs is None and self.max_minutes is None:
            raise ValueError("set a budget: steps, epochs or max_minutes (whichever ends first; steps: 0 turns it off)")
        return self

    @property
    def enabled(self) -> bool:
        return self.steps != 0

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.optimizer == "adamw" else 1e-2


class TaskConfig(BaseModel):
    """What the model's outputs are, for distillation and metrics (see :mod:`compressor.task`).

    ``kind: auto`` detects it from the outputs on the example input: one (N, K) output is
    classification, one (N, K, H, W) output segmentation, anything else ``other``. Set it to treat
    the first of several outputs as logits. ``weights``: one per output (flattened in the model's
    order), weighing each output's term in the fine-tune's loss; default 1 each.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["auto", "classification", "segmentation", "other"] = "auto"
    #: Segmentation labels with this value mark positions without a label.
    ignore_index: Annotated[int, Field(strict=True)] = 255
    weights: Optional[Annotated[list[Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)]], Field(strict=True)]] = None

    @field_validator("weights", mode="after")
    @classmethod
    def _some_weight(cls, value: Optional[list[float]]) -> Optional[list[float]]:
        if value is not None and not any(w > 0 for w in value):
            raise ValueError(f"expected one weight >= 0 per output, at least one > 0; got {_short_repr(value)}")
        return value


class Recipe(BaseModel):
    """A validated recipe. Rules are ordered; the first rule that selects a layer wins."""

    model_config = ConfigDict(extra="forbid")

    name: Optional[str] = None
    description: Optional[str] = None
    input_shape: Optional[tuple[int, int, int, int]] = None
    rules: list[Rule]
    target: Optional[Target] = None
    data: DataConfig = Field(default_factory=DataConfig)
    calibration: Calibration = Field(default_factory=Calibration)
    #: Off unless set (it needs --data); see :class:`Reconstruct`.
    reconstruct: Optional[Reconstruct] = None
    #: Off unless set (it needs --data); see :class:`FineTune`.
    finetune: Optional[FineTune] = None
    export: ExportConfig = Field(default_factory=ExportConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)

    @field_validator("name", "description", mode="before")
    @classmethod
    def _numbers_to_str(cls, value: Any) -> Any:
        # ``name: 2024`` or ``--set name=1.5`` arrive as numbers from YAML; keep them as text.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator("task", mode="before")
    @classmethod
    def _task_shorthand(cls, value: Any) -> Any:
        # ``task: segmentation`` is short for ``task: {kind: segmentation}``.
        return {"kind": value} if isinstance(value, str) else value

    @field_validator("input_shape", mode="before")
    @classmethod
    def _check_input_shape(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, (list, tuple)) and len(value) == 4 and all(_is_int(v) and v > 0 for v in value):
            return tuple(value)
        raise ValueError(f"expected 4 positive ints [N, C, H, W]; got {_short_repr(value)}")

    @field_validator("rules", mode="after")
    @classmethod
    def _check_rules(cls, value: list[Rule]) -> list[Rule]:
        if not value:
            raise ValueError("at least one rule is required")
        return value

    @model_validator(mode="after")
    def _index_rules(self) -> Recipe:
        for i, rule in enumerate(self.rules):
            rule._index = i
            if self.target is None and isinstance(rule.method, list):
                raise ValueError(
                    f"rules.{i}: a list of methods needs a recipe target (e.g. target: {{macs: 0.5}}) "
                    "for the budget solver to choose between them"
                )
        return self

    def rule_for(
        self,
        name: str,
        kernel_size: Union[tuple[int, int], int],
        in_channels: int,
        out_channels: int,
        *,
        linear: bool = False,
    ) -> Optional[Rule]:
        """The first rule that selects the layer (an ``nn.Linear`` when ``linear``), or ``None``."""
        for rule in self.rules:
            if rule.selects(name, kernel_size, in_channels, out_channels, linear=linear):
                return rule
        return None


# --------------------------------------------------------------------------------------------------------
# Schema walking (shared by overrides and error formatting)


@dataclass(frozen=True)
class _UnionOf:
    """A field that may hold any of several models (a rule's ``rank``: MacsRank, ParamsRank, EnergyRank).

    A key picks the member that defines it; the keys allowed there are those of all members.
    """

    members: tuple[type[BaseModel], ...]


#: A schema node whose instances are mappings.
_Mapping = Union[type[BaseModel], _UnionOf]


@dataclass(frozen=True)
class _ListOf:
    item: _Mapping


_Schema = Union[type[BaseModel], _UnionOf, _ListOf]


def _schema_of(annotation: Any) -> Optional[_Schema]:
    """The model, union of models or list of those that a field can descend into; ``None`` for a plain value.

    The plain members of a union (``8``, ``"full"``, ``None`` for a rank) are left out: a dotted key can only
    descend into the mapping forms.
    """
    origin = get_origin(annotation)
    if origin is Annotated:
        return _schema_of(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        models: list[type[BaseModel]] = []
        other: Optional[_Schema] = None
        for arg in get_args(annotation):
            found = _schema_of(arg)
            if isinstance(found, _UnionOf):
                models.extend(found.members)
            elif isinstance(found, type):
                models.append(found)
            elif found is not None and other is None:
                other = found
        models = list(dict.fromkeys(models))
        if models:
            return models[0] if len(models) == 1 else _UnionOf(tuple(models))
        return other
    if origin in (list, Sequence):
        (item,) = get_args(annotation) or (Any,)
        inner = _schema_of(item)
        return _ListOf(inner) if isinstance(inner, (type, _UnionOf)) else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _members(node: _Mapping) -> tuple[type[BaseModel], ...]:
    return node.members if isinstance(node, _UnionOf) else (node,)


def _member_for(node: _Mapping, key: str) -> Optional[type[BaseModel]]:
    """The (first) model of ``node`` that defines ``key``, or ``None``."""
    for model in _members(node):
        if key in model.model_fields:
            return model
    return None


def _allowed(node: _Mapping) -> str:
    """The keys allowed at ``node``: a model's fields, or those of every member of a union, in order."""
    return ", ".join(dict.fromkeys(key for model in _members(node) for key in model.model_fields))


def _where(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path) if path else "top level"


def _walk(loc: Sequence[Any]) -> tuple[Optional[_Schema], tuple[Any, ...]]:
    """Follow a pydantic error location from :class:`Recipe` through the schema.

    Returns the schema node at the end of ``loc`` (``None`` for a plain value or a location the schema
    does not know) and ``loc`` without pydantic's union-member tags (``('rules', 0, 'rank', 'MacsRank')``
    reads ``('rules', 0, 'rank')``, which is what the user wrote).
    """
    node: Optional[_Schema] = Recipe
    shown: list[Any] = []
    for k, part in enumerate(loc):
        if isinstance(node, _ListOf) and isinstance(part, int):
            node = node.item
        elif isinstance(node, _UnionOf) and any(part == m.__name__ for m in node.members):
            # Stay on the union: a key unknown to the member pydantic tried is reported with the keys
            # of all members (``allowed: macs, params, energy``).
            continue
        elif node is not None and not isinstance(node, _ListOf) and isinstance(part, str):
            model = _member_for(node, part)
            node = None if model is None else _schema_of(model.model_fields[part].annotation)
            if model is None:
                return None, (*shown, *loc[k:])
        else:
            return None, (*shown, *loc[k:])
        shown.append(part)
    return node, tuple(shown)


def _model_at(loc: Sequence[Any]) -> Optional[_Mapping]:
    """The model (or union of models) whose instance lives at ``loc``, if any.

    ``('rules', 0)`` -> ``Rule``; ``('rules', 0, 'rank')`` -> the union of MacsRank, ParamsRank, EnergyRank.
    """
    node, _ = _walk(loc)
    return None if node is None or isinstance(node, _ListOf) else node


# --------------------------------------------------------------------------------------------------------
# YAML


class _RecipeLoader(yaml.SafeLoader):
    """Safe loader that reads ``1e-3`` as a float (PyYAML's YAML 1.1 resolver reads it as a string)
    and rejects duplicate keys instead of silently keeping the last one."""

    # Own copy of the resolver table: ``add_implicit_resolver`` would otherwise append to lists shared
    # with ``yaml.SafeLoader``.
    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:float"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r}", key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
# Float resolvers go first so that they win over the int resolver (as in PyYAML's own order).
for _first in "-+0123456789.":
    _RecipeLoader.yaml_implicit_resolvers.setdefault(_first, []).insert(
        0, ("tag:yaml.org,2002:float", _FLOAT_RE)
    )
del _first


def _yaml_error(source: str, exc: yaml.YAMLError) -> RecipeError:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        text = f"{source}: invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
        if exc.context:
            text += f" ({exc.context}"
            if exc.context_mark is not None:
                text += f" at line {exc.context_mark.line + 1}"
            text += ")"
    else:
        text = f"{source}: invalid YAML: {exc}"
    return RecipeError(_one_line(text))


def _parse_value(text: str) -> Any:
    """Parse an override VALUE as YAML (``8`` -> int, ``1e-3`` -> float, ``[1,3,64,64]`` -> list).

    Text that is not valid YAML on its own (``*.conv``, which YAML reads as an alias) is kept as a string.
    """
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        return text.strip()


# --------------------------------------------------------------------------------------------------------
# Overrides


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a deep copy of the raw recipe mapping with ``KEY=VALUE`` overrides applied in order.

    ``KEY`` is a dotted path through the schema (``rules.0.rank``, ``export.opset``, ``rules.0.rank.macs``);
    any key the schema defines may be set, missing intermediate mappings are created, and a plain value
    standing where a mapping is needed (``rank: full`` under ``rules.0.rank.macs=0.5``) is replaced.
    Where a field takes one of several mappings (a rank: ``{macs: f}``, ``{params: f}`` or ``{energy: e}``),
    the key picks the form, and keys of another form are dropped: a rank has exactly one key, so
    ``rules.0.rank.energy=0.9`` on ``rank: {macs: 0.5}`` gives ``{energy: 0.9}``, not ``{macs, energy}``.
    Likewise the target takes exactly one of ``macs``/``params``, so ``target.macs=0.4`` on
    ``target: {params: 0.5}`` gives ``{macs: 0.4}``. (A null VALUE clears its key and drops nothing.)
    ``VALUE`` is parsed as YAML (an empty VALUE is ``null``, which clears an optional key).
    The result is not validated. Raises :class:`RecipeError` for a malformed override, a key the schema
    does not define, or a list index that does not exist. ``raw`` is not modified, and neither is any
    other part of the result: a mapping or list shared by YAML anchors (``<<: *base``) is copied before
    an override changes it, so ``rules.1.rank.macs=0.25`` never changes rule 0 as well.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    result: dict[str, Any] = copy.deepcopy(dict(raw))
    for override in overrides:
        _apply_one(result, override)
    return result


def _drop_other_keys(container: dict[Any, Any], node: _Mapping, model: type[BaseModel], key: str) -> None:
    """Before ``key`` is set: drop the keys that cannot stand beside it (see :func:`apply_overrides`)."""
    if getattr(model, "_exclusive_keys", False):
        keep: Any = {key}
    elif isinstance(node, _UnionOf):
        keep = model.model_fields
    else:
        return
    for other in [k for k in container if k not in keep]:
        del container[other]


def _apply_one(raw: dict[str, Any], override: str) -> None:
    if not isinstance(override, str):
        raise RecipeError(f"--set {_short_repr(override)}: expected a KEY=VALUE string")
    label = f"--set {_one_line(override)}"
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep:
        raise RecipeError(f"{label}: expected KEY=VALUE (e.g. rules.0.rank=8)")
    if not key:
        raise RecipeError(f"{label}: empty KEY; expected KEY=VALUE (e.g. rules.0.rank=8)")
    segments = key.split(".")
    if any(not s.strip() for s in segments):
        raise RecipeError(f"{label}: empty segment in key {key!r}")
    segments = [s.strip() for s in segments]
    value = _parse_value(text)

    # ``container`` is always a mapping or list of the result's own (copied on the way down), so
    # changing it never reaches ``raw`` or a YAML-aliased twin elsewhere in the result.
    node: _Schema = Recipe
    container: Any = raw
    walked: list[str] = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if isinstance(node, _ListOf):
            n = len(container)
            if not (seg.isascii() and seg.isdigit()):
                raise RecipeError(
                    f"{label}: {_where(walked)} is a list; {seg!r} is not an index"
                    + (f" (use 0..{n - 1})" if n else "")
                )
            idx = int(seg)
            if idx >= n:
                extent = f"{n} entry, index 0" if n == 1 else f"{n} entries, indices 0..{n - 1}" if n else "no entries"
                raise RecipeError(f"{label}: {_where(walked)} has {extent}")
            if last:
                container[idx] = value
                return
            current = container[idx]
            current = container[idx] = dict(current) if isinstance(current, dict) else {}
            container, node = current, node.item
        else:
            model = _member_for(node, seg)
            if model is None:
                under = f"under {_where(walked)}" if walked else "at top level"
                raise RecipeError(f"{label}: {seg!r} is not a recipe key {under}; allowed: {_allowed(node)}")
            if not (last and value is None):
                _drop_other_keys(container, node, model, seg)
            if last:
                container[seg] = value
                return
            child = _schema_of(model.model_fields[seg].annotation)
            here = _where([*walked, seg])
            if child is None:
                raise RecipeError(
                    f"{label}: {segments[i + 1]!r} is not a recipe key under {here}; {here} takes a plain value"
                )
            current = container.get(seg)
            if isinstance(child, _ListOf):
                if current is None:
                    current = []
                elif not isinstance(current, list):
                    raise RecipeError(f"{label}: cannot index {here}: it is not a list (got {_short_repr(current)})")
                current = container[seg] = list(current)
            else:
                current = container[seg] = dict(current) if isinstance(current, dict) else {}
            container, node = current, child
        walked.append(seg)


# --------------------------------------------------------------------------------------------------------
# Validation errors


def _format_error(err: Mapping[str, Any]) -> str:
    _, loc = _walk(tuple(err.get("loc", ())))
    kind = err.get("type", "")
    msg = str(err.get("msg", ""))
    if kind == "extra_forbidden":
        parent, key = loc[:-1], loc[-1] if loc else "?"
        model = _model_at(parent)
        allowed = f"; allowed: {_allowed(model)}" if model is not None else ""
        where = _where(parent)
        return f"unknown key {str(key)!r} at {where}{allowed}"
    if kind == "missing":
        parent, key = loc[:-1], loc[-1] if loc else "?"
        prefix = f"{_where(parent)}: " if parent else ""
        return f"{prefix}missing required key {str(key)!r}"
    if kind == "value_error" and msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    elif kind not in ("rank_type", "method_type", "value_error", "assertion_error"):
        msg = f"{msg}; got {_short_repr(err.get('input'))}"
    return f"{_where(loc)}: {msg}" if loc else msg


def _validation_error(source: str, exc: ValidationError) -> RecipeError:
    parts = [_one_line(f"{source}: {_format_error(e)}") for e in exc.errors()]
    return RecipeError("; ".join(parts))


def _validate(raw: Any, source: str) -> Recipe:
    if not isinstance(raw, Mapping):
        kind = "nothing (empty document)" if raw is None else f"a {type(raw).__name__}"
        raise RecipeError(f"{source}: a recipe must be a mapping at the top level; got {kind}")
    try:
        return Recipe.model_validate(dict(raw))
    except ValidationError as exc:
        raise _validation_error(source, exc) from None


# --------------------------------------------------------------------------------------------------------
# Loading


def _read_yaml(path: Path) -> Any:
    shown = str(path)
    if not path.exists():
        raise RecipeError(f"recipe file not found: {shown}")
    if path.is_dir():
        raise RecipeError(f"recipe path is a directory, not a file: {shown}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(_one_line(f"cannot read recipe file {shown}: {exc}")) from None
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise _yaml_error(shown, exc) from None


def load_recipe(
    source: Union[str, os.PathLike[str], Mapping[str, Any], Recipe],
    overrides: Sequence[str] = (),
) -> Recipe:
    """Load, override and validate a recipe.

    ``source`` is a path to a YAML file (``str`` or path-like), a raw mapping, or a ``Recipe`` (which is
    dumped, overridden and re-validated, so the result is always a new object). ``overrides`` are
    ``KEY=VALUE`` strings applied in order (see :func:`apply_overrides`).

    Every problem raises a single-line :class:`RecipeError`: ``recipe file not found: PATH``,
    ``PATH: invalid YAML at line L, column C: ...``, ``PATH: a recipe must be a mapping at the top level; got a list``,
    ``--set KEY=VALUE: ...`` for a bad override, or ``SOURCE: LOC: MESSAGE[; SOURCE: LOC: MESSAGE ...]`` for
    validation errors, where SOURCE is the file path or ``recipe`` (with `` (with --set overrides)`` appended
    when overrides were given) and LOC a dotted location such as ``rules.0.rank``.
    """
    if isinstance(source, Recipe):
        raw: Any = source.model_dump(mode="python")
        shown = "recipe"
    elif isinstance(source, Mapping):
        raw = source
        shown = "recipe"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        raw = _read_yaml(path)
        shown = str(source) if isinstance(source, str) else str(path)
    else:
        raise TypeError(f"load_recipe() expects a path, a mapping or a Recipe, not {type(source).__name__}")

    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    if overrides:
        if not isinstance(raw, Mapping):
            _validate(raw, shown)  # raises the top-level error
        raw = apply_overrides(raw, overrides)
        shown = f"{shown} (with --set overrides)"
    return _validate(raw, shown)
