"""Rule matching as the report tells it: a layer a filter keeps names that filter."""

from __future__ import annotations

import pytest
import torch

import compressor
from tests.models_for_cli import INPUT_SHAPE, tiny_net


def _reasons(rule: dict) -> dict[str, str]:
    recipe = {"rules": [{"match": "*", "method": "depthwise_separable", "rank": 1, **rule}]}
    layers = compressor.plan(tiny_net(), recipe, torch.randn(INPUT_SHAPE)).report()["layers"]
    return {layer["name"]: layer["skipped_reason"] for layer in layers}


@pytest.mark.parametrize(
    "rule, layer, needles",
    [
        ({"min_in_channels": 8}, "conv1", ("rule 0", "min_in_channels 8", "it has 3")),
        ({"min_kernel_size": 3}, "head", ("rule 0", "min_kernel_size 3", "1x1")),
        ({"kernel_size": 3}, "head", ("rule 0", "kernel_size [3, 3]", "1x1")),
        ({"min_out_channels": 16}, "conv1", ("rule 0", "min_out_channels 16", "it has 8")),
    ],
)
def test_a_layer_kept_by_a_filter_names_the_filter(rule, layer, needles):
    reason = _reasons(rule)[layer]
    assert reason and all(needle in reason for needle in needles), f"{layer}: {reason!r}"


def test_a_layer_no_pattern_matches_says_so():
    recipe = {"rules": [{"match": "conv*", "method": "depthwise_separable", "rank": 1}]}
    layers = compressor.plan(tiny_net(), recipe, torch.randn(INPUT_SHAPE)).report()["layers"]
    reasons = {layer["name"]: layer["skipped_reason"] for layer in layers}
    assert reasons["head"] == "no rule matches", reasons
