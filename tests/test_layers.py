"""Factor stacks reproduce single convs over the full hyperparameter matrix; bad convs are refused."""

import itertools

import pytest
import torch
from torch import nn

from compressor import layers
from compressor.methods import METHODS, factorize

KERNELS = [(3, 3), (5, 5), (3, 1), (1, 5), (7, 7), (1, 1)]
STRIDES = [1, 2, (2, 1)]
PADDINGS = [0, 1, "same", (2, 1)]
DILATIONS = [1, 2]
BIASES = [True, False]
METHOD_GROUPS = [("depthwise_separable", 1), ("spatial_separable", 1), ("low_rank", 1), ("grouped", 1), ("grouped", 2)]
IN_CHANNELS, OUT_CHANNELS = 5, 7
TOLERANCE = 2e-5  # float32 layers; factor math is float64, the stack runs in float32


def _cases():
    for (method, groups), kernel, stride, padding, dilation, bias in itertools.product(
        METHOD_GROUPS, KERNELS, STRIDES, PADDINGS, DILATIONS, BIASES
    ):
        if padding == "same" and stride != 1:
            continue  # torch refuses padding='same' with stride != 1
        if method == "spatial_separable" and kernel == (1, 1):
            continue
        yield pytest.param(
            method, groups, kernel, stride, padding, dilation, bias,
            id=f"{method}-g{groups}-k{kernel[0]}x{kernel[1]}-s{stride}-p{padding}-d{dilation}-{'bias' if bias else 'nobias'}",
        )


@pytest.mark.parametrize("method, groups, kernel, stride, padding, dilation, bias", list(_cases()))
def test_full_rank_stack_reproduces_conv(method, groups, kernel, stride, padding, dilation, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(IN_CHANNELS, OUT_CHANNELS, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)
    spec = METHODS[method]
    rank = spec.full_rank(conv, groups)
    stack, weight_error = factorize(spec, conv, rank, groups)
    x = torch.randn(2, IN_CHANNELS, 17, 19)
    with torch.no_grad():
        expected, got = conv(x), stack(x)
    assert got.shape == expected.shape, f"output shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    error = ((got - expected).norm() / expected.norm()).item()
    assert error < TOLERANCE, f"rank {rank}: output relative error {error:.3e} (weight error {weight_error:.3e})"
    assert weight_error < 1e-6, f"rank {rank}: weight relative error {weight_error:.3e}"
    assert all(type(m) is nn.Conv2d for m in stack), f"stack holds {[type(m).__name__ for m in stack]}"


@pytest.mark.parametrize("method, groups", METHOD_GROUPS)
def test_output_error_decreases_with_rank(method, groups):
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 12, 3, padding=1, bias=True)
    _assert_error_falls_to_exact(METHODS[method], conv, groups, step=groups, x=torch.randn(2, 8, 12, 12))


def _assert_error_falls_to_exact(spec, conv, groups, step, x):
    errors = []
    for rank in range(step, spec.full_rank(conv, groups) + 1, step):
        stack, _ = factorize(spec, conv, rank, groups)
        with torch.no_grad():
            errors.append(((stack(x) - conv(x)).norm() / conv(x).norm()).item())
    rounded = [round(e, 5) for e in errors]
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:])), f"not monotone: {rounded}"
    assert errors[0] > 0.05 and errors[-1] < TOLERANCE, f"expected lossy low rank, exact full rank: {rounded}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_stack_keeps_dtype_and_bias_placement(dtype):
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True, dtype=dtype)
    for method, groups in METHOD_GROUPS:
        stack, _ = factorize(METHODS[method], conv, METHODS[method].full_rank(conv, groups), groups)
        dtypes = {m.weight.dtype for m in stack}
        biases = [m.bias is not None for m in stack]
        assert dtypes == {dtype}, f"{method}: factor dtypes {dtypes}"
        assert biases == [False] * (len(stack) - 1) + [True], f"{method}: bias flags {biases}"
        assert all(m.padding_mode == "zeros" for m in stack)


