"""Fine-tuning by distillation: recipe section, loss, budget, best weights, determinism, Ctrl-C, report."""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch
from torch import nn

import compressor
from compressor.errors import RecipeError
from compressor.finetune import _Capture, distillation_loss, samples_of, split_holdout, state_digest
from compressor.recipe import load_recipe
from tests.models_for_cli import INPUT_SHAPE, tiny_net

RULES = [{"match": "conv[23]", "method": "depthwise_separable", "rank": {"macs": 0.3}}]


def _recipe(**finetune) -> dict:
    return {"input_shape": list(INPUT_SHAPE), "rules": RULES, "calibration": {"samples": 128, "batch_size": 64},
            "finetune": finetune}


@pytest.fixture(scope="module")
def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Synthetic images labelled by the original model, so that labels and teacher agree."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(320, 3, 32, 32, generator=generator)
    with torch.no_grad():
        labels = tiny_net()(inputs).argmax(1)
    return [(inputs[i : i + 64], labels[i : i + 64]) for i in range(0, 320, 64)]


def _compress(data, **finetune):
    return compressor.compress(tiny_net(), _recipe(**finetune), torch.zeros(INPUT_SHAPE), data=data, progress=False)


# ------------------------------------------------------------------------------------------------ recipe


def test_recipe_defaults_off_and_overrides_create_the_section():
    base = {"rules": RULES}
    assert load_recipe(base).finetune is None
    tuned = load_recipe(base, ["finetune.max_minutes=5"]).finetune
    assert (tuned.max_minutes, tuned.steps, tuned.optimizer, tuned.batchnorm) == (5.0, None, "adamw", "frozen")
    # Chosen by held-out measurement (see compressor/finetune.py): output distillation only, 2 evaluations.
    assert (tuned.feature_weight, tuned.evaluations) == (0.0, 2), (tuned.feature_weight, tuned.evaluations)
    assert tuned.learning_rate == 1e-3
    assert load_recipe(base, ["finetune.steps=3", "finetune.optimizer=sgd"]).finetune.learning_rate == 1e-2
    assert not load_recipe(base, ["finetune.steps=0", "finetune.max_minutes=5"]).finetune.enabled


@pytest.mark.parametrize(
    "section, needles",
    [
        ({}, ["finetune", "set a budget", "steps, epochs or max_minutes"]),
        ({"steps": 5, "optimiser": "sgd"}, ["unknown key 'optimiser' at finetune", "allowed:", "optimizer"]),
        ({"steps": 5, "optimizer": "adam"}, ["finetune.optimizer", "'adamw' or 'sgd'", "'adam'"]),
        ({"steps": -1}, ["finetune.steps", "greater than or equal to 0"]),
        ({"max_minutes": 0}, ["finetune.max_minutes", "greater than 0"]),
        ({"steps": 5, "alpha": 1.5}, ["finetune.alpha", "less than or equal to 1"]),
        ({"steps": 5, "batchnorm": "sync"}, ["finetune.batchnorm", "'frozen' or 'train'"]),
        ({"steps": 5, "holdout": 1.5}, ["finetune.holdout", "count >= 1 or a fraction", "1.5"]),
        ({"steps": 5, "warmup": 1}, ["finetune.warmup", "less than 1"]),
    ],
    ids=lambda v: str(v),
)
def test_recipe_errors_name_key_rule_and_value(section, needles):
    with pytest.raises(RecipeError) as info:
        load_recipe({"rules": RULES, "finetune": section})
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} missing from {message!r}"


# ------------------------------------------------------------------------------------------------ parts


def test_distillation_loss_is_zero_on_identical_logits_and_mixes_cross_entropy():
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    labels = logits.argmax(1)
    assert float(distillation_loss(logits, logits, None, 4.0, 0.7)) == pytest.approx(0.0, abs=1e-6)
    ce = float(nn.functional.cross_entropy(logits, labels))
    mixed = float(distillation_loss(logits, logits, labels, 4.0, 0.7))
    assert mixed == pytest.approx(0.3 * ce, rel=1e-5), f"mixed {mixed}, 0.3 * CE {0.3 * ce}"
    other = torch.randn(8, 10, generator=torch.Generator().manual_seed(1))
    assert float(distillation_loss(other, logits, None, 4.0, 0.7)) > 0.01


