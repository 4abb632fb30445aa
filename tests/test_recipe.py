"""Tests for compressor.recipe: schema, error messages, overrides, matching, loading."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from compressor.errors import CompressorError, RecipeError
from compressor.recipe import (
    METHODS,
    Calibration,
    DataConfig,
    EnergyRank,
    ExportConfig,
    MacsRank,
    ParamsRank,
    Recipe,
    Rule,
    Target,
    apply_overrides,
    load_recipe,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RULE_KEYS = "match, method, rank, round_to, groups, kernel_size, min_kernel_size, min_in_channels, min_out_channels"
TOP_KEYS = "name, description, input_shape, rules, target, data, calibration, reconstruct, finetune, export, bench, task"
METHOD_NAMES = ("depthwise_separable", "spatial_separable", "low_rank", "grouped", "cp", "keep")
RANK_EXPECTED = (
    "expected a positive integer, 'full', 'vbmf', {macs: f}, {params: f} or {energy: f} with 0 < f <= 1"
)


def rule(**kw: Any) -> dict[str, Any]:
    """A minimal valid raw rule, updated with ``kw``."""
    base: dict[str, Any] = {"match": "layer*.conv*", "method": "depthwise_separable"}
    base.update(kw)
    return base


def recipe(*rules: dict[str, Any], **top: Any) -> dict[str, Any]:
    """A raw recipe with the given rules (one default rule when none given) and top-level keys."""
    return {"rules": list(rules) or [rule()], **top}


def error_of(source: Any, overrides: tuple[str, ...] = ()) -> str:
    """The message of the RecipeError that load_recipe raises (fails the test if none is raised)."""
    with pytest.raises(RecipeError) as info:
        load_recipe(source, overrides)
    message = str(info.value)
    assert "\n" not in message, f"message is not one line: {message!r}"
    return message


def assert_contains(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"expected {part!r} in message, got: {message!r}"


# ------------------------------------------------------------------------------------------------ basics


def test_methods_constant() -> None:
    assert METHODS == METHOD_NAMES, METHODS


def test_recipe_error_is_compressor_error() -> None:
    assert issubclass(RecipeError, CompressorError)


# ------------------------------------------------------------------------------------------- good recipes


@pytest.mark.parametrize(
    ("rank", "expected"),
    [
        ("full", "full"),
        (8, 8),
        (1, 1),
        ({"macs": 0.5}, MacsRank(macs=0.5)),
        ({"macs": 1}, MacsRank(macs=1.0)),
        ({"macs": 1.0}, MacsRank(macs=1.0)),
        (MacsRank(macs=0.25), MacsRank(macs=0.25)),
        ("vbmf", "vbmf"),
        ({"params": 0.5}, ParamsRank(params=0.5)),
        ({"params": 1}, ParamsRank(params=1.0)),
        ({"energy": 0.9}, EnergyRank(energy=0.9)),
        ({"energy": 1.0}, EnergyRank(energy=1.0)),
        ({"energy": 1e-3}, EnergyRank(energy=1e-3)),
        (ParamsRank(params=0.25), ParamsRank(params=0.25)),
        (EnergyRank(energy=0.5), EnergyRank(energy=0.5)),
        (4096, 4096),
    ],
    ids=["full", "int8", "int1", "macs0.5", "macs-int-1", "macs1.0", "macs-instance", "vbmf", "params0.5",
         "params-int-1", "energy0.9", "energy1.0", "energy1e-3", "params-instance", "energy-instance", "int4096"],
)
def test_rank_forms(rank: Any, expected: Any) -> None:
    got = load_recipe(recipe(rule(rank=rank))).rules[0].rank
    assert got == expected, f"rank {rank!r} parsed as {got!r}"
    assert type(got) is type(expected), f"rank {rank!r} parsed as {type(got).__name__}"


def test_rank_defaults_to_none() -> None:
    # None means "full" for a fixed rule and "chosen by the budget" under a recipe target.
    for method in METHODS:
        got = load_recipe(recipe(rule(method=method))).rules[0].rank
        assert got is None, f"{method}: {got!r}"
    assert load_recipe(recipe(rule(rank=None))).rules[0].rank is None
    assert Rule(match="x", method="cp").rank is None


@pytest.mark.parametrize(
    ("kernel_size", "expected"),
    [(3, (3, 3)), ([3, 3], (3, 3)), ([1, 5], (1, 5)), ((5, 1), (5, 1)), (None, None)],
)
def test_kernel_size_normalized(kernel_size: Any, expected: Any) -> None:
    got = load_recipe(recipe(rule(kernel_size=kernel_size))).rules[0].kernel_size
    assert got == expected, f"kernel_size {kernel_size!r} -> {got!r}"


def test_defaults() -> None:
    r = load_recipe(recipe())
    assert r.name is None and r.description is None and r.input_shape is None, r
    assert r.export == ExportConfig(opset=17, tolerance=1e-4), r.export
    only = r.rules[0]
    assert (only.groups, only.kernel_size, only.min_kernel_size, only.min_in_channels, only.min_out_channels) == (
        1, None, None, None, None,
    ), only
    assert only.rank is None and only.round_to == "auto", only
    assert r.target is None, r.target
    assert r.data == DataConfig(mean=None, std=None), r.data
    assert r.calibration == Calibration(samples=512, batch_size=64), r.calibration


def test_full_recipe_fields() -> None:
    r = load_recipe(
        recipe(
            rule(match=["a.*", "re:b\\d+"], method="grouped", rank=8, groups=4, min_in_channels=8),
            rule(match="*", method="keep"),
            name="mobile",
            description="demo",
            input_shape=[1, 3, 224, 224],
            export={"opset": 18, "tolerance": 1e-3},
        )
    )
    assert r.name == "mobile" and r.description == "demo", r
    assert r.input_shape == (1, 3, 224, 224), r.input_shape
    assert r.rules[0].match == ["a.*", "re:b\\d+"], r.rules[0].match
    assert r.rules[0].patterns == ("a.*", "re:b\\d+"), r.rules[0].patterns
    assert r.rules[1].patterns == ("*",), r.rules[1].patterns
    assert r.export.opset == 18 and r.export.tolerance == 1e-3, r.export


def test_numeric_name_kept_as_text() -> None:
    assert load_recipe(recipe(name=2024)).name == "2024"


def test_every_method_accepted() -> None:
    for method in METHODS:
        got = load_recipe(recipe(rule(method=method))).rules[0].method
        assert got == method, got


def test_grouped_divisible_rank_and_non_int_ranks_pass() -> None:
    for rank in (8, "full", {"macs": 0.5}):
        load_recipe(recipe(rule(method="grouped", groups=4, rank=rank)))


def test_describe_uses_index() -> None:
    r = load_recipe(recipe(rule(match="layer*.conv*"), rule(match=["a", "re:b"])))
    assert r.rules[0].describe() == "rule 0 (match 'layer*.conv*')", r.rules[0].describe()
    assert r.rules[1].describe() == "rule 1 (match ['a', 're:b'])", r.rules[1].describe()
    assert r.rules[1].index == 1
    standalone = Rule(match="x", method="keep")
    assert standalone.describe() == "rule ? (match 'x')", standalone.describe()
    assert standalone.describe(5) == "rule 5 (match 'x')", standalone.describe(5)


def test_shared_rule_instances_get_own_index() -> None:
    shared = Rule(match="x", method="keep")
    r = Recipe(rules=[shared, shared])
    assert [x.index for x in r.rules] == [0, 1] and shared.index is None, (r.rules, shared.index)


def test_recipe_source_is_copied() -> None:
    original = load_recipe(recipe(rule(rank={"macs": 0.5}), input_shape=[1, 3, 8, 8]))
    same = load_recipe(original)
    assert same == original and same is not original
    assert same.rules[0] is not original.rules[0]
    assert same.rules[0].describe() == "rule 0 (match 'layer*.conv*')"
    changed = load_recipe(original, ["rules.0.rank=4"])
    assert changed.rules[0].rank == 4 and original.rules[0].rank == MacsRank(macs=0.5), (changed, original)


def test_dict_source_not_mutated() -> None:
    raw = recipe(rule(rank="full"))
    before = copy.deepcopy(raw)
    load_recipe(raw, ["rules.0.rank.macs=0.5", "export.opset=18"])
    assert raw == before, raw


# -------------------------------------------------------------------------------------------- bad recipes


BAD_RECIPES = [
    pytest.param(
        recipe(rule(rnk=8)),
        ["recipe: ", "unknown key 'rnk' at rules.0", f"allowed: {RULE_KEYS}"],
        id="unknown-rule-key",
    ),
    pytest.param(
        recipe(rule(), rule(method="foo")),
        ["recipe: rules.1.method", "'depthwise_separable'", "'spatial_separable'", "'grouped'", "'cp'", "'keep'",
         "got 'foo'"],
        id="bad-method",
    ),
    pytest.param(recipe(rule(rank=0)), ["rules.0.rank:", "got 0"], id="rank-0"),
    pytest.param(recipe(rule(rank=-1)), ["rules.0.rank:", "got -1"], id="rank-negative"),
    pytest.param(recipe(rule(rank="half")), ["rules.0.rank:", "got 'half'"], id="rank-half"),
    pytest.param(recipe(rule(rank={"macs": 1.5})), ["rules.0.rank:", "got {'macs': 1.5}"], id="macs-1.5"),
    pytest.param(recipe(rule(rank={"macs": 0})), ["rules.0.rank:", "got {'macs': 0}"], id="macs-0"),
    pytest.param(recipe(rule(rank={"macs": 0.5, "x": 1})), ["rules.0.rank:"], id="macs-extra-key"),
    pytest.param(recipe(rule(rank=True)), ["rules.0.rank:", "got True"], id="rank-bool"),
    pytest.param(recipe(rule(rank="8")), ["rules.0.rank:", "got '8'"], id="rank-string-int"),
    pytest.param(recipe(rule(rank=8.5)), ["rules.0.rank:", "got 8.5"], id="rank-float"),
    pytest.param(
        recipe(rule(method="keep", groups=2)),
        ["rules.0: groups 2 is only valid with method 'grouped'", "got method 'keep'"],
        id="groups-without-grouped",
    ),
    pytest.param(
        recipe(rule(), rule(method="grouped", rank=6, groups=4)),
        ["rules.1: rank 6 is not divisible by groups 4"],
        id="rank-not-divisible",
    ),
    pytest.param(recipe(rule(groups=0)), ["rules.0.groups:", "got 0"], id="groups-0"),
    pytest.param({"rules": []}, ["recipe: rules: at least one rule is required"], id="empty-rules"),
    pytest.param({"name": "x"}, ["recipe: missing required key 'rules'"], id="no-rules"),
    pytest.param(recipe(rule(match=None)), ["rules.0.match:", "got None"], id="match-none"),
    pytest.param(recipe(rule(match=[])), ["rules.0.match:", "non-empty list", "got []"], id="match-empty-list"),
    pytest.param(recipe(rule(match=[1])), ["rules.0.match:", "got [1]"], id="match-list-of-int"),
    pytest.param(recipe(rule(match="")), ["rules.0.match:", "empty pattern"], id="match-empty-string"),
    pytest.param(
        recipe(rule(), rule(match="re:layer(")),
        ["rules.1.match:", "invalid regex 're:layer('", "missing ), unterminated subpattern"],
        id="bad-regex",
    ),
    pytest.param(
        recipe(rule(match=["ok", "re:[a-"])),
        ["rules.0.match:", "invalid regex 're:[a-'"],
        id="bad-regex-in-list",
    ),
    pytest.param(
        recipe(input_shape=[1, 3, 224]),
        ["recipe: input_shape:", "4 positive ints", "got [1, 3, 224]"],
        id="input-shape-3",
    ),
    pytest.param(recipe(input_shape=[1, 3, 0, 224]), ["input_shape:", "got [1, 3, 0, 224]"], id="input-shape-0"),
    pytest.param(recipe(input_shape=[1, 3, True, 2]), ["input_shape:"], id="input-shape-bool"),
    pytest.param(
        recipe(export={"opset": 16}),
        ["recipe: export.opset:", "greater than or equal to 17", "got 16"],
        id="opset-16",
    ),
    pytest.param(recipe(export={"tolerance": 0}), ["export.tolerance:", "greater than 0", "got 0"], id="tol-0"),
    pytest.param(
        recipe(export={"opset": 17, "tol": 1}),
        ["unknown key 'tol' at export", "allowed: opset, tolerance"],
        id="unknown-export-key",
    ),
    pytest.param(
        recipe(foo=1),
        ["unknown key 'foo' at top level", f"allowed: {TOP_KEYS}"],
        id="unknown-top-key",
    ),
    pytest.param(recipe(rule(kernel_size=[3, 3, 3])), ["rules.0.kernel_size:", "got [3, 3, 3]"], id="ks-3d"),
    pytest.param(recipe(rule(kernel_size=0)), ["rules.0.kernel_size:", "got 0"], id="ks-0"),
    pytest.param(recipe(rule(min_in_channels=0)), ["rules.0.min_in_channels:", "got 0"], id="min-in-0"),
    pytest.param(recipe(rule(min_kernel_size="3")), ["rules.0.min_kernel_size:", "got '3'"], id="min-ks-str"),
    pytest.param({"rules": ["x"]}, ["rules.0:", "got 'x'"], id="rule-not-mapping"),
    pytest.param({"rules": [{"method": "keep"}]}, ["rules.0: missing required key 'match'"], id="rule-no-match"),
]


@pytest.mark.parametrize(("raw", "parts"), BAD_RECIPES)
def test_bad_recipes(raw: dict[str, Any], parts: list[str]) -> None:
    message = error_of(raw)
    assert_contains(message, *parts)


@pytest.mark.parametrize("rank", [0, -1, "half", {"macs": 1.5}, True, {"energy": 0}, {"params": 2}, "vbm"])
def test_rank_error_is_collapsed(rank: Any) -> None:
    message = error_of(recipe(rule(rank=rank)))
    expected = f"recipe: rules.0.rank: {RANK_EXPECTED}; got "
    assert message.startswith(expected), message
    assert message.count("rules.0.rank") == 1, message


def test_several_errors_joined() -> None:
    message = error_of(recipe(rule(method="foo"), rule(rank=0)))
    assert_contains(message, "recipe: rules.0.method", "; recipe: rules.1.rank:")


# -------------------------------------------------------------------------------------------- overrides


BASE = recipe(rule(rank="full"), rule(match="*", method="keep"))


def test_override_existing_key() -> None:
    r = load_recipe(BASE, ["rules.0.rank=8"])
    assert r.rules[0].rank == 8, r.rules[0]


def test_override_key_the_file_omits() -> None:
    r = load_recipe(BASE, ["rules.1.min_in_channels=16", "input_shape=[1,3,64,64]", "name=demo"])
    assert r.rules[1].min_in_channels == 16, r.rules[1]
    assert r.input_shape == (1, 3, 64, 64), r.input_shape
    assert r.name == "demo", r.name


def test_override_creates_export_section() -> None:
    assert "export" not in BASE
    r = load_recipe(BASE, ["export.opset=18"])
    assert r.export.opset == 18 and r.export.tolerance == 1e-4, r.export


def test_override_export_null_section() -> None:
    r = load_recipe({**BASE, "export": None}, ["export.tolerance=0.5"])
    assert r.export.tolerance == 0.5, r.export


def test_override_rank_to_macs() -> None:
    r = load_recipe(BASE, ["rules.0.rank.macs=0.5"])
    assert r.rules[0].rank == MacsRank(macs=0.5), r.rules[0].rank
    r = load_recipe(BASE, ["rules.0.rank={macs: 0.25}"])
    assert r.rules[0].rank == MacsRank(macs=0.25), r.rules[0].rank


@pytest.mark.parametrize(("text", "expected"), [("1e-3", 1e-3), ("1.0e-4", 1e-4), ("2E-2", 2e-2), ("0.5", 0.5)])
def test_override_float_parsing(text: str, expected: float) -> None:
    r = load_recipe(BASE, [f"export.tolerance={text}"])
    assert r.export.tolerance == expected and isinstance(r.export.tolerance, float), r.export


def test_override_value_types() -> None:
    out = apply_overrides(
        BASE,
        ["rules.0.rank=8", "rules.1.rank=full", "input_shape=[1,3,64,64]", "rules.0.match=*.conv",
         "rules.1.match=[a, 're:b']", "rules.0.kernel_size=", "description=a=b"],
    )
    assert out["rules"][0]["rank"] == 8, out
    assert out["rules"][1]["rank"] == "full", out
    assert out["input_shape"] == [1, 3, 64, 64], out
    assert out["rules"][0]["match"] == "*.conv", out
    assert out["rules"][1]["match"] == ["a", "re:b"], out
    assert out["rules"][0]["kernel_size"] is None, out
    assert out["description"] == "a=b", out


def test_apply_overrides_is_pure() -> None:
    raw = copy.deepcopy(BASE)
    out = apply_overrides(raw, ["rules.0.rank.macs=0.5", "export.opset=18"])
    assert raw == BASE, raw
    assert out["rules"][0]["rank"] == {"macs": 0.5} and out["export"] == {"opset": 18}, out


def test_overrides_apply_in_order() -> None:
    r = load_recipe(BASE, ["rules.0.rank=4", "rules.0.rank=16"])
    assert r.rules[0].rank == 16, r.rules[0]


def test_override_replaces_whole_rule() -> None:
    r = load_recipe(BASE, ["rules.1={match: 'x.*', method: grouped, rank: 4, groups: 2}"])
    assert (r.rules[1].match, r.rules[1].method, r.rules[1].groups) == ("x.*", "grouped", 2), r.rules[1]


BAD_OVERRIDES = [
    pytest.param(
        "rules.0.rnk=8",
        [f"--set rules.0.rnk=8: 'rnk' is not a recipe key under rules.0; allowed: {RULE_KEYS}"],
        id="unknown-rule-key",
    ),
    pytest.param(
        "foo=1", [f"--set foo=1: 'foo' is not a recipe key at top level; allowed: {TOP_KEYS}"], id="unknown-top"
    ),
    pytest.param(
        "export.opst=18",
        ["--set export.opst=18: 'opst' is not a recipe key under export; allowed: opset, tolerance"],
        id="unknown-export-key",
    ),
    pytest.param(
        "rules.0.rank.mac=0.5",
        ["--set rules.0.rank.mac=0.5: 'mac' is not a recipe key under rules.0.rank; allowed: macs, params, energy"],
        id="unknown-macs-key",
    ),
    pytest.param(
        "rules.0.rank.energy.x=1",
        ["'x' is not a recipe key under rules.0.rank.energy; rules.0.rank.energy takes a plain value"],
        id="descend-into-energy",
    ),
    pytest.param("rules.3.rank=8", ["--set rules.3.rank=8: rules has 2 entries, indices 0..1"], id="index-range"),
    pytest.param("rules.2=8", ["rules has 2 entries, indices 0..1"], id="index-range-last"),
    pytest.param("rules.x.rank=8", ["--set rules.x.rank=8:", "'x' is not an index"], id="index-not-int"),
    pytest.param("rules.-1.rank=8", ["'-1' is not an index"], id="index-negative"),
    pytest.param("rules.0.rank", ["--set rules.0.rank: expected KEY=VALUE"], id="missing-equals"),
    pytest.param("=8", ["--set =8: empty KEY"], id="empty-key"),
    pytest.param("rules..rank=8", ["empty segment"], id="empty-segment"),
    pytest.param(
        "rules.0.method.x=1",
        ["'x' is not a recipe key under rules.0.method; rules.0.method takes a plain value"],
        id="descend-into-plain",
    ),
]


@pytest.mark.parametrize(("override", "parts"), BAD_OVERRIDES)
def test_bad_overrides(override: str, parts: list[str]) -> None:
    message = error_of(BASE, (override,))
    assert_contains(message, *parts)
    with pytest.raises(RecipeError):
        apply_overrides(BASE, [override])


def test_override_validation_error_names_source(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("rules:\n  - match: a\n    method: grouped\n    groups: 4\n")
    message = error_of(path, ("rules.0.rank=6",))
    assert message == f"{path} (with --set overrides): rules.0: rank 6 is not divisible by groups 4", message
    message = error_of(BASE, ("rules.0.method=bogus",))
    assert message.startswith("recipe (with --set overrides): rules.0.method"), message
    assert_contains(message, "got 'bogus'")


def test_override_index_into_missing_rules() -> None:
    message = error_of({}, ("rules.0.rank=8",))
    assert_contains(message, "rules has no entries")


# ------------------------------------------------------------------------------- new keys: rank forms


BAD_RANKS = [
    pytest.param({"energy": 0}, "{'energy': 0}", id="energy-0"),
    pytest.param({"energy": 1.5}, "{'energy': 1.5}", id="energy-1.5"),
    pytest.param({"energy": -0.5}, "{'energy': -0.5}", id="energy-negative"),
    pytest.param({"energy": float("nan")}, "{'energy': nan}", id="energy-nan"),
    pytest.param({"energy": True}, "{'energy': True}", id="energy-bool"),
    pytest.param({"energy": "0.5"}, "{'energy': '0.5'}", id="energy-string"),
    pytest.param({"params": -1}, "{'params': -1}", id="params-negative"),
    pytest.param({"params": 0}, "{'params': 0}", id="params-0"),
    pytest.param({"params": 1.01}, "{'params': 1.01}", id="params-1.01"),
    pytest.param({"macs": float("inf")}, "{'macs': inf}", id="macs-inf"),
    pytest.param({"macs": 0.5, "params": 0.5}, "{'macs': 0.5, 'params': 0.5}", id="macs-and-params"),
    pytest.param({"energy": 0.9, "macs": 0.5}, "{'energy': 0.9, 'macs': 0.5}", id="energy-and-macs"),
    pytest.param({}, "{}", id="empty-mapping"),
    pytest.param({"latency": 0.5}, "{'latency': 0.5}", id="unknown-rank-key"),
    pytest.param("vbm", "'vbm'", id="vbm"),
    pytest.param("VBMF", "'VBMF'", id="vbmf-uppercase"),
    pytest.param("Full", "'Full'", id="full-capitalized"),
    pytest.param(0.5, "0.5", id="bare-fraction"),
    pytest.param([8], "[8]", id="list"),
]


@pytest.mark.parametrize(("rank", "shown"), BAD_RANKS)
def test_bad_rank_forms(rank: Any, shown: str) -> None:
    message = error_of(recipe(rule(rank=rank)))
    assert message == f"recipe: rules.0.rank: {RANK_EXPECTED}; got {shown}", message
    for form in ("positive integer", "'full'", "'vbmf'", "{macs: f}", "{params: f}", "{energy: f}", "0 < f <= 1"):
        assert_contains(message, form)


def test_bad_rank_in_later_rule_names_its_index() -> None:
    message = error_of(recipe(rule(), rule(method="cp", rank={"energy": 2})))
    assert message == f"recipe: rules.1.rank: {RANK_EXPECTED}; got {{'energy': 2}}", message


# ---------------------------------------------------------------------------------- new keys: round_to


@pytest.mark.parametrize("round_to", [1, 4, 8, 16, None, "auto"])
def test_round_to_accepted(round_to: Any) -> None:
    got = load_recipe(recipe(rule(round_to=round_to))).rules[0].round_to
    assert got == round_to and type(got) is type(round_to), f"round_to {round_to!r} -> {got!r}"


@pytest.mark.parametrize(
    ("round_to", "parts"),
    [
        pytest.param(0, ["greater than 0", "got 0"], id="zero"),
        pytest.param(-8, ["greater than 0", "got -8"], id="negative"),
        pytest.param(2.5, ["valid integer", "got 2.5"], id="float"),
        pytest.param(8.0, ["valid integer", "got 8.0"], id="integral-float"),
        pytest.param("8", ["valid integer", "got '8'"], id="string"),
        pytest.param(True, ["valid integer", "got True"], id="bool"),
    ],
)
def test_round_to_rejected(round_to: Any, parts: list[str]) -> None:
    message = error_of(recipe(rule(round_to=round_to)))
    assert message.startswith("recipe: rules.0.round_to: "), message
    assert_contains(message, *parts)


def test_round_to_with_every_rank_form() -> None:
    for rank in (None, 8, "full", "vbmf", {"macs": 0.5}, {"params": 0.5}, {"energy": 0.9}):
        got = load_recipe(recipe(rule(rank=rank, round_to=8))).rules[0]
        assert got.round_to == 8, (rank, got)


# ------------------------------------------------------------------------------ new keys: method lists


TARGET = {"macs": 0.5}


@pytest.mark.parametrize(
    "methods",
    [
        ["cp", "depthwise_separable"],
        ["depthwise_separable", "spatial_separable", "grouped", "cp"],
        list(METHOD_NAMES),
        ["keep", "cp"],
        ["spatial_separable", "keep"],
    ],
    ids=["cp-dws", "all-rewrites", "all", "keep-cp", "spatial-keep"],
)
def test_method_list_accepted_with_target(methods: list[str]) -> None:
    for target in (TARGET, {"params": 0.3}):
        got = load_recipe(recipe(rule(method=methods), target=target)).rules[0]
        assert got.method == methods, got  # order kept
        assert got.methods == tuple(methods), got.methods
        assert got.rank is None and got.solved is True, got


def test_method_list_rejected_without_target() -> None:
    message = error_of(recipe(rule(method=["cp", "depthwise_separable"])))
    assert message == (
        "recipe: rules.0: a list of methods needs a recipe target (e.g. target: {macs: 0.5}) "
        "for the budget solver to choose between them"
    ), message
    message = error_of(recipe(rule(), rule(match="*", method=["grouped", "cp"])))
    assert_contains(message, "recipe: rules.1:", "a list of methods needs a recipe target")
    message = error_of(recipe(rule(method=["cp", "keep"]), target=None))
    assert_contains(message, "rules.0:", "target")


@pytest.mark.parametrize(
    "rank", [8, "full", "vbmf", {"macs": 0.5}, {"params": 0.5}, {"energy": 0.9}], ids=str
)
def test_method_list_rejected_with_rank(rank: Any) -> None:
    for target in (TARGET, None):
        raw = recipe(rule(method=["cp", "depthwise_separable"], rank=rank), target=target)
        message = error_of(raw)
        assert_contains(
            message,
            "recipe: rules.0: a list of methods (cp, depthwise_separable) leaves method and rank to the budget solver",
            "remove rank, or name a single method",
        )


@pytest.mark.parametrize("target", [TARGET, None], ids=["target", "no-target"])
def test_method_list_empty_rejected(target: Any) -> None:
    message = error_of(recipe(rule(method=[]), target=target))
    assert message.startswith("recipe: rules.0.method: "), message
    assert_contains(message, "non-empty list of methods", ", ".join(METHOD_NAMES))


@pytest.mark.parametrize(
    ("methods", "shown"),
    [(["cp", "cp"], "['cp', 'cp']"), (["grouped", "cp", "grouped"], "['grouped', 'cp', 'grouped']")],
)
def test_method_list_duplicates_rejected(methods: list[str], shown: str) -> None:
    message = error_of(recipe(rule(method=methods), target=TARGET))
    assert message == f"recipe: rules.0.method: method list {shown} names a method twice", message


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_single_method_list_collapses(method: str) -> None:
    # A one-element list is the plain method: no target needed, and a fixed rank is allowed.
    got = load_recipe(recipe(rule(method=[method]))).rules[0]
    assert got.method == method and isinstance(got.method, str), got
    assert got.methods == (method,), got.methods
    fixed = load_recipe(recipe(rule(method=[method], rank=8))).rules[0]
    assert fixed.method == method and fixed.rank == 8 and fixed.solved is False, fixed
    assert Rule(match="x", method=[method]).method == method


@pytest.mark.parametrize(
    ("methods", "bad"),
    [(["cp", "squash"], "'squash'"), (["CP"], "'CP'"), (["cp", 1], "1"), (["cp", None], "None")],
    ids=["squash", "uppercase", "int", "none"],
)
def test_unknown_method_in_list_names_allowed(methods: list[Any], bad: str) -> None:
    message = error_of(recipe(rule(method=methods), target=TARGET))
    assert message.startswith("recipe: rules.0.method"), message
    assert_contains(message, *(repr(m) for m in METHOD_NAMES), f"got {bad}")


def test_groups_with_grouped_in_method_list() -> None:
    got = load_recipe(recipe(rule(method=["cp", "grouped"], groups=4), target=TARGET)).rules[0]
    assert got.groups == 4 and got.methods == ("cp", "grouped"), got
    message = error_of(recipe(rule(method=["cp", "depthwise_separable"], groups=4), target=TARGET))
    assert_contains(
        message, "recipe: rules.0: groups 4 is only valid with method 'grouped'",
        "got method ['cp', 'depthwise_separable']",
    )


@pytest.mark.parametrize(
    ("kw", "methods", "solved"),
    [
        ({"method": "cp"}, ("cp",), True),
        ({"method": "cp", "rank": 8}, ("cp",), False),
        ({"method": "cp", "rank": "full"}, ("cp",), False),
        ({"method": "cp", "rank": {"energy": 0.9}}, ("cp",), False),
        ({"method": "keep"}, ("keep",), False),
        ({"method": ["keep"]}, ("keep",), False),
        ({"method": ["keep", "cp"]}, ("keep", "cp"), True),
        ({"method": ["grouped", "cp"], "groups": 2}, ("grouped", "cp"), True),
    ],
)
def test_methods_and_solved_properties(kw: dict[str, Any], methods: tuple[str, ...], solved: bool) -> None:
    got = load_recipe(recipe(rule(**kw), target=TARGET)).rules[0]
    assert (got.methods, got.solved) == (methods, solved), got


# ------------------------------------------------------------------------------------ new keys: target


@pytest.mark.parametrize(
    ("target", "metric", "fraction"),
    [
        ({"macs": 0.4}, "macs", 0.4),
        ({"params": 0.3}, "params", 0.3),
        ({"macs": 1}, "macs", 1.0),
        ({"params": 1.0}, "params", 1.0),
        ({"macs": 1e-3}, "macs", 1e-3),
        ({"macs": 0.5, "params": None}, "macs", 0.5),
        (Target(params=0.25), "params", 0.25),
    ],
)
def test_target_accepted(target: Any, metric: str, fraction: float) -> None:
    got = load_recipe(recipe(target=target)).target
    assert got is not None and (got.metric, got.fraction) == (metric, fraction), got
    assert isinstance(got.fraction, float), got


BAD_TARGETS = [
    pytest.param({}, ["recipe: target: expected exactly one of macs, params, latency (0 < f <= 1); got none"], id="empty"),
    pytest.param({"macs": None}, ["recipe: target: expected exactly one of macs, params, latency", "got none"], id="macs-none"),
    pytest.param(
        {"macs": 0.5, "params": 0.5},
        ["recipe: target: expected exactly one of macs, params, latency (0 < f <= 1); got ['macs', 'params']"],
        id="both",
    ),
    pytest.param({"seconds": 0.5}, ["recipe: unknown key 'seconds' at target; allowed: macs, params, latency"], id="seconds"),
    pytest.param({"latency": 0}, ["recipe: target.latency:", "greater than 0", "got 0"], id="latency-0"),
    pytest.param(
        {"macs": 0.5, "energy": 0.9}, ["unknown key 'energy' at target; allowed: macs, params, latency"], id="energy-key"
    ),
    pytest.param({"macs": 0}, ["recipe: target.macs:", "greater than 0", "got 0"], id="macs-0"),
    pytest.param({"macs": 1.5}, ["recipe: target.macs:", "less than or equal to 1", "got 1.5"], id="macs-1.5"),
    pytest.param({"params": -0.1}, ["recipe: target.params:", "greater than 0", "got -0.1"], id="params-negative"),
    pytest.param({"params": 2}, ["recipe: target.params:", "less than or equal to 1", "got 2"], id="params-2"),
    pytest.param({"macs": float("nan")}, ["recipe: target.macs:", "got nan"], id="macs-nan"),
    pytest.param({"macs": "0.5"}, ["recipe: target.macs:", "got '0.5'"], id="macs-string"),
    pytest.param({"macs": True}, ["recipe: target.macs:", "got True"], id="macs-bool"),
    pytest.param(0.5, ["recipe: target:", "got 0.5"], id="bare-number"),
]


@pytest.mark.parametrize(("target", "parts"), BAD_TARGETS)
def test_bad_targets(target: Any, parts: list[str]) -> None:
    assert_contains(error_of(recipe(target=target)), *parts)


# --------------------------------------------------------------------------------------- new keys: data


@pytest.mark.parametrize(
    "data",
    [
        {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        {"mean": [0.5], "std": [0.25]},
        {"mean": [0.5, 0.5, 0.5]},
        {"std": [1, 2, 3]},
        {"mean": [-1, 0, 1], "std": [1e-6, 1, 255]},
        {},
    ],
)
def test_data_accepted(data: dict[str, Any]) -> None:
    got = load_recipe(recipe(data=data)).data
    assert got.mean == data.get("mean") and got.std == data.get("std"), got
    assert all(isinstance(v, float) for v in (got.mean or []) + (got.std or [])), got


BAD_DATA = [
    pytest.param(
        {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2]},
        ["recipe: data: mean has 3 values but std has 2; give one per channel"],
        id="length-mismatch",
    ),
    pytest.param({"mean": [0.5], "std": [0.2, 0.2, 0.2]}, ["data: mean has 1 values but std has 3"], id="mismatch-1-3"),
    pytest.param({"std": [0.2, 0, 0.2]}, ["recipe: data.std.1:", "greater than 0", "got 0"], id="std-0"),
    pytest.param({"std": [-1.0]}, ["recipe: data.std.0:", "greater than 0", "got -1.0"], id="std-negative"),
    pytest.param({"std": [float("nan")]}, ["recipe: data.std.0:", "finite number", "got nan"], id="std-nan"),
    pytest.param({"mean": [float("inf")]}, ["recipe: data.mean.0:", "finite number", "got inf"], id="mean-inf"),
    pytest.param({"mean": ["a"]}, ["recipe: data.mean.0:", "valid number", "got 'a'"], id="mean-string"),
    pytest.param({"mean": 0.5}, ["recipe: data.mean:", "valid list", "got 0.5"], id="mean-not-list"),
    pytest.param({"avg": [0.5]}, ["recipe: unknown key 'avg' at data; allowed: mean, std"], id="unknown-key"),
    pytest.param({"mean": [True, 0.5]}, ["recipe: data.mean.0:", "valid number", "got True"], id="mean-bool"),
    pytest.param({"std": [0.2, "0.2"]}, ["recipe: data.std.1:", "valid number", "got '0.2'"], id="std-string"),
    pytest.param({"std": [False]}, ["recipe: data.std.0:", "valid number", "got False"], id="std-bool"),
    pytest.param({"mean": []}, ["recipe: data.mean: expected a non-empty list of numbers, one per channel; got []"],
                 id="mean-empty"),
    pytest.param({"std": []}, ["recipe: data.std: expected a non-empty list of numbers, one per channel; got []"],
                 id="std-empty"),
    pytest.param({"std": {0.5}}, ["recipe: data.std:", "valid list", "got {0.5}"], id="std-set"),
    pytest.param({"mean": "0.5"}, ["recipe: data.mean:", "valid list", "got '0.5'"], id="mean-string-scalar"),
]


@pytest.mark.parametrize(("data", "parts"), BAD_DATA)
def test_bad_data(data: dict[str, Any], parts: list[str]) -> None:
    assert_contains(error_of(recipe(data=data)), *parts)


def test_data_tuples_accepted() -> None:
    got = load_recipe(recipe(data={"mean": (0, 0.5, 1), "std": (1, 2, 3)})).data
    assert got.mean == [0.0, 0.5, 1.0] and got.std == [1.0, 2.0, 3.0], got
    assert DataConfig(mean=(0.5,)).mean == [0.5]


# -------------------------------------------------------------------------------- new keys: calibration


@pytest.mark.parametrize(
    ("calibration", "expected"),
    [
        ({}, (512, 64)),
        ({"samples": 128}, (128, 64)),
        ({"batch_size": 1}, (512, 1)),
        ({"samples": 1, "batch_size": 1}, (1, 1)),
        ({"samples": 10000, "batch_size": 256}, (10000, 256)),
    ],
)
def test_calibration_accepted(calibration: dict[str, Any], expected: tuple[int, int]) -> None:
    got = load_recipe(recipe(calibration=calibration)).calibration
    assert (got.samples, got.batch_size) == expected, got


BAD_CALIBRATION = [
    pytest.param({"samples": 0}, ["recipe: calibration.samples:", "greater than 0", "got 0"], id="samples-0"),
    pytest.param({"samples": -1}, ["recipe: calibration.samples:", "greater than 0", "got -1"], id="samples-neg"),
    pytest.param({"samples": 128.0}, ["recipe: calibration.samples:", "valid integer", "got 128.0"], id="samples-f"),
    pytest.param({"samples": "128"}, ["recipe: calibration.samples:", "valid integer", "got '128'"], id="samples-str"),
    pytest.param({"samples": True}, ["recipe: calibration.samples:", "valid integer", "got True"], id="samples-bool"),
    pytest.param({"batch_size": 0}, ["recipe: calibration.batch_size:", "greater than 0", "got 0"], id="bs-0"),
    pytest.param({"batch_size": 1.5}, ["recipe: calibration.batch_size:", "valid integer", "got 1.5"], id="bs-float"),
    pytest.param(
        {"sampels": 128},
        ["recipe: unknown key 'sampels' at calibration; allowed: samples, batch_size"],
        id="unknown-key",
    ),
]


@pytest.mark.parametrize(("calibration", "parts"), BAD_CALIBRATION)
def test_bad_calibration(calibration: dict[str, Any], parts: list[str]) -> None:
    assert_contains(error_of(recipe(calibration=calibration)), *parts)


# ------------------------------------------------------------------------------ new keys: reconstruct


def test_reconstruct_defaults_and_override() -> None:
    assert load_recipe(recipe()).reconstruct is None
    got = load_recipe(recipe(), ["reconstruct.steps=50"]).reconstruct  # --set opens the section
    assert (got.steps, got.lr, got.train) == (50, 1e-3, "all"), got
    assert load_recipe(recipe(reconstruct={})).reconstruct.steps == 100


BAD_RECONSTRUCT = [
    pytest.param({"steps": -1}, ["recipe: reconstruct.steps:", "greater than or equal to 0", "got -1"], id="steps-neg"),
    pytest.param({"steps": 1.5}, ["recipe: reconstruct.steps:", "valid integer", "got 1.5"], id="steps-float"),
    pytest.param({"lr": 0}, ["recipe: reconstruct.lr:", "greater than 0", "got 0"], id="lr-0"),
    pytest.param({"train": "norms"}, ["recipe: reconstruct.train:", "got 'norms'"], id="train-unknown"),
    pytest.param({"step": 5}, ["recipe: unknown key 'step' at reconstruct; allowed: steps, lr, train"], id="unknown-key"),
]


@pytest.mark.parametrize(("settings", "parts"), BAD_RECONSTRUCT)
def test_bad_reconstruct(settings: dict[str, Any], parts: list[str]) -> None:
    assert_contains(error_of(recipe(reconstruct=settings)), *parts)


# ------------------------------------------------------------------------------ new keys: overrides


def test_override_target_macs() -> None:
    assert "target" not in BASE
    r = load_recipe(BASE, ["target.macs=0.4"])
    assert r.target == Target(macs=0.4) and r.target.metric == "macs" and r.target.fraction == 0.4, r.target


def test_override_calibration_samples() -> None:
    r = load_recipe(BASE, ["calibration.samples=128"])
    assert (r.calibration.samples, r.calibration.batch_size) == (128, 64), r.calibration
    r = load_recipe(recipe(calibration={"samples": 8, "batch_size": 4}), ["calibration.samples=128"])
    assert (r.calibration.samples, r.calibration.batch_size) == (128, 4), r.calibration


def test_override_new_keys() -> None:
    r = load_recipe(
        BASE,
        ["target.params=0.5", "rules.0.method=[cp, grouped]", "rules.0.rank=", "rules.0.groups=2",
         "rules.0.round_to=8", "data.mean=[0.5]", "data.std=[0.25]", "calibration.batch_size=32"],
    )
    assert r.target == Target(params=0.5), r.target
    assert (r.rules[0].method, r.rules[0].rank, r.rules[0].groups, r.rules[0].round_to) == (
        ["cp", "grouped"], None, 2, 8,
    ), r.rules[0]
    assert r.data == DataConfig(mean=[0.5], std=[0.25]), r.data
    assert r.calibration == Calibration(samples=512, batch_size=32), r.calibration


@pytest.mark.parametrize(
    ("value", "expected"),
    [("vbmf", "vbmf"), ("{params: 0.5}", ParamsRank(params=0.5)), ("{energy: 0.9}", EnergyRank(energy=0.9))],
)
def test_override_rank_to_new_forms(value: str, expected: Any) -> None:
    r = load_recipe(BASE, [f"rules.0.rank={value}"])
    assert r.rules[0].rank == expected and type(r.rules[0].rank) is type(expected), r.rules[0].rank


def test_override_switch_target_metric() -> None:
    # Target takes exactly one of macs/params: setting the other key replaces the mapping (it switches
    # the metric) instead of merging into an invalid {params: 0.5, macs: 0.4}.
    base = recipe(target={"params": 0.5})
    assert apply_overrides(base, ["target.macs=0.4"])["target"] == {"macs": 0.4}
    assert load_recipe(base, ["target.macs=0.4"]).target == Target(macs=0.4)
    assert load_recipe(base, ["target.macs=0.4", "target.params=0.3"]).target == Target(params=0.3)
    assert load_recipe(base, ["target.params=0.25"]).target == Target(params=0.25)
    assert load_recipe(base, ["target={macs: 0.4}"]).target == Target(macs=0.4)
    assert load_recipe(base, ["target.params=", "target.macs=0.4"]).target == Target(macs=0.4)
    assert load_recipe(base, ["target="]).target is None


BAD_NEW_OVERRIDES = [
    pytest.param(
        "calibration.foo=1",
        ["--set calibration.foo=1: 'foo' is not a recipe key under calibration; allowed: samples, batch_size"],
        id="calibration-unknown",
    ),
    pytest.param(
        "target.seconds=0.5",
        ["--set target.seconds=0.5: 'seconds' is not a recipe key under target; allowed: macs, params, latency"],
        id="target-unknown",
    ),
    pytest.param(
        "data.avg=[1]", ["--set data.avg=[1]: 'avg' is not a recipe key under data; allowed: mean, std"],
        id="data-unknown",
    ),
    pytest.param(
        "calibration.samples.x=1",
        ["'x' is not a recipe key under calibration.samples; calibration.samples takes a plain value"],
        id="descend-into-samples",
    ),
    pytest.param(
        "calibration.samples=0",
        ["recipe (with --set overrides): calibration.samples:", "greater than 0"],
        id="samples-0",
    ),
    pytest.param(
        "target.macs=1.5", ["recipe (with --set overrides): target.macs:", "less than or equal to 1"], id="macs-1.5"
    ),
    pytest.param(
        "rules.1.method=[cp, grouped]",
        ["recipe (with --set overrides): rules.1: a list of methods needs a recipe target"],
        id="method-list-no-target",
    ),
    pytest.param(
        "rules.0.method=[cp, grouped]",  # BASE's rules.0 has rank: full
        ["recipe (with --set overrides): rules.0: a list of methods (cp, grouped) leaves method and rank"],
        id="method-list-with-rank",
    ),
    pytest.param(
        "rules.0.round_to=0", ["recipe (with --set overrides): rules.0.round_to:", "greater than 0"], id="round-to-0"
    ),
]


@pytest.mark.parametrize(("override", "parts"), BAD_NEW_OVERRIDES)
def test_bad_new_overrides(override: str, parts: list[str]) -> None:
    assert_contains(error_of(BASE, (override,)), *parts)


# ------------------------------------------------------------------------ new keys: files and round trip


NEW_KEYS_YAML = """\
rules:
  - match: "stem.*"
    method: keep
  - match: "layer1*"
    method: [depthwise_separable, cp, grouped]
    groups: 2
    round_to: 8
  - match: "layer2*"
    method: cp
    rank: vbmf
  - match: "layer3*"
    method: spatial_separable
    rank: {energy: 0.95}
    round_to: 4
  - match: "*"
    method: [grouped]
    groups: 4
    rank: {params: 0.5}