@pytest.mark.parametrize(
    "conv, reason",
    [
        (nn.Conv2d(4, 4, 3, groups=2), "grouped conv (groups=2)"),
        (nn.Conv2d(4, 4, 3, groups=4), "depthwise conv (groups=4)"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), "padding_mode='circular'"),
    ],
)
def test_unsupported_convs_name_the_reason(conv, reason):
    got = layers.unsupported_reason(conv)
    assert got is not None and reason in got, f"reason was {got!r}"


def test_conv_subclass_is_refused():
    class StandardizedConv(nn.Conv2d):
        pass

    got = layers.unsupported_reason(StandardizedConv(4, 4, 3))
    assert got is not None and "StandardizedConv" in got, f"reason was {got!r}"


def test_spatial_skips_1x1():
    assert "1x1" in METHODS["spatial_separable"].skip_reason(nn.Conv2d(4, 4, 1))


def test_check_stack_catches_a_wrong_stride():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    stack, _ = factorize(METHODS["depthwise_separable"], conv, 6, 1)
    stack[0].stride = (1, 1)
    with pytest.raises(AssertionError, match="output"):
        layers.check_stack(conv, stack)


@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, "same", 1), ((2, 1), (2, 1), 2)])
def test_depthwise_separable_is_exact_in_the_branched_form_for_every_multiplier(stride, padding, dilation):
    """Multipliers above 1 run as a sum of multiplier-1 branches (ONNX Runtime's fast depthwise
    kernel); each must compute what the plain depthwise -> pointwise chain computes."""
    if padding == "same" and stride != 1:
        stride = 1
    torch.manual_seed(3)
    conv = nn.Conv2d(6, 10, 3, stride=stride, padding=padding, dilation=dilation, bias=True)
    spec = METHODS["depthwise_separable"]
    x = torch.randn(2, 6, 15, 13)
    for multiplier in range(1, spec.full_rank(conv, 1) + 1):
        stack, _ = factorize(spec, conv, multiplier, 1)
        chain = nn.Sequential(*stack)  # the same modules run one after the other
        with torch.no_grad():
            branched, plain = stack(x), chain(x)
        error = ((branched - plain).norm() / plain.norm()).item()
        expected_type = layers.DecoupledSeparable if multiplier > 1 else nn.Sequential
        assert type(stack) is expected_type, f"M={multiplier}: stack is {type(stack).__name__}"
        assert error < 1e-6, f"M={multiplier}: branched vs chain relative error {error:.3e}"
        assert type(stack[:-1]) is nn.Sequential and stack[:-1][0] is stack[0], "a slice must be the plain chain"
    full_error = ((stack(x) - conv(x)).norm() / conv(x).norm()).item()
    assert full_error < TOLERANCE, f"full rank M={multiplier}: relative error {full_error:.3e}"


def test_profile_counts_the_branched_form_as_the_chain_it_computes():
    """DecoupledSeparable runs its weights through F.conv2d, so the convs' own hooks never fire; the
    profile must still count their calls and MACs (report.json's totals came out 0 for them)."""
    from compressor.profile import CallShape, profile_model, totals

    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1)
    spec = METHODS["depthwise_separable"]
    stack, _ = factorize(spec, conv, 3, 1)
    assert type(stack) is layers.DecoupledSeparable
    profiles = profile_model(stack, torch.randn(1, 8, 16, 16))
    expected = spec.macs(conv, [CallShape((16, 16), (8, 8))], 3, 1)
    got = totals(profiles)["macs"]
    assert got == expected, f"profiled {got} MACs, the method's cost model says {expected}"
    assert [len(p.calls) for p in profiles.values()] == [1, 1], {n: p.calls for n, p in profiles.items()}


def _grouped_cases():
    for groups, kernel, stride, padding, dilation, bias in itertools.product(
        [2, 4], [(3, 3), (1, 1), (3, 1)], [1, (2, 1)], [1, "same"], DILATIONS, [True]
    ):
        if padding == "same" and stride != 1:
            continue
        yield pytest.param(groups, kernel, stride, padding, dilation, bias,
                           id=f"g{groups}-k{kernel[0]}x{kernel[1]}-s{stride}-p{padding}-d{dilation}-{'bias' if bias else 'nobias'}")