def test_feature_capture_pairs_stack_and_original_outputs_without_changing_them(data):
    result = compressor.compress(tiny_net(), _recipe(steps=0), torch.zeros(INPUT_SHAPE))
    teacher, student = tiny_net(), result.model
    inputs = data[0][0]
    with torch.no_grad():
        expected = student(inputs)
    capture = _Capture(student, teacher, ["conv2", "conv3"])
    capture.active = True
    with torch.no_grad():
        got = student(inputs)
        teacher(inputs)
    pairs = capture.pairs()
    capture.remove()
    assert torch.equal(got, expected), "a hook changed the model output"
    assert len(pairs) == 2, f"expected one pair per rewritten conv, got {len(pairs)}"
    for stack_out, conv_out in pairs:
        assert stack_out.shape == conv_out.shape


def test_split_holdout_is_deterministic_and_disjoint(data):
    example = torch.zeros(INPUT_SHAPE)
    train, held = split_holdout(data, 0.25, 0, example)
    again, _ = split_holdout(data, 0.25, 0, example)
    train_x = torch.cat([x for x, _ in train])
    held_x = torch.cat([x for x, _ in held])
    assert (train_x.shape[0], held_x.shape[0]) == (240, 80)
    assert torch.equal(train_x, torch.cat([x for x, _ in again]))
    flat = {tuple(row[:4].tolist()) for row in train_x.flatten(1)}
    assert not any(tuple(row[:4].tolist()) in flat for row in held_x.flatten(1)), "held-out rows leak into train"
    assert samples_of(held, example, "held").count == 80


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def tuned(data):
    return _compress(data, steps=20, batch_size=32, holdout=64, lr=3e-3, evaluations=4, feature_weight=1.0)


def test_finetune_lowers_the_loss_and_keeps_the_best_weights(tuned):
    record = tuned.report["finetune"]
    assert record["steps"] == 20 and record["stopped_by"] == "steps", record
    loss = record["loss"]
    assert loss["last"] < loss["first"], f"loss did not fall: first {loss['first']:.4f}, last {loss['last']:.4f}"
    assert record["holdout_samples"] == 64 and record["train_samples"] == 256
    best = max(record["evaluations"], key=lambda e: (e["accuracy_compressed"], e["agreement"], -e["output_rel_error"]))
    best_step = best.pop("step")
    assert best.pop("seconds") <= record["seconds"], record["evaluations"]
    assert (record["after"], record["best_step"]) == (best, best_step), f"after {record['after']} is not the best {best}"
    assert record["after"]["accuracy_compressed"] >= record["before"]["accuracy_compressed"]
    assert record["after"]["agreement"] >= record["before"]["agreement"]
    assert record["augment"] is True and record["feature_layers"] == 2 and record["device"] == "cpu"
    assert not any(m.training for m in tuned.model.modules()), "the fine-tuned model is left in train mode"


def test_eval_data_measures_but_never_picks_the_weights(data):
    """The best weights are chosen on the held-out part of --data; --eval-data (a test set) only measures,
    so its accuracy is not flattered by a checkpoint chosen on it."""
    test_set = [(x + 0.5, y) for x, y in data[:1]]
    result = compressor.compress(
        tiny_net(), _recipe(steps=6, batch_size=32, holdout=64, evaluations=2), torch.zeros(INPUT_SHAPE), data=data,
        eval_data=test_set, progress=False,
    )
    record = result.report["finetune"]
    assert (record["holdout_samples"], record["train_samples"]) == (64, 256), (record["holdout_samples"], record["train_samples"])
    assert result.report["metrics"]["samples"] == 64, result.report["metrics"]


def test_weights_come_back_in_the_standard_memory_format(tuned):
    """Training runs channels_last on the CPU; the returned model must not carry that layout."""
    odd = [name for name, p in tuned.model.named_parameters() if p.dim() == 4 and not p.is_contiguous()]
    assert not odd, f"parameters left channels_last: {odd}"