target: {macs: 0.4}
data:
  mean: [0.485, 0.456, 0.406]
  std: [0.229, 0.224, 0.225]
calibration:
  samples: 256
  batch_size: 32
"""


def test_load_yaml_new_keys(tmp_path: Path) -> None:
    path = tmp_path / "budget.yaml"
    path.write_text(NEW_KEYS_YAML)
    r = load_recipe(path)
    assert [x.method for x in r.rules] == [
        "keep", ["depthwise_separable", "cp", "grouped"], "cp", "spatial_separable", "grouped",
    ], r.rules
    assert [x.rank for x in r.rules] == [None, None, "vbmf", EnergyRank(energy=0.95), ParamsRank(params=0.5)], r.rules
    assert [x.round_to for x in r.rules] == ["auto", 8, "auto", 4, "auto"], r.rules
    assert [x.solved for x in r.rules] == [False, True, False, False, False], r.rules
    assert r.target == Target(macs=0.4), r.target
    assert r.data == DataConfig(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]), r.data
    assert r.calibration == Calibration(samples=256, batch_size=32), r.calibration
    r = load_recipe(path, ["target.macs=0.25", "calibration.samples=128"])
    assert r.target == Target(macs=0.25) and r.calibration.samples == 128, (r.target, r.calibration)
    message = error_of(path, ("target=",))
    assert message == (
        f"{path} (with --set overrides): rules.1: a list of methods needs a recipe target "
        "(e.g. target: {macs: 0.5}) for the budget solver to choose between them"
    ), message


def test_new_keys_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "budget.yaml"
    path.write_text(NEW_KEYS_YAML)
    original = load_recipe(path)
    again = load_recipe(original)
    assert again == original and again is not original, again
    assert [x.index for x in again.rules] == [0, 1, 2, 3, 4], again.rules
    changed = load_recipe(original, ["rules.2.rank={energy: 0.5}"])
    assert changed.rules[2].rank == EnergyRank(energy=0.5) and original.rules[2].rank == "vbmf", changed.rules[2]


# ------------------------------------------------------------------ method errors, union overrides


METHOD_EXPECTED = (
    "expected one of 'depthwise_separable', 'spatial_separable', 'low_rank', 'grouped', 'cp', 'keep', or a non-empty list of them"
)


@pytest.mark.parametrize("method", ["foo", ["cp", "squash"], None], ids=["foo", "list", "none"])
def test_bad_method_error_is_collapsed(method: Any) -> None:
    message = error_of(recipe(rule(method=method), target=TARGET))
    assert message.startswith("recipe: rules.0.method: "), message
    assert message.count("rules.0.method") == 1 and "literal[" not in message, message


@pytest.mark.parametrize(
    ("method", "shown"),
    [
        ("foo", "'foo'"),
        ("CP", "'CP'"),
        (None, "None"),
        (5, "5"),
        ({"cp": 1}, "{'cp': 1}"),
        ({"cp"}, "{'cp'}"),  # a set is not a list: its order would be lost
        (["cp", "squash"], "'squash' (item 1 of ['cp', 'squash'])"),
        (["x", "cp", "y"], "'x' (item 0 of ['x', 'cp', 'y'])"),
        (["cp", None], "None (item 1 of ['cp', None])"),
        ([["cp"]], "['cp'] (item 0 of [['cp']])"),
    ],
    ids=["foo", "uppercase", "none", "int", "mapping", "set", "list", "list-first-bad", "list-none", "nested"],
)
def test_bad_method_message(method: Any, shown: str) -> None:
    message = error_of(recipe(rule(method=method), target=TARGET))
    assert message == f"recipe: rules.0.method: {METHOD_EXPECTED}; got {shown}", message


def test_bad_method_message_from_override_and_rule() -> None:
    message = error_of(BASE, ("rules.1.method=squash",))
    assert message == f"recipe (with --set overrides): rules.1.method: {METHOD_EXPECTED}; got 'squash'", message
    with pytest.raises(ValidationError) as info:
        Rule(match="x", method="squash")
    assert "literal[" not in str(info.value) and METHOD_EXPECTED in str(info.value), info.value


def test_method_tuple_accepted() -> None:
    got = load_recipe(recipe(rule(method=("cp", "grouped")), target=TARGET)).rules[0]
    assert got.method == ["cp", "grouped"], got


@pytest.mark.parametrize(
    ("override", "expected"),
    [("rules.0.rank.params=0.5", ParamsRank(params=0.5)), ("rules.0.rank.energy=0.9", EnergyRank(energy=0.9))],
    ids=["params", "energy"],
)
def test_override_into_params_and_energy_rank(override: str, expected: Any) -> None:
    r = load_recipe(BASE, [override])
    assert r.rules[0].rank == expected, r.rules[0].rank


@pytest.mark.parametrize(
    ("rank", "override", "expected"),
    [
        ({"macs": 0.5}, "rules.0.rank.energy=0.9", {"energy": 0.9}),
        ({"macs": 0.5}, "rules.0.rank.params=0.25", {"params": 0.25}),
        ({"energy": 0.9}, "rules.0.rank.macs=0.5", {"macs": 0.5}),
        ({"macs": 0.5}, "rules.0.rank.macs=0.25", {"macs": 0.25}),
        ({"macs": 0.5, "bogus": 1}, "rules.0.rank.macs=0.25", {"macs": 0.25}),
        ("full", "rules.0.rank.energy=0.9", {"energy": 0.9}),
        (8, "rules.0.rank.params=0.5", {"params": 0.5}),
        (None, "rules.0.rank.energy=0.5", {"energy": 0.5}),
    ],
    ids=["macs-to-energy", "macs-to-params", "energy-to-macs", "same-key", "drops-unknown", "full", "int", "unset"],
)
def test_override_switches_rank_form(rank: Any, override: str, expected: dict[str, float]) -> None:
    # A rank has exactly one key: a key of another form replaces the mapping rather than merging into it.
    raw = recipe(rule(rank=rank, method="cp"))
    out = apply_overrides(raw, [override])
    assert out["rules"][0]["rank"] == expected, out
    assert raw["rules"][0]["rank"] == rank, raw  # the input is not modified
    r = load_recipe(raw, [override])
    assert r.rules[0].rank.model_dump() == expected, r.rules[0].rank


def test_override_rank_switch_chain() -> None:
    r = load_recipe(BASE, ["rules.0.rank.macs=0.5", "rules.0.rank.energy=0.9", "rules.0.rank.params=0.3"])
    assert r.rules[0].rank == ParamsRank(params=0.3), r.rules[0].rank
    r = load_recipe(BASE, ["rules.0.rank.energy=0.9", "rules.0.rank=8"])
    assert r.rules[0].rank == 8, r.rules[0].rank


def test_override_null_clears_without_switching() -> None:
    # A null VALUE clears its own key and leaves the others alone (so it never switches a form).
    out = apply_overrides(recipe(target={"macs": 0.4}), ["target.params="])
    assert out["target"] == {"macs": 0.4, "params": None}, out
    assert load_recipe(recipe(target={"macs": 0.4}), ["target.params="]).target == Target(macs=0.4)
    out = apply_overrides(recipe(rule(rank={"macs": 0.5})), ["rules.0.rank.energy="])
    assert out["rules"][0]["rank"] == {"macs": 0.5, "energy": None}, out


def test_override_does_not_reach_yaml_aliases(tmp_path: Path) -> None:
    # ``<<: *base`` shares base's nested mappings; an override of one rule must not change the other.
    path = tmp_path / "alias.yaml"
    path.write_text(
        "rules:\n"
        "  - &base {match: 'a.*', method: cp, rank: {macs: 0.5}}\n"
        "  - <<: *base\n"
        "    match: 'b.*'\n"
    )
    r = load_recipe(path, ["rules.1.rank.macs=0.25"])
    assert [x.rank for x in r.rules] == [MacsRank(macs=0.5), MacsRank(macs=0.25)], r.rules
    r = load_recipe(path, ["rules.0.rank.energy=0.9"])
    assert [x.rank for x in r.rules] == [EnergyRank(energy=0.9), MacsRank(macs=0.5)], r.rules
    shared: dict[str, Any] = {"macs": 0.5}
    raw = recipe(rule(rank=shared), rule(rank=shared))
    out = apply_overrides(raw, ["rules.0.rank.macs=0.25"])
    assert [x["rank"] for x in out["rules"]] == [{"macs": 0.25}, {"macs": 0.5}], out


def test_error_location_through_rank_union() -> None:
    # The error-formatting walk knows a rank mapping is one of MacsRank/ParamsRank/EnergyRank, and
    # drops pydantic's union-member tags ('MacsRank') from the location it shows.
    from compressor.recipe import _format_error, _model_at

    expected = "unknown key 'x' at rules.0.rank; allowed: macs, params, energy"
    assert _format_error({"type": "extra_forbidden", "loc": ("rules", 0, "rank", "x")}) == expected
    assert _format_error({"type": "extra_forbidden", "loc": ("rules", 0, "rank", "MacsRank", "x")}) == expected
    message = _format_error(
        {"type": "float_type", "loc": ("rules", 1, "rank", "EnergyRank", "energy"), "msg": "bad", "input": "s"}
    )
    assert message == "rules.1.rank.energy: bad; got 's'", message
    assert _model_at(("rules", 0)) is Rule and _model_at(("target",)) is Target
    assert _model_at(("rules",)) is None and _model_at(("rules", 0, "method")) is None
    assert _model_at(("rules", 0, "nope")) is None


# --------------------------------------------------------------------------------------------- matching


def make_rule(match: Any, **kw: Any) -> Rule:
    return Rule(match=match, method="keep", **kw)


@pytest.mark.parametrize(
    ("match", "name", "expected"),
    [
        ("re:layer1", "layer1.0.conv1", False),  # regex must match the whole name
        ("re:layer1", "layer1", True),
        ("re:layer1\\..*", "layer1.0.conv1", True),
        ("re:layer\\d\\.0\\.conv[12]", "layer3.0.conv2", True),
        ("re:conv1", "layer1.0.conv1", False),
        ("layer1*", "layer1.0.conv1", True),  # glob `*` crosses dots
        ("layer1", "layer1.0.conv1", False),  # glob is whole-name too
        ("*.conv1", "layer1.0.conv1", True),
        ("layer?.0.conv1", "layer2.0.conv1", True),
        ("layer[12].*", "layer3.0.conv1", False),
        ("Layer1*", "layer1.0.conv1", False),  # case-sensitive
        (["stem.*", "re:layer1\\..*"], "layer1.0.conv1", True),
        (["stem.*", "re:layer1\\..*"], "stem.conv", True),
        (["stem.*", "re:layer1\\..*"], "layer2.0.conv1", False),
    ],
)
def test_name_matching(match: Any, name: str, expected: bool) -> None:
    got = make_rule(match).selects(name, (3, 3), 16, 16)
    assert got is expected, f"match {match!r} on {name!r}: got {got}"


@pytest.mark.parametrize(
    ("filters", "layer", "expected"),
    [
        ({}, ((1, 1), 1, 1), True),
        ({"kernel_size": 3}, ((3, 3), 8, 8), True),
        ({"kernel_size": 3}, ((1, 1), 8, 8), False),
        ({"kernel_size": 3}, ((3, 1), 8, 8), False),
        ({"kernel_size": [1, 3]}, ((1, 3), 8, 8), True),
        ({"kernel_size": [1, 3]}, ((3, 1), 8, 8), False),
        ({"kernel_size": 3}, (3, 8, 8), True),  # an int kernel_size argument is accepted too
        ({"min_kernel_size": 3}, ((3, 3), 8, 8), True),
        ({"min_kernel_size": 3}, ((5, 5), 8, 8), True),
        ({"min_kernel_size": 3}, ((3, 1), 8, 8), False),
        ({"min_kernel_size": 3}, ((1, 3), 8, 8), False),
        ({"min_in_channels": 8}, ((3, 3), 8, 4), True),
        ({"min_in_channels": 8}, ((3, 3), 7, 64), False),
        ({"min_out_channels": 8}, ((3, 3), 4, 8), True),
        ({"min_out_channels": 8}, ((3, 3), 64, 7), False),
        ({"kernel_size": 3, "min_in_channels": 8, "min_out_channels": 16}, ((3, 3), 8, 16), True),
        ({"kernel_size": 3, "min_in_channels": 8, "min_out_channels": 16}, ((3, 3), 8, 15), False),
    ],
)
def test_selects_filters(filters: dict[str, Any], layer: tuple[Any, int, int], expected: bool) -> None:
    got = make_rule("*", **filters).selects("a.conv", *layer)
    assert got is expected, f"filters {filters} on layer {layer}: got {got}"


def test_filters_do_not_rescue_name_mismatch() -> None:
    assert make_rule("x", kernel_size=3).selects("y", (3, 3), 8, 8) is False


def test_rule_for_first_match_wins() -> None:
    r = load_recipe(recipe(rule(match="layer1*", min_in_channels=64), rule(match="layer*"), rule(match="*",
                                                                                               method="keep")))
    assert r.rule_for("layer1.0.conv1", (3, 3), 64, 64).index == 0
    assert r.rule_for("layer1.0.conv1", (3, 3), 32, 64).index == 1
    assert r.rule_for("fc", (1, 1), 32, 64).index == 2
    assert load_recipe(recipe(rule(match="x"))).rule_for("y", (1, 1), 1, 1) is None


# ------------------------------------------------------------------------------------------------ files


GOOD_YAML = """\
name: mobile
input_shape: [1, 3, 224, 224]
rules:
  - match: "layer*.conv*"
    method: depthwise_separable
    rank: full
    kernel_size: 3
  - match: ["re:layer4\\\\..*", "fc*"]
    method: grouped
    rank: 8
    groups: 2
  - match: "*"
    method: spatial_separable
    rank: {macs: 0.5}
