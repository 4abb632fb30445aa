"""Tests for compressor.recipe: schema, error messages, overrides, matching, loading."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from compressor.errors import CompressorError, RecipeError
from compressor.recipe import (
    METHODS,
    ExportConfig,
    MacsRank,
    Recipe,
    Rule,
    apply_overrides,
    load_recipe,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RULE_KEYS = "match, method, rank, groups, kernel_size, min_kernel_size, min_in_channels, min_out_channels"
TOP_KEYS = "name, description, input_shape, rules, export"


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
    assert METHODS == ("depthwise_separable", "spatial_separable", "grouped", "keep"), METHODS


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
    ],
    ids=["full", "int8", "int1", "macs0.5", "macs-int-1", "macs1.0", "macs-instance"],
)
def test_rank_forms(rank: Any, expected: Any) -> None:
    got = load_recipe(recipe(rule(rank=rank))).rules[0].rank
    assert got == expected, f"rank {rank!r} parsed as {got!r}"
    assert type(got) is type(expected), f"rank {rank!r} parsed as {type(got).__name__}"


def test_rank_defaults_to_full() -> None:
    got = load_recipe(recipe(rule(method="keep"))).rules[0].rank
    assert got == "full", got


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
        ["recipe: rules.1.method:", "'depthwise_separable'", "'spatial_separable'", "'grouped'", "'keep'",
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


@pytest.mark.parametrize("rank", [0, -1, "half", {"macs": 1.5}, True, None])
def test_rank_error_is_collapsed(rank: Any) -> None:
    message = error_of(recipe(rule(rank=rank)))
    expected = "recipe: rules.0.rank: expected a positive integer, 'full', or {macs: f} with 0 < f <= 1; got "
    assert message.startswith(expected), message
    assert message.count("rules.0.rank") == 1, message


def test_several_errors_joined() -> None:
    message = error_of(recipe(rule(method="foo"), rule(rank=0)))
    assert_contains(message, "recipe: rules.0.method:", "; recipe: rules.1.rank:")


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
        ["'mac' is not a recipe key under rules.0.rank; allowed: macs"],
        id="unknown-macs-key",
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
    assert message.startswith("recipe (with --set overrides): rules.0.method:"), message


def test_override_index_into_missing_rules() -> None:
    message = error_of({}, ("rules.0.rank=8",))
    assert_contains(message, "rules has no entries")


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
    assert message.startswith(f"{path}: rules.0.method: "), message
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