def test_finetune_is_deterministic_on_cpu(data, tuned):
    again = _compress(data, steps=20, batch_size=32, holdout=64, lr=3e-3, evaluations=4, feature_weight=1.0)
    assert state_digest(again.model) == state_digest(tuned.model)
    assert again.report["finetune"]["loss"]["curve"] == tuned.report["finetune"]["loss"]["curve"]


def test_finetuned_model_exports_with_parity(tmp_path, tuned):
    tuned.save(tmp_path)
    assert tuned.report["onnx"]["passed"], tuned.report["onnx"]
    saved = json.loads((tmp_path / "report.json").read_text())["finetune"]
    assert saved["steps"] == 20 and saved["after"] == tuned.report["finetune"]["after"]


def test_time_budget_is_honoured(data):
    budget = 0.1  # minutes
    started = time.perf_counter()
    result = _compress(data, max_minutes=budget, batch_size=32, holdout=64)
    record = result.report["finetune"]
    assert record["stopped_by"] == "max_minutes", record["stopped_by"]
    assert record["seconds"] <= budget * 60 * 1.05, f"fine-tune took {record['seconds']:.2f}s of a {budget * 60:.0f}s budget"
    assert record["seconds"] >= budget * 60 * 0.8, f"fine-tune stopped early: {record['seconds']:.2f}s of {budget * 60:.0f}s"
    assert record["steps"] > 0 and time.perf_counter() - started > record["seconds"]


def test_ctrl_c_stops_cleanly_and_keeps_the_best_weights(data):
    model, calls = tiny_net(), []

    def interrupt_on_fifth_training_call(module, inputs, output) -> None:
        calls.append(module.training)
        if module.training and sum(calls) == 5:
            signal.raise_signal(signal.SIGINT)

    # The hook sits on the fc layer of the student (deep-copied by compress with the hook in place).
    model.fc.register_forward_hook(interrupt_on_fifth_training_call)
    handler = signal.getsignal(signal.SIGINT)
    result = compressor.compress(
        model, _recipe(steps=1000, batch_size=32, holdout=64, evaluations=2), torch.zeros(INPUT_SHAPE), data=data, progress=False
    )
    record = result.report["finetune"]
    assert record["interrupted"] and record["stopped_by"] == "interrupted", record["stopped_by"]
    assert record["steps"] == 5, f"stopped after {record['steps']} steps, expected the interrupted step to finish"
    assert record["best_step"] == 0 and record["after"] == record["before"]
    assert signal.getsignal(signal.SIGINT) is handler, "the SIGINT handler was not restored"


def test_without_data_fine_tuning_is_skipped_and_reported():
    result = compressor.compress(tiny_net(), _recipe(steps=10), torch.zeros(INPUT_SHAPE))
    assert result.report["finetune"] == {"skipped": "no --data: fine-tuning needs training data"}
    assert compressor.compress(tiny_net(), _recipe(steps=0), torch.zeros(INPUT_SHAPE), data=None).report["finetune"] == {
        "skipped": "finetune.steps is 0"
    }


def test_unavailable_device_is_a_one_line_error(data):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(compressor.CompressorError, match="CUDA is not available"):
        compressor.compress(tiny_net(), _recipe(steps=2), torch.zeros(INPUT_SHAPE), data=data, device="cuda", progress=False)


def test_cli_without_data_says_fine_tuning_is_skipped(tmp_path, tiny_state_dict):
    import yaml

    from tests.test_cli import run_cli, shown

    torch.save(tiny_state_dict, tmp_path / "model.pt")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(_recipe(max_minutes=1)))
    proc = run_cli("--recipe", tmp_path / "recipe.yaml", "--arch", "tests.models_for_cli:tiny_net",
                   "--out", tmp_path / "out", tmp_path / "model.pt")
    assert proc.returncode == 0, shown(proc)
    assert "no --data: fine-tuning skipped" in proc.stdout, shown(proc)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["finetune"] == {"skipped": "no --data: fine-tuning needs training data"}
