"""scripts/benchmark.py (the peer comparison behind BENCHMARKS.md) still runs, and its peers are what they claim."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from compressor.methods import METHODS, factorize

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))
import peers  # noqa: E402


@pytest.mark.parametrize("stride, padding", [((1, 1), (1, 1)), ((2, 2), (1, 1)), ((2, 1), (0, 1))])
@pytest.mark.parametrize("rank", [1, 5, 12])
def test_aimet_spatial_svd_is_our_weight_only_spatial_separable(rank, stride, padding):
    torch.manual_seed(rank)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=padding).double()
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    aimet = peers.aimet_spatial_svd(conv, rank)
    ours, _ = factorize(METHODS["spatial_separable"], conv, rank, 1)
    with torch.no_grad():
        reference = conv(x)
        gap = ((aimet(x) - ours(x)).norm() / reference.norm()).item()
        error = ((aimet(x) - reference).norm() / reference.norm()).item()
    assert gap < 1e-9, f"rank {rank}: AIMET re-implementation vs ours differ by {gap:.3e} (its own error {error:.3e})"
    if rank == 12:  # full rank of in*kh = 12
        assert error < 1e-9, f"full-rank AIMET spatial SVD error {error:.3e}"


@pytest.mark.skipif(importlib.util.find_spec("tltorch") is None, reason="tensorly-torch is not installed (pip install tensorly-torch)")
@pytest.mark.parametrize("factorization", ["cp", "tucker"])
def test_tltorch_peer_applies_at_the_given_rank(factorization):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, stride=2))
    replaced = peers.replace_convs(model, {"2": 3}, lambda conv, rank: peers.tltorch_factorized(conv, factorization, rank))
    factorized = replaced.get_submodule("2")
    expected_rank = (3, 3, 3, 3) if factorization == "tucker" else 3
    assert type(factorized).__name__ == "FactorizedConv" and factorized.rank == expected_rank, factorized
    assert type(model.get_submodule("2")) is nn.Conv2d, "replace_convs changed the caller's model"
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        error = ((replaced(x) - model(x)).norm() / model(x).norm()).item()
    assert replaced(x).shape == model(x).shape and 0 < error < 1, f"{factorization}: relative error {error:.3f}"


def test_quick_benchmark_writes_every_row(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--quick", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| r20-")]
    ids = [line.split("|")[1].strip() for line in rows]
    expected = ["r20-spatial_separable-0.50-weights", "r20-spatial_separable-0.50-data-ft", "r20-spatial_separable-0.50-aimet", "r20-budget-0.50-data-ft", "r20-latency-0.70-data"]
    assert all(name in ids for name in expected), f"rows {ids}"
    assert "failed" not in text, text[-3000:]
    assert out.with_suffix(".json").exists()
    resumed = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--quick", "--resume", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert resumed.returncode == 0, f"exit {resumed.returncode}\n{resumed.stdout[-2000:]}\n{resumed.stderr[-3000:]}"
    rerun = [line for line in resumed.stdout.splitlines() if line.startswith("[")]
    assert not rerun, f"--resume ran finished rows again: {rerun}"
    assert f"{len(expected)} rows were measured by an earlier run" in out.read_text(), out.read_text()[:1500]
