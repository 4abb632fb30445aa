"""compressor/sensitivity.py: per-layer weights that predict the distillation-loss increase, and their use
by the budget solver."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compressor
from compressor.finetune import normalized_mse
from compressor.sensitivity import layer_sensitivities, sensitivity_batches
from compressor.task import task_of


class Net(nn.Module):
    """Three convs in a row: an early layer's error travels through the rest, so the layers differ."""

    def __init__(self, heads: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.heads = nn.ModuleList(nn.Linear(16, 10) for _ in range(heads))

    def forward(self, x):
        x = F.relu(self.c(F.relu(self.b(F.relu(self.a(x))))))
        pooled = x.mean((2, 3))
        outputs = [head(pooled) * 3 for head in self.heads]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _measured(model: nn.Module, name: str, inputs: torch.Tensor, error: float, classification: bool) -> float:
    """The distillation loss of ``model`` with an error of relative energy ``error**2`` added to ``name``'s
    output, against the clean model, averaged over draws. The error is the one the weights model: a
    random mixing of the output's channels, the same at every position."""
    generator = torch.Generator().manual_seed(1)

    def add_noise(_module, _inputs, output):
        channels = output.shape[1]
        mixing = torch.randn(channels, channels, generator=generator)
        noise = torch.einsum("cd,nd...->nc...", mixing, output)
        return output + noise * error * output.norm() / noise.norm()

    with torch.no_grad():
        clean = model(inputs)
        values = []
        for _ in range(64):
            handle = model.get_submodule(name).register_forward_hook(add_noise)
            noisy = model(inputs)
            handle.remove()
            if classification:
                log_q, log_p = F.log_softmax(clean, 1), F.log_softmax(noisy, 1)
                values.append(float((log_q.exp() * (log_q - log_p)).sum(1).mean()))
            else:
                values.append(sum(float(normalized_mse(s, t)) for s, t in zip(noisy, clean)))
    return sum(values) / len(values)


@pytest.mark.parametrize("heads", [1, 2], ids=["classification", "two-outputs"])
def test_weights_predict_the_loss_increase_of_noise_in_each_layer(heads):
    model = Net(heads).eval()
    inputs = torch.randn(256, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    task = task_of(model, inputs[:1], None)
    assert task.kind == ("classification" if heads == 1 else "other"), task.kind
    names = ["a", "b", "c"]
    weights = layer_sensitivities(model, names, sensitivity_batches([inputs[:128], inputs[128:]], 256), task)
    error = 0.05
    for name in names:
        predicted, measured = weights[name] * error**2, _measured(model, name, inputs, error, heads == 1)
        # Second order in the error, averaged over 256 samples: within 35% on this net.
        assert 0.65 < predicted / measured < 1.35, f"{name}: predicted {predicted:.3e}, measured {measured:.3e}"


def test_sensitivity_batches_cap_samples_and_batch_size():
    calibration = [torch.zeros(64, 3, 512, 512), torch.zeros(64, 3, 512, 512)]
    batches = sensitivity_batches(calibration, 100)
    assert sum(b.shape[0] for b in batches) == 100, [b.shape[0] for b in batches]
    assert max(b.shape[0] for b in batches) <= 5, [b.shape[0] for b in batches]  # 2**22 elements / (3*512*512)
    assert sensitivity_batches(calibration, 0) == []


def _budget_recipe(sensitivity_samples: int) -> dict:
    return {
        "input_shape": [1, 3, 16, 16],
        "rules": [{"match": "*", "method": ["spatial_separable", "keep"], "min_in_channels": 3, "round_to": 1}],
        "target": {"macs": 0.5},
        "calibration": {"samples": 128, "batch_size": 64, "sensitivity_samples": sensitivity_samples},
    }


def test_budget_weighs_each_layer_by_its_sensitivity_and_reports_it():
    model = Net().eval()
    data = [torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    weighted = compressor.plan(model, _budget_recipe(128), torch.zeros(1, 3, 16, 16), data=data)
    plain = compressor.plan(model, _budget_recipe(0), torch.zeros(1, 3, 16, 16), data=data)
    rewritten = [layer for layer in weighted.layers if layer.choices]
    assert rewritten and all(layer.sensitivity is not None and layer.sensitivity > 0 for layer in rewritten), [
        (layer.name, layer.sensitivity) for layer in rewritten
    ]
    assert all(layer.sensitivity is None for layer in plain.layers), [(layer.name, layer.sensitivity) for layer in plain.layers]
    assert weighted.target["weighted_by"] == "output sensitivity" and plain.target["weighted_by"] is None
    # The predicted total is the sum of the chosen candidates' weighted squared errors.
    expected = sum(layer.sensitivity * (layer.predicted_error or 0.0) ** 2 for layer in rewritten)
    assert weighted.target["predicted_squared_error"] == pytest.approx(expected, rel=1e-9), (
        weighted.target["predicted_squared_error"], expected
    )
    layers = {layer["name"]: layer for layer in weighted.report()["layers"]}
    assert all(layers[layer.name]["sensitivity"] == layer.sensitivity for layer in rewritten)
