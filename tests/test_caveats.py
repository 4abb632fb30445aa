"""Plans that run but probably surprise: a warning each, logged (and shown by the CLI), never an error."""

from __future__ import annotations

import logging

import pytest
import torch

import compressor
from tests.models_for_cli import INPUT_SHAPE, tiny_net

BODY = {"match": "*", "method": "depthwise_separable", "min_kernel_size": 3, "min_in_channels": 8}


def _warnings(caplog, recipe) -> tuple[list[str], dict]:
    caplog.set_level(logging.WARNING, logger="compressor")
    report = compressor.plan(tiny_net(), recipe, torch.randn(INPUT_SHAPE)).report()
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING], report


@pytest.mark.parametrize("rank", [None, "full"])
def test_a_plan_that_grows_macs_says_so(caplog, rank):
    messages, report = _warnings(caplog, {"rules": [{**BODY, "rank": rank}]})
    totals = report["totals"]
    assert totals["macs_after"] > totals["macs_before"], totals
    grows = [m for m in messages if "grows MACs" in m]
    assert len(grows) == 1 and "conv2" in grows[0] and "conv3" in grows[0], messages


def test_a_target_with_only_fixed_ranks_says_why_it_changes_nothing(caplog):
    messages, report = _warnings(caplog, {"rules": [{**BODY, "rank": {"macs": 0.35}}], "target": {"macs": 0.6}})
    assert report["target"]["solved_layers"] == 0, report["target"]
    nothing = [m for m in messages if "changes nothing" in m]
    assert len(nothing) == 1 and "rule 0" in nothing[0] and "rank" in nothing[0], messages


def test_a_plan_that_shrinks_under_a_solved_target_warns_nothing(caplog):
    messages, report = _warnings(caplog, {"rules": [BODY], "target": {"macs": 0.8}})
    assert report["target"]["solved_layers"] == 2 and report["totals"]["macs_ratio"] <= 0.8, report["totals"]
    assert messages == [], messages
