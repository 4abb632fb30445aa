"""Read-only planning: which conv gets which method and rank, and why others are skipped."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from compressor import tree
from compressor.cpu import nchwc_block
from compressor.layers import conv_view
from compressor.errors import CompressorError, RecipeError
from compressor.methods import METHODS, conv_macs, conv_params
from compressor.passes.functional import match_functional_convs
from compressor.profile import LayerProfile



@dataclass
class LayerPlan:
    """One conv (module or functional call) and what happens to it. Field names are report keys."""

    name: str
    method: str
    rank: int | None
    kernel: tuple[int, int] | None
    in_channels: int | None
    out_channels: int | None
    macs_before: int | None
    macs_after: int | None
    params_before: int | None
    params_after: int | None
    skipped_reason: str | None = None
    groups: int = 1
    rule: int | None = None
    calls: int = 0
    weight_rel_error: float | None = None
    #: Relative output error on calibration data, after the refit (``None`` without data).
    output_rel_error: float | None = None
    #: The (whitened) relative error the rank choice was based on.
    predicted_error: float | None = None
    #: Predicted distillation-loss increase per unit squared ``predicted_error`` (compressor.sensitivity);
    #: the budget solver weighs this layer's error by it. ``None``: unweighted (no calibration data).
    sensitivity: float | None = None
    init: str | None = None
    note: str | None = None
    round_to: int | None = None
    #: ``round_to`` came from "auto": ranks below one block stay allowed (small layers, tight budgets).
    round_small: bool = False
    #: Methods the budget solver may choose from ("keep" included when the rule allows it); empty
    #: when the rule fixes method and rank.
    choices: tuple[str, ...] = ()

    @property
    def rewrites(self) -> bool:
        return self.method in METHODS

    def add_note(self, text: str | None) -> None:
        if text:
            self.note = f"{self.note}; {text}" if self.note else text


def _conv_entry(name: str, conv: nn.Conv2d, profile: LayerProfile, method: str = "keep", reason: str | None = None):
    macs = conv_macs(conv, profile.calls)
    params = conv_params(conv)
    return LayerPlan(
        name=name,
        method=method,
        rank=None,
        kernel=tuple(conv.kernel_size),
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        macs_before=macs,
        macs_after=macs,
        params_before=params,
        params_after=params,
        skipped_reason=reason,
        calls=len(profile.calls),
    )


def _functional_entries(module: nn.Module) -> list[LayerPlan]:
    """Report entries for the functional convs that stayed functional (see :mod:`.functional`)."""
    entries = []
    for call in match_functional_convs(module):
        shape = tuple(module.get_parameter(call.weight).shape) if call.weight else None
        entries.append(
            LayerPlan(
                name=call.node.name,
                method="keep",
                rank=None,
                kernel=shape[2:] if shape else None,
                in_channels=shape[1] * call.groups if shape else None,
                out_channels=shape[0] if shape else None,
                macs_before=None,
                macs_after=None,
                params_before=None,
                params_after=None,
                skipped_reason=f"functional conv call that cannot become an nn.Conv2d: {call.reason}",
            )
        )
    return entries


def plan_layers(module: nn.Module, recipe, profiles: dict[str, LayerProfile]) -> list[LayerPlan]:
    """Assign every Conv2d of ``module`` its rule (first match wins) and resolve ranks.

    Read-only. Order is ``named_modules`` order, then functional convs in graph order. Ranks are
    left unset (see :func:`compressor.allocate.assign_ranks`). Raises ``RecipeError`` for a rule
    that applies to no layer.
    """
    # nn.Linear layers are opt-in: only those a ``layer_type: linear`` rule names are planned (and
    # reported), so recipes written for convs leave a model's classifier out of the plan as before.
    linear_rules = [rule for rule in recipe.rules if rule.layer_type == "linear"]
    convs = [
        (name, m) for name, m in tree.named_modules(module)
        if isinstance(m, nn.Conv2d) or (isinstance(m, nn.Linear) and any(rule.matches_name(name) for rule in linear_rules))
    ]
    if not any(isinstance(m, nn.Conv2d) for _, m in convs):
        functional = len(_functional_entries(module))
        extra = f" (only {functional} functional conv call(s) that cannot become one)" if functional else ""
        raise CompressorError(f"the model has no nn.Conv2d layer{extra}: nothing to compress")
    applied = [0] * len(recipe.rules)
    selected = [0] * len(recipe.rules)
    plans = []
    for name, layer in convs:
        profile = profiles[name]
        linear = isinstance(layer, nn.Linear)
        conv = _shape_view(layer) if linear and type(layer) is not nn.Linear else conv_view(layer)
        indices = [
            i
            for i, rule in enumerate(recipe.rules)
            if rule.selects(name, tuple(conv.kernel_size), conv.in_channels, conv.out_channels, linear=linear)
        ]
        for i in indices:
            selected[i] += 1
        if not indices:
            plans.append(_conv_entry(name, conv, profile, reason=_unselected_reason(recipe.rules, name, conv, linear)))
            continue
        index = indices[0]
        applied[index] += 1
        rule = recipe.rules[index]
        if linear and type(layer) is not nn.Linear:
            plan = _conv_entry(name, conv, profile, reason=f"{type(layer).__name__} subclasses nn.Linear; its forward may differ")
            plan.rule = index
        else:
            plan = _plan_conv(name, conv, profile, rule, index, solved=recipe.target is not None and rule.solved)
        if linear:
            plan.add_note("nn.Linear; low_rank makes it two nn.Linear layers (in -> R, R -> out)")
        plans.append(plan)
    for index, rule in enumerate(recipe.rules):
        if applied[index]:
            continue
        label = rule.describe(index)
        if selected[index]:
            raise RecipeError(f"{label} selects {selected[index]} layer(s), but earlier rules claim them all")
        if rule.layer_type == "linear":
            names = ", ".join(name for name, m in tree.named_modules(module) if isinstance(m, nn.Linear)) or "(none)"
            raise RecipeError(f"{label} matches no layer; the Linear layers are: {names}")
        names = ", ".join(name for name, m in convs if isinstance(m, nn.Conv2d)) or "(none)"
        raise RecipeError(f"{label} matches no layer; the Conv2d layers are: {names}")
    return plans + _functional_entries(module)


def _shape_view(linear: nn.Linear) -> nn.Conv2d:
    """A weightless (meta) 1x1 conv of a Linear subclass's shape, for its report entry only: such a
    layer is never rewritten, and its weight may be computed or stored otherwise than ``(out, in)``,
    so :func:`conv_view` (which views that weight) does not apply to it."""
    return nn.Conv2d(linear.in_features, linear.out_features, 1, bias=linear.bias is not None, device="meta")


def _unselected_reason(rules, name: str, conv: nn.Conv2d, linear: bool = False) -> str:
    """Why no rule selects ``name``: the filters of the first rule (of its layer type) whose pattern
    matches it (a layer kept by ``min_in_channels`` should say so), or that no pattern matches."""
    kh, kw = conv.kernel_size
    for index, rule in enumerate(rules):
        if not rule.matches_name(name) or linear != (rule.layer_type == "linear"):
            continue
        unmet = []
        if rule.kernel_size is not None and (kh, kw) != tuple(rule.kernel_size):
            unmet.append(f"kernel_size {list(rule.kernel_size)} (it is {kh}x{kw})")
        if rule.min_kernel_size is not None and min(kh, kw) < rule.min_kernel_size:
            unmet.append(f"min_kernel_size {rule.min_kernel_size} (it is {kh}x{kw})")
        if rule.min_in_channels is not None and conv.in_channels < rule.min_in_channels:
            unmet.append(f"min_in_channels {rule.min_in_channels} (it has {conv.in_channels})")
        if rule.min_out_channels is not None and conv.out_channels < rule.min_out_channels:
            unmet.append(f"min_out_channels {rule.min_out_channels} (it has {conv.out_channels})")
        if unmet:
            return f"excluded by {rule.describe(index)} filter {', '.join(unmet)}"
    return "no rule matches"


def _plan_conv(name: str, conv: nn.Conv2d, profile: LayerProfile, rule, index: int, *, solved: bool) -> LayerPlan:
    rewriting = [method for method in rule.methods if method != "keep"]
    if not rewriting:
        plan = _conv_entry(name, conv, profile)
        plan.rule = index
        return plan
    reasons = {}
    for method in rewriting:
        reason = METHODS[method].skip_reason(conv)
        if reason is None and not profile.calls:
            reason = "never called on the example input, so a rewrite could not be verified"
        reasons[method] = reason
    usable = [method for method in rewriting if reasons[method] is None]
    if not usable:
        reason = "; ".join(f"{method} skipped: {reasons[method]}" for method in rewriting)
        plan = _conv_entry(name, conv, profile, reason=reason)
        plan.rule = index
        return plan
    plan = _conv_entry(name, conv, profile, method=usable[0])
    # A grouped conv is factorized per group (only low_rank takes one): its groups are the plan's.
    plan.rule, plan.groups = index, conv.groups if conv.groups > 1 else rule.groups
    plan.round_to, plan.round_small = (nchwc_block(), True) if rule.round_to == "auto" else (rule.round_to, False)
    if solved:
        plan.choices = tuple(usable) + (("keep",) if "keep" in rule.methods else ())
    return plan
