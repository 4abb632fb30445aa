"""Output kinds: detection, metrics per kind (all within [0, 1]), the loss per kind, parity per output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compressor.errors import CompressorError, DataError
from compressor.evaluate import evaluate, mean_iou
from compressor.export import relative_error
from compressor.finetune import output_loss
from compressor.recipe import TaskConfig
from compressor.task import check_labels, detect_kind, resolve_task


def _fixed(outputs):
    """A predictor returning precomputed outputs, whatever the inputs."""
    return lambda inputs: outputs


@pytest.mark.parametrize(
    "shapes, kind",
    [
        ([(2, 10)], "classification"),
        ([(2, 5, 8, 8)], "segmentation"),
        ([(2, 1, 8, 8)], "other"),  # one channel: a regression map, no class to take the argmax of
        ([(2, 10), (2, 10)], "other"),  # several outputs: which one is the logits is the recipe's call
        ([(2, 7, 8, 8), (2, 7, 4, 4), (2, 7, 2, 2)], "other"),
        ([(2, 3, 4)], "other"),
    ],
)
def test_kind_is_detected_from_the_outputs(shapes, kind):
    got = detect_kind([torch.zeros(shape) for shape in shapes])
    assert got == kind, f"{shapes}: detected {got}, expected {kind}"


def test_segmentation_agreement_is_the_fraction_of_pixels():
    # Two samples of 4x4 pixels, 3 classes; the compressed model flips exactly 5 of the 32 pixels.
    # (The classifier-only evaluation divided 27 agreeing pixels by 2 samples: "agreement" 13.5.)
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(2, 3, 4, 4, generator=generator)
    changed = reference.clone()
    flips = [(0, 0, 0), (0, 1, 2), (0, 3, 3), (1, 2, 1), (1, 0, 3)]
    for n, h, w in flips:
        top = int(reference[n, :, h, w].argmax())
        changed[n, (top + 1) % 3, h, w] = reference[n, :, h, w].max() + 1.0
    metrics = evaluate(_fixed([reference]), _fixed([changed]), [torch.zeros(2, 3, 4, 4)])
    assert metrics["task"] == "segmentation", metrics
    assert metrics["pixels"] == 32, metrics
    assert metrics["agreement"] == pytest.approx(27 / 32), f"pixel agreement {metrics['agreement']}"
    assert 0.0 <= metrics["miou_vs_original"] <= 1.0 and metrics["miou_vs_original"] < 1.0, metrics


def test_segmentation_miou_and_accuracy_against_labels_skip_the_ignore_index():
    # One 1x4 image, 2 classes. Original predicts [0, 0, 1, 1], compressed [0, 1, 1, 1]; labels
    # [0, 255, 1, 0]: the second pixel is ignored.
    original = torch.tensor([[[[2.0, 2.0, 0.0, 0.0]], [[0.0, 0.0, 2.0, 2.0]]]])
    compressed = torch.tensor([[[[2.0, 0.0, 0.0, 0.0]], [[0.0, 2.0, 2.0, 2.0]]]])
    labels = torch.tensor([[[0, 255, 1, 0]]])
    metrics = evaluate(_fixed([original]), _fixed([compressed]), [(torch.zeros(1, 3, 1, 4), labels)])
    # Original on the 3 labelled pixels: right, right, wrong -> 2/3. Compressed: the same 3 -> 2/3.
    assert metrics["accuracy_original"] == pytest.approx(2 / 3), metrics
    assert metrics["accuracy_compressed"] == pytest.approx(2 / 3), metrics
    # Against labels (truth 0,1,0 vs predicted 0,1,1): class 0 IoU 1/2, class 1 IoU 1/2.
    assert metrics["miou_original"] == pytest.approx(0.5), metrics
    assert metrics["miou_compressed"] == pytest.approx(0.5), metrics
    # Compressed vs original on all 4 pixels: class 0 IoU 1/2, class 1 IoU 2/3.
    assert metrics["miou_vs_original"] == pytest.approx((0.5 + 2 / 3) / 2), metrics
    assert metrics["agreement"] == pytest.approx(3 / 4), metrics


def test_labels_outside_the_classes_are_refused_by_value():
    logits = torch.zeros(1, 2, 1, 2)
    with pytest.raises(DataError, match="label 7 is outside the model's classes 0..1, ignore index 255"):
        evaluate(_fixed([logits]), _fixed([logits]), [(torch.zeros(1, 3, 1, 2), torch.tensor([[[7, 255]]]))])


def test_classification_agreement_and_accuracy():
    original = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    compressed = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 1, 1, 1])
    metrics = evaluate(_fixed([original]), _fixed([compressed]), [(torch.zeros(4, 3), labels)])
    assert (metrics["agreement"], metrics["accuracy_original"], metrics["accuracy_compressed"]) == (0.75, 0.75, 0.5), metrics


def test_other_outputs_get_a_relative_error_each_and_no_agreement():
    a, b = torch.ones(2, 4, 2, 2), torch.full((2, 6), 3.0)
    metrics = evaluate(_fixed([a, b]), _fixed([a, b * 1.1]), [torch.zeros(2, 3, 8, 8)])
    assert metrics["task"] == "other" and metrics["agreement"] is None, metrics
    assert metrics["output_rel_errors"] == pytest.approx([0.0, 0.1]), metrics
    assert metrics["accuracy_original"] is None and metrics["accuracy_compressed"] is None, metrics


def test_mean_iou_counts_only_classes_present():
    confusion = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    assert mean_iou(confusion) == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert mean_iou(torch.zeros(2, 2)) is None


def test_parity_names_the_worst_output_not_the_pooled_error():
    # A large exact output would hide a small one that is 10% off in a pooled relative error.
    big, small = np.full((1, 1000), 100.0), np.ones((1, 4))
    parity = relative_error([big, small * 1.1], [big, small])
    assert parity.outputs == pytest.approx([0.0, 0.1]), parity
    assert parity.rel == pytest.approx(0.1), parity


def test_recipe_task_forces_logits_and_checks_them():
    outputs = [torch.zeros(2, 5, 8, 8), torch.zeros(2, 4)]
    task = resolve_task(TaskConfig(kind="segmentation", weights=[1.0, 0.5]), outputs)
    assert (task.kind, task.source, task.weights, task.classes) == ("segmentation", "recipe", (1.0, 0.5), 5), task
    with pytest.raises(CompressorError, match=r"task.kind classification expects .* got shape \(2, 5, 8, 8\)"):
        resolve_task(TaskConfig(kind="classification"), outputs)
    with pytest.raises(CompressorError, match="task.weights has 1 value"):
        resolve_task(TaskConfig(weights=[1.0]), outputs)


def test_loss_is_kl_on_logits_plus_weighted_normalized_mse_on_the_rest():
    generator = torch.Generator().manual_seed(0)
    logits, extra = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 6, generator=generator)
    task = resolve_task(TaskConfig(kind="segmentation", weights=[1.0, 0.5]), [logits, extra])
    exact = float(output_loss([logits, extra], [logits, extra], None, task, 4.0, 0.7))
    assert exact == pytest.approx(0.0, abs=1e-6), exact
    # Only the second output is off, by 20%: normalized MSE 0.04, weighted 0.5.
    off = float(output_loss([logits, extra * 1.2], [logits, extra], None, task, 4.0, 0.7))
    assert off == pytest.approx(0.5 * 0.04, rel=1e-4), off
    # Segmentation labels: every pixel ignored adds no cross-entropy.
    ignored = torch.full((2, 4, 4), 255)
    assert float(output_loss([logits, extra], [logits, extra], ignored, task, 4.0, 0.7)) == pytest.approx(0.0, abs=1e-6)
    labelled = float(output_loss([logits, extra], [logits, extra], ignored.clamp(max=2), task, 4.0, 0.7))
    assert labelled > 0.01, labelled


def test_classification_labels_outside_the_classes_count_as_wrong_but_break_training():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    metrics = evaluate(_fixed([logits]), _fixed([logits]), [(torch.zeros(2, 3), torch.tensor([0, 13]))])
    assert (metrics["accuracy_original"], metrics["accuracy_compressed"]) == (0.5, 0.5), metrics
    task = resolve_task(None, [logits])
    with pytest.raises(DataError, match="label 13 is outside the model's classes 0..1"):
        check_labels(task, torch.tensor([0, 13]), logits, "fine-tuning data", training=True)