#: The methods that keep a grouped conv's groups in every factor, and how many factors they make.
GROUP_KEEPING = [("low_rank", 2), ("grouped", 3)]


@pytest.mark.parametrize("method, factors", GROUP_KEEPING, ids=[m for m, _ in GROUP_KEEPING])
@pytest.mark.parametrize("groups, kernel, stride, padding, dilation, bias", list(_grouped_cases()))
def test_grouped_conv_factorizes_per_group_exactly_at_full_rank(groups, kernel, stride, padding, dilation, bias, method, factors):
    torch.manual_seed(4)
    conv = nn.Conv2d(8, 12, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    spec = METHODS[method]
    assert spec.skip_reason(conv) is None, spec.skip_reason(conv)
    rank = spec.full_rank(conv, groups)
    stack, weight_error = factorize(spec, conv, rank, groups)
    assert [m.groups for m in stack] == [groups] * factors, f"{method} factor groups {[m.groups for m in stack]}"
    x = torch.randn(2, 8, 15, 13)
    with torch.no_grad():
        error = ((stack(x) - conv(x)).norm() / conv(x).norm()).item()
    assert error < TOLERANCE and weight_error < 1e-6, f"{method} rank {rank}: output error {error:.3e}, weight {weight_error:.3e}"


@pytest.mark.parametrize("method", [m for m, _ in GROUP_KEEPING])
@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_conv_error_falls_with_rank(groups, method):
    torch.manual_seed(5)
    conv = nn.Conv2d(16, 16, 3, padding=1, groups=groups, bias=False)
    # low_rank's rank counts per group (every rank allowed); grouped's is the total, a multiple of the groups.
    spec = METHODS[method]
    _assert_error_falls_to_exact(spec, conv, groups, step=spec.rank_step(groups), x=torch.randn(2, 16, 12, 12))


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_tucker_costs_what_its_stack_runs(groups):
    """The per-group Tucker-2 cost model against the profiled MACs and the parameters of its stack."""
    from compressor.profile import profile_model, totals

    conv = nn.Conv2d(16, 24, 3, stride=2, padding=1, groups=groups)
    spec = METHODS["grouped"]
    rank = 2 * groups
    stack, _ = factorize(spec, conv, rank, groups)
    x = torch.randn(1, 16, 10, 10)
    got = (totals(profile_model(stack, x))["macs"], sum(p.numel() for p in stack.parameters()))
    expected = (spec.macs(conv, profile_model(conv, x)[""].calls, rank, groups), spec.params(conv, rank, groups))
    assert got == expected, f"stack runs (MACs, params) {got}, the cost model says {expected}"


@pytest.mark.parametrize("method", [m for m, _ in GROUP_KEEPING])
def test_depthwise_convs_stay_skipped(method):
    reason = METHODS[method].skip_reason(nn.Conv2d(8, 8, 3, groups=8))
    assert reason is not None and "depthwise" in reason, reason


def test_portable_copy_unpickles_without_this_package_and_computes_the_same(tmp_path):
    import subprocess
    import sys

    conv = nn.Conv2d(8, 12, 3, padding=1)
    stack, _ = factorize(METHODS["depthwise_separable"], conv, 3, 1)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), stack).eval()
    copy = layers.portable(model)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        error = (copy(x) - model(x)).abs().max().item()
    assert error < 1e-6 and type(model[1]) is layers.DecoupledSeparable, f"max|diff| {error:.3e}"
    torch.save(copy, tmp_path / "model.pt")
    script = ("import sys, torch; torch.load('model.pt', weights_only=False); "
              "print(sorted(m for m in sys.modules if m.startswith('compressor')))")
    fresh = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0 and fresh.stdout.strip() == "[]", fresh.stdout + fresh.stderr
