"""``torchrun --nproc_per_node=2 -m compressor ...`` on CPU (gloo): outputs, identical weights, falling loss.

A tiny model and synthetic data, so it needs nothing from ../shared and runs in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from compressor.finetune import state_digest
from tests.models_for_cli import INPUT_SHAPE, tiny_net

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def test_two_gloo_processes_train_identical_weights(tmp_path):
    model = tiny_net()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(384, 3, 32, 32), dtype=np.uint8)
    with torch.no_grad():  # labels from the original model, normalized as load_data does for 3 channels
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        y = model((torch.from_numpy(x).float() / 255 - mean) / std).argmax(1).numpy()
    np.savez(tmp_path / "data.npz", x=x, y=y)
    recipe = {
        "input_shape": list(INPUT_SHAPE),
        "rules": [{"match": "conv[23]", "method": "depthwise_separable", "rank": {"macs": 0.3}}],
        "calibration": {"samples": 128, "batch_size": 64},
        "finetune": {"steps": 30, "batch_size": 32, "holdout": 64, "lr": 3e-3, "evaluations": 3},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "compressor",
         "--recipe", tmp_path / "recipe.yaml", "--arch", "tests.models_for_cli:tiny_net", "--device", "cpu",
         "--data", tmp_path / "data.npz", "--out", out, tmp_path / "model.pt"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    shown = f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, shown
    written = {p.name for p in out.iterdir()}
    assert {"compressed.pt", "compressed.onnx", "original.onnx", "report.json"} <= written, f"{sorted(written)}\n{shown}"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")], "a rank left a staging folder"
    record = json.loads((out / "report.json").read_text())["finetune"]
    assert record["world_size"] == 2 and record["distributed"]["backend"] == "gloo", record
    digests = record["distributed"]["rank_digests"]
    saved = torch.load(out / "compressed.pt", weights_only=False)
    assert digests[0] == digests[1] == state_digest(saved), f"rank digests {digests}, saved {state_digest(saved)}"
    assert record["steps"] == 30 and record["train_samples"] == 320 and record["holdout_samples"] == 64
    loss = record["loss"]
    assert loss["last"] < loss["first"], f"loss did not fall: first {loss['first']:.4f}, last {loss['last']:.4f}"
    assert proc.stdout.count("fine-tune:") == 1, f"expected one summary line (rank 0 only): {shown}"