export:
  tolerance: 1e-4
"""


def test_load_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "mobile.yaml"
    path.write_text(GOOD_YAML)
    for source in (path, str(path)):
        r = load_recipe(source)
        assert r.name == "mobile" and r.input_shape == (1, 3, 224, 224), r
        assert [x.rank for x in r.rules] == ["full", 8, MacsRank(macs=0.5)], r.rules
        assert r.rules[0].kernel_size == (3, 3), r.rules[0]
        assert r.rules[1].match == ["re:layer4\\..*", "fc*"], r.rules[1].match
        assert r.rules[1].selects("layer4.1.conv2", (3, 3), 8, 8)
        assert r.export.tolerance == 1e-4 and isinstance(r.export.tolerance, float), r.export
        assert r.export.opset == 17, r.export


def test_load_yaml_file_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "mobile.yaml"
    path.write_text(GOOD_YAML)
    r = load_recipe(path, ["rules.0.rank.macs=0.5", "export.opset=18", "rules.2.min_in_channels=16"])
    assert r.rules[0].rank == MacsRank(macs=0.5) and r.export.opset == 18, r
    assert r.rules[2].min_in_channels == 16, r.rules[2]


def test_yaml_anchors_and_merge_keys(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text(
        "rules:\n"
        "  - &base {match: 'a.*', method: grouped, rank: 8, groups: 2}\n"
        "  - <<: *base\n"
        "    match: 'b.*'\n"
        "    rank: 4\n"
    )
    r = load_recipe(path)
    assert (r.rules[1].match, r.rules[1].rank, r.rules[1].groups) == ("b.*", 4, 2), r.rules[1]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    message = error_of(path)
    assert message == f"recipe file not found: {path}", message
    assert error_of(str(path)) == f"recipe file not found: {path}"


def test_directory_is_not_a_recipe(tmp_path: Path) -> None:
    assert_contains(error_of(tmp_path), "directory", str(tmp_path))


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("rules:\n  - match: a\n    method: keep\n   rank: 3\n")
    message = error_of(path)
    assert_contains(message, f"{path}: invalid YAML at line 4")


def test_yaml_unclosed_bracket(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("input_shape: [1, 3\nrules: []\n")
    assert_contains(error_of(path), f"{path}: invalid YAML at line")


def test_yaml_duplicate_key(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("rules:\n  - match: a\n    method: keep\n    method: grouped\n")
    assert_contains(error_of(path), f"{path}: invalid YAML at line 4", "duplicate key 'method'")


@pytest.mark.parametrize(
    ("text", "kind"),
    [("- match: a\n  method: keep\n", "a list"), ("", "nothing"), ("just text\n", "a str"), ("3\n", "a int")],
)
def test_top_level_not_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = tmp_path / "top.yaml"
    path.write_text(text)
    message = error_of(path)
    assert_contains(message, f"{path}: a recipe must be a mapping at the top level; got {kind}")
    message = error_of(path, ("rules.0.rank=8",))
    assert_contains(message, "must be a mapping at the top level")


def test_validation_error_names_file(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("rules:\n  - match: a\n    method: squash\n")
    message = error_of(path)
    assert message.startswith(f"{path}: rules.0.method"), message
    assert_contains(message, "got 'squash'")


def test_fixture_recipe() -> None:
    r = load_recipe(HERE / "recipes" / "full.yaml")
    assert [x.method for x in r.rules] == ["keep", "depthwise_separable", "grouped", "spatial_separable"], r.rules
    assert r.export.tolerance == 1e-3 and r.export.opset == 18, r.export
    assert r.rule_for("layer2.3.conv1", (3, 3), 16, 16).index == 1
    assert r.rule_for("layer2.3.conv3", (3, 3), 16, 16).index == 3


SHIPPED = sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "recipes").glob("*.yml"))


@pytest.mark.parametrize("path", SHIPPED or [None], ids=[p.name for p in SHIPPED] or ["none"])
def test_shipped_recipes_load(path: Path | None) -> None:
    if path is None:
        pytest.skip(f"no recipes shipped in {REPO / 'recipes'}")
    r = load_recipe(path)
    assert r.rules, f"{path} has no rules"


# ------------------------------------------------------------------ bench, export.quantize, target.latency


def test_bench_and_quantize_defaults_and_latency_target():
    got = load_recipe({**BASE, "target": {"latency": 0.5}})
    assert (got.target.metric, got.target.fraction) == ("latency", 0.5)
    assert (got.bench.threads, got.bench.runs, got.bench.providers) == ([1, 0], 50, ["CPUExecutionProvider"])
    assert got.export.quantize == "none" and got.export.int8_tolerance == 0.05
    switched = load_recipe({**BASE, "target": {"macs": 0.5}}, ["target.latency=0.4"])
    assert (switched.target.metric, switched.target.fraction) == ("latency", 0.4)
    skipped = load_recipe(BASE, ["bench.threads=[]", "export.quantize=static"])
    assert skipped.bench.threads == [] and skipped.export.quantize == "static"


@pytest.mark.parametrize(
    "override, parts",
    [
        ("export.quantize=int4", ["export.quantize", "'none', 'dynamic' or 'static'", "got 'int4'"]),
        ("export.int8_tolerance=1.5", ["export.int8_tolerance", "less than or equal to 1"]),
        ("bench.threads=[-1]", ["bench.threads.0", "greater than or equal to 0"]),
        ("bench.runs=-1", ["bench.runs", "greater than or equal to 0"]),
        ("bench.providers=[]", ["bench.providers", "at least 1"]),
        ("bench.thread=1", ["'thread' is not a recipe key under bench", "allowed: threads, runs, warmup, providers, cache, layer_runs"]),
    ],
)
def test_bad_bench_and_quantize_settings(override, parts):
    assert_contains(error_of(BASE, (override,)), *parts)


# ----------------------------------------------------------------------------------------------------------------------
# task: what the outputs are


def test_task_defaults_to_detection_with_unit_weights():
    task = load_recipe(recipe()).task
    assert (task.kind, task.ignore_index, task.weights) == ("auto", 255, None), task


@pytest.mark.parametrize(
    "raw, overrides, expected",
    [
        (recipe(task="segmentation"), (), ("segmentation", 255, None)),
        (recipe(task={"kind": "other", "weights": [1, 0.5, 0]}), (), ("other", 255, [1.0, 0.5, 0.0])),
        (recipe(), ("task.kind=classification", "task.ignore_index=-1"), ("classification", -1, None)),
        (recipe(), ("task=segmentation",), ("segmentation", 255, None)),
    ],
    ids=["shorthand", "weights", "set-keys", "set-shorthand"],
)
def test_task_is_set_by_the_recipe_or_overrides(raw, overrides, expected):
    task = load_recipe(raw, overrides).task
    assert (task.kind, task.ignore_index, task.weights) == expected, task


@pytest.mark.parametrize(
    "raw, message",
    [
        (recipe(task="detection"), "task.kind: Input should be 'auto', 'classification', 'segmentation' or 'other'; got 'detection'"),
        (recipe(task={"weights": [0, 0]}), "task.weights: expected one weight >= 0 per output, at least one > 0; got [0.0, 0.0]"),
        (recipe(task={"weights": [1, -1]}), "task.weights.1: Input should be greater than or equal to 0"),
        (recipe(task={"ignore_index": 2.5}), "task.ignore_index"),
        (recipe(task={"kind": "other", "heads": 3}), "unknown key 'heads' at task"),
    ],
    ids=["kind", "all-zero", "negative", "float-index", "unknown"],
)
def test_bad_task_names_the_key(raw, message):
    assert message in error_of(raw), error_of(raw)
