"""How much each layer's output error moves the network's output: weights for the budget solver.

The solver adds up per-layer errors. A layer's own relative output error ``e`` says nothing about how
far it travels: the same ``e`` early in a residual stage and just before the classifier do not cost
the network alike. Here every candidate layer ``l`` gets a weight ``w_l`` such that ``w_l * e_l**2``
predicts the increase in the fine-tune's distillation loss (:func:`compressor.finetune.output_loss`)
when that layer's output carries a relative error ``e_l``:

* logits (classification, segmentation): to second order, ``KL(p || p') = 1/2 d^T F d`` with ``F``
  the Fisher information of the model's own predictive distribution with respect to the layer's
  output (Amari 1998; as a per-layer pruning/quantization sensitivity: Theis et al. 2018, "Faster
  gaze prediction with dense networks and Fisher pruning"; Dong et al. 2019, HAWQ, uses the Hessian
  trace the same way). ``E[g g^T]`` is measured with one backward pass per batch, ``g`` being the
  gradient of ``log p(y|x)`` at a label *sampled* from the model (the true Fisher, not the empirical one,
  which would need labels and vanishes where the model is confident);
* other outputs (the normalized MSE of the distillation loss): ``F = J^T J / ||t||^2``, measured with a
  Gaussian probe ``r`` (``E ||J^T r||^2 = ||J||_F^2``, Hutchinson 1989).

Decomposition errors are unknown before the ranks are chosen. Their shape is modelled as a random
mixing of the layer's output channels, the same at every position (see :func:`_mixing_term`): a
truncated factorization's error is a fixed linear map of the layer's input, so it is coherent across
positions, and independent noise per element would average out in a global pool that the real error
survives. Samples are independent in eval mode (BatchNorm uses running statistics), so the per-sample
terms come from one batched backward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compressor import tree
from compressor.export import flatten_outputs
from compressor.task import Task

__all__ = ["layer_sensitivities", "sensitivity_batches"]

#: Input elements per sensitivity batch: the backward pass keeps every activation of the batch. 2**20
#: is 341 CIFAR images (one batch at the default 128 samples) or 6 images at 224: ResNet-50's backward
#: pass added 1.1 GB to the peak at 6 images and 3.8 GB at 27 (2**22), and cost no more per image
#: (0.52 s at 6 a batch, 0.69 s at 27), measured.
_BATCH_ELEMENTS = 2**20


def sensitivity_batches(calibration: Sequence[torch.Tensor], samples: int) -> list[torch.Tensor]:
    """The first ``samples`` calibration inputs, in batches small enough to back-propagate through."""
    inputs = []
    taken = 0
    for batch in calibration:
        if taken >= samples:
            break
        inputs.append(batch[: samples - taken])
        taken += inputs[-1].shape[0]
    if not inputs:
        return []
    joined = torch.cat(inputs)
    per_sample = max(joined[0].numel(), 1)
    size = max(1, min(joined.shape[0], _BATCH_ELEMENTS // per_sample))
    return list(joined.split(size))


def _probe_loss(outputs: list[torch.Tensor], task: Task, generator: torch.Generator) -> torch.Tensor:
    """A scalar whose gradient ``g`` at a layer output gives that output's Fisher term as ``E[g g^T]``,
    summed over samples (each sample's term only depends on its own outputs)."""
    terms = []
    for index, (output, weight) in enumerate(zip(outputs, task.weights)):
        if weight == 0 or not output.is_floating_point():
            continue
        output = output.float()
        if index == 0 and task.logits:
            log_p = F.log_softmax(output, dim=1)
            classes = log_p.shape[1]
            flat = log_p.movedim(1, -1).reshape(-1, classes)
            sampled = torch.multinomial(flat.detach().exp(), 1, generator=generator)
            positions = flat.shape[0] // output.shape[0]
            # The distillation KL is a mean over positions: each position weighs 1/positions, and its
            # Fisher term carries that weight squared through the gradient, so scale by sqrt(weight/positions).
            scale = (weight / positions) ** 0.5
            terms.append(scale * flat.gather(1, sampled).sum())
        else:
            # normalized MSE: ||s - t||^2 / ||t||^2 over the batch, i.e. per sample ||J d||^2 over the
            # mean per-sample energy; exact in d (no 1/2 as in the KL), hence the 2 against the caller's 1/2.
            energy = output.detach().pow(2).sum().clamp_min(1e-12) / output.shape[0]
            probe = torch.randn(output.shape, generator=generator, dtype=output.dtype)
            terms.append((2 * weight / energy) ** 0.5 * (probe * output).sum())
    return torch.stack(terms).sum()


def _mixing_term(output: torch.Tensor, grad: torch.Tensor) -> float:
    """``sum_i E[(d_i . g_i)^2] / 2`` per unit squared relative error, for ``d_i = M y_i``: the error a
    random mixing ``M`` of the output's channels makes, the same mixing at every position.

    ``E[(d . g)^2] = s^2 ||G||_F^2`` with ``G = g y^T`` summed over positions (channels x channels) and
    ``M`` i.i.d. with variance ``s^2 = e^2 / C`` (so that ``E||d||^2 = e^2 ||y||^2``). The error of a
    truncated factorization is a fixed linear map of the layer's input, so it is spatially coherent like
    this one; independent noise per element would average out in any later pooling and make the layers
    before a global pool look up to ``positions`` times less sensitive than they are.
    """
    if output.dim() < 2:
        return 0.0
    samples, channels = output.shape[0], output.shape[1]
    y, g = output.reshape(samples, channels, -1), grad.reshape(samples, channels, -1)
    mixed = torch.einsum("ncp,ndp->ncd", g, y)
    return float(mixed.pow(2).sum()) / channels / 2


def layer_sensitivities(
    module: nn.Module, names: Sequence[str], batches: Sequence[torch.Tensor], task: Task, seed: int = 0
) -> dict[str, float]:
    """``{name: w}``: the predicted distillation-loss increase per unit squared relative output error of
    each named layer, averaged over the samples in ``batches`` (see the module docstring). Layers called
    several times add up their calls. ``module`` is run in eval mode and left unchanged."""
    if not batches or not names:
        return {}
    generator = torch.Generator().manual_seed(seed)
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def hook(name: str):
        def record(_module, _inputs, output) -> None:  # must return None: a return value replaces the output
            if isinstance(output, torch.Tensor) and output.requires_grad:
                captured[name].append(output)

        return record

    handles = [tree.get_submodule(module, name).register_forward_hook(hook(name)) for name in names]
    totals = {name: 0.0 for name in names}
    samples = 0
    was_training = [m.training for m in tree.modules(module)]
    tree.set_training_(module, False)
    try:
        for inputs in batches:
            inputs = inputs.detach().clone().requires_grad_(True)  # so every activation is in the graph
            outputs = flatten_outputs(module(inputs))
            loss = _probe_loss(outputs, task, generator)
            order = [(name, output) for name in names for output in captured[name]]
            grads = torch.autograd.grad(loss, [output for _, output in order], allow_unused=True)
            for (name, output), grad in zip(order, grads):
                if grad is None:
                    continue
                totals[name] += _mixing_term(output.detach().float(), grad.float())
            samples += inputs.shape[0]
            for store in captured.values():
                store.clear()
    finally:
        for handle in handles:
            handle.remove()
        for submodule, training in zip(tree.modules(module), was_training):
            submodule.training = training
    return {name: total / max(samples, 1) for name, total in totals.items()}
