"""Property tests (hypothesis): random conv geometries through every method.

Bounded example counts keep this under a minute on two cores; the fixed matrices in test_layers.py
and test_cp.py cover the named edge cases, these look for the ones nobody named.
"""

from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from compressor.decompose.cp import CPDegenerateError
from compressor.methods import METHODS, conv_macs, factorize
from compressor.profile import CallShape, profile_model, totals

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def conv_cases(draw):
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    if stride == (1, 1) and draw(st.booleans()):
        padding = "same"
    else:
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    conv = nn.Conv2d(
        draw(st.integers(1, 6)), draw(st.integers(1, 6)), kernel, stride=stride, padding=padding,
        dilation=dilation, bias=draw(st.booleans()),
    )
    extent = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
    size = (extent[0] + draw(st.integers(0, 5)), extent[1] + draw(st.integers(0, 5)))
    seed = draw(st.integers(0, 2**16))
    return conv, size, seed


def _setup(case, method_name, dtype=torch.float64):
    conv, size, seed = case
    torch.manual_seed(seed)
    conv = conv.to(dtype)
    with torch.no_grad():
        conv.weight.normal_()
    method = METHODS[method_name]
    inputs = torch.randn(2, conv.in_channels, *size, dtype=dtype)
    return conv, method, inputs


def _usable(method, conv) -> bool:
    return method.skip_reason(conv) is None


def _stack_at(method, conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """The method's stack at ``rank``. A CP fit may legitimately be refused as degenerate (the pipeline
    then falls back); shapes, costs and export do not depend on the fit, so build from random factors
    of the shapes the method returns."""
    try:
        return factorize(method, conv, rank, 1)[0]
    except CPDegenerateError:
        shaped = method.decompose(torch.zeros_like(conv.weight), rank, 1)
        return method.build(conv, tuple(torch.randn_like(factor) for factor in shaped), 1)


def _counted_macs(stack: nn.Sequential, inputs: torch.Tensor) -> int:
    """MACs per sample of one forward, counted by the same hooks the pipeline's totals use."""
    return totals(profile_model(stack, inputs[:1]))["macs"]


@pytest.mark.parametrize("method_name", sorted(METHODS))
@FAST
@given(case=conv_cases())
def test_full_rank_reproduces_the_layer(method_name, case):
    conv, method, inputs = _setup(case, method_name)
    if not _usable(method, conv):
        return
    full = method.full_rank(conv, 1)
    stack, weight_error = factorize(method, conv, full, 1)
    with torch.no_grad():
        expected, got = conv(inputs), stack(inputs)
    error = (torch.linalg.norm(got - expected) / torch.linalg.norm(expected).clamp_min(1e-30)).item()
    assert error < 1e-8 and weight_error < 1e-8, f"{method_name} {conv} at full rank {full}: output {error:.2e}, weight {weight_error:.2e}"


@pytest.mark.parametrize("method_name", sorted(METHODS))
@FAST
@given(case=conv_cases())
def test_cost_formulas_match_the_built_stack(method_name, case):
    conv, method, inputs = _setup(case, method_name)
    if not _usable(method, conv):
        return
    rank = max(method.rank_step(1), method.full_rank(conv, 1) // 2)
    stack = _stack_at(method, conv, rank)
    with torch.no_grad():
        output = conv(inputs[:1])
    calls = [CallShape(tuple(inputs.shape[-2:]), tuple(output.shape[-2:]))]
    counted = _counted_macs(stack, inputs)
    assert method.macs(conv, calls, rank, 1) == counted, f"{method_name} {conv} rank {rank}: formula {method.macs(conv, calls, rank, 1)} vs counted {counted}"
    params = sum(p.numel() for p in stack.parameters())
    assert method.params(conv, rank, 1) == params, f"{method_name} {conv} rank {rank}: formula {method.params(conv, rank, 1)} vs {params}"
    assert conv_macs(conv, calls) == _counted_macs(nn.Sequential(conv), inputs)


@pytest.mark.parametrize("method_name", ["depthwise_separable", "spatial_separable", "grouped"])
@FAST
@given(case=conv_cases())
def test_weight_error_does_not_increase_with_rank(method_name, case):
    conv, method, _ = _setup(case, method_name)
    if not _usable(method, conv):
        return
    ranks = range(1, method.full_rank(conv, 1) + 1)
    errors = [factorize(method, conv, rank, 1)[1] for rank in ranks]
    # Spectral methods are optimal per rank; Tucker-2 (HOOI, a few sweeps) may wobble by a hair.
    slack = 1e-9 if method.spectrum(conv.weight, 1, None) is not None else 1e-3
    rises = [(r, a, b) for r, a, b in zip(ranks, errors, errors[1:]) if b > a + slack]
    assert not rises, f"{method_name} {conv}: error rose from rank r to r+1 at {rises}"


@pytest.mark.parametrize("method_name", sorted(METHODS))
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_cases())
def test_onnx_export_of_a_decomposed_layer_agrees(method_name, case):
    conv, method, inputs = _setup(case, method_name, dtype=torch.float32)
    if not _usable(method, conv):
        return
    # ONNX Runtime refuses auto_pad SAME with dilation; an asymmetric 'same' (odd d*(k-1)) can only be
    # exported that way, for the original conv as much as for its factors.
    asymmetric_same = conv.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(conv.dilation, conv.kernel_size))
    assume(not (asymmetric_same and max(conv.dilation) > 1))
    rank = max(method.rank_step(1), method.full_rank(conv, 1) // 2)
    stack = _stack_at(method, conv, rank)
    stack.eval()
    buffer = io.BytesIO()
    torch.onnx.export(stack, (inputs,), buffer, opset_version=17, dynamo=False)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
    with torch.no_grad():
        expected = stack(inputs).numpy()
    error = np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-30)
    assert error < 1e-5, f"{method_name} {conv} rank {rank}: ONNX Runtime vs PyTorch relative error {error:.2e}"
