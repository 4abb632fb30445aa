"""The one-pass refit (compressor.walk): same stacks as re-running both networks per layer, linear work."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

from compressor import refit, walk, zoo
from compressor.methods import METHODS, factorize
from compressor.passes import swap_

# Every method family: last-factor refits and the two-factor spatial ALS.
RULES = {"layer1": "spatial_separable", "layer2": "depthwise_separable", "layer3": "grouped"}


def _model_and_stacks(width: int = 4):
    torch.manual_seed(0)
    model = fx.symbolic_trace(zoo.randomize_batchnorm(zoo.resnet20_cifar(width=width)).eval())
    stacks = {}
    for name, conv in model.named_modules():
        prefix = name.split(".")[0]
        if isinstance(conv, nn.Conv2d) and prefix in RULES:
            method = METHODS[RULES[prefix]]
            rank = max(1, method.full_rank(conv, 1) // 3)
            stacks[name] = (method.name, factorize(method, conv, rank, 1)[0])
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randn(4, 3, 16, 16, generator=generator) for _ in range(2)]
    return model, stacks, batches


def _rerun_every_layer(monkeypatch, model, stacks, batches):
    monkeypatch.setattr(walk, "supports", lambda module, names: "forced: the re-run path")
    try:
        return refit.refit_all_(model, stacks, batches, {name: 1 for name in stacks})
    finally:
        monkeypatch.undo()


def test_one_pass_refit_equals_rerunning_the_networks(monkeypatch):
    model, stacks, batches = _model_and_stacks()
    rerun_stacks = copy.deepcopy(stacks)
    assert walk.supports(model, list(stacks)) is None
    one_pass = refit.refit_all_(model, stacks, batches, {name: 1 for name in stacks})
    rerun = _rerun_every_layer(monkeypatch, model, rerun_stacks, batches)
    assert list(one_pass) == list(stacks)
    worst_error = max(abs(one_pass[n].error_after - rerun[n].error_after) for n in stacks)
    assert worst_error < 1e-6, f"refit errors differ by up to {worst_error:.3e}"
    worst_weight = 0.0
    for name in stacks:
        for new, old in zip(stacks[name][1].parameters(), rerun_stacks[name][1].parameters()):
            worst_weight = max(worst_weight, float((new - old).detach().norm() / old.detach().norm().clamp_min(1e-30)))
    assert worst_weight < 1e-4, f"refitted weights differ by up to {worst_weight:.3e} (relative)"
    improved = [n for n in stacks if one_pass[n].error_after < one_pass[n].error_before]
    assert improved, "no refit lowered its layer's error"


def _count_conv_calls(model: nn.Module, stacks) -> dict[str, int]:
    counts: dict[str, int] = {}
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    modules += [(f"{name}.stack", stack) for name, (_, stack) in stacks.items()]
    for name, module in modules:
        module.register_forward_hook(lambda *_, name=name: counts.__setitem__(name, counts.get(name, 0) + 1))
    return counts


@pytest.mark.parametrize("width", [4])
def test_one_pass_runs_every_conv_at_most_twice_per_batch(monkeypatch, width):
    model, stacks, batches = _model_and_stacks(width)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    counts = _count_conv_calls(model, stacks)
    refit.refit_all_(model, stacks, batches, {name: 1 for name in stacks})
    walked = sum(counts.values())
    # Each original conv once per batch, plus once more for the compressed network after the first
    # rewrite; each stack once per batch: linear in depth.
    assert walked <= (2 * convs + len(stacks)) * len(batches), f"one pass ran {walked} conv/stack calls for {convs} convs"
    counts.clear()
    _rerun_every_layer(monkeypatch, model, copy.deepcopy(stacks), batches)
    rerun = sum(v for k, v in counts.items() if not k.endswith(".stack"))
    assert rerun > 3 * walked, f"re-running ran {rerun} conv calls against the walk's {walked}: the walk should be far fewer"


def test_shared_convs_and_untraced_models_take_the_rerun_path():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.relu(self.conv(x)))

    shared = Shared()
    assert "called 2 times" in walk.supports(fx.symbolic_trace(shared), ["conv"])
    assert "not traced" in walk.supports(shared, ["conv"])


@pytest.mark.parametrize("max_bytes", [None, 1], ids=["float32", "float16-stored"])
def test_inplace_ops_do_not_leak_between_the_networks(max_bytes):
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (nn.Conv2d(3, 3, 3, padding=1) for _ in range(3))

        def forward(self, x):
            skip = torch.relu(x)
            out = self.b(self.a(skip))
            skip += out  # writes into a tensor both networks share until `a` is replaced
            return self.c(skip)

    torch.manual_seed(0)
    model = fx.symbolic_trace(Residual().eval())
    replacement = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())
    seen = {}

    def visit(name, targets, hidden):
        seen[name] = (targets[0], hidden[0])
        return replacement if name == "a" else model.get_submodule(name)

    batch = torch.randn(2, 3, 8, 8)
    walk.walk_(model, [batch], {"a": visit, "c": visit}, max_bytes=max_bytes)
    swapped = swap_(copy.deepcopy(model), {"a": replacement})
    with torch.no_grad():
        original_out, compressed_out = model(batch), swapped(batch)
    target, hidden = seen["c"]
    tolerance = 1e-5 if max_bytes is None else 3e-3  # float16 storage rounds to 2^-11
    off = float((target - original_out).abs().max() / original_out.abs().max())
    assert off < tolerance, f"original output off by {off:.3e}"
    compressed_in = compressed_out  # c is kept, so its output in the compressed network checks its input
    off = float((model.c(hidden) - compressed_in).abs().max() / compressed_in.abs().max())
    assert off < tolerance, f"the compressed network's input to c is off by {off:.3e}"


def test_activations_past_the_memory_limit_are_stored_in_float16(monkeypatch):
    model, stacks, batches = _model_and_stacks()
    full = refit.refit_all_(model, copy.deepcopy(stacks), batches, {name: 1 for name in stacks})
    float32_left, spills = [], []
    store = walk._store_

    def spy(original, compressed, how, nodes=None):
        changed = store(original, compressed, how, nodes)
        if how is walk._stored:
            held = [value for env in (original, compressed) for node, values in env.items() if node.op not in ("placeholder", "get_attr") for value in values]
            float32_left.append(sum(isinstance(value, torch.Tensor) and value.dtype == torch.float32 for value in held))
        return changed

    monkeypatch.setattr(walk, "_store_", spy)
    spilled_stacks = copy.deepcopy(stacks)
    limited = refit.refit_all_(
        model, spilled_stacks, batches, {name: 1 for name in stacks}, max_bytes=1, spilled=lambda node, held: spills.append((node, held))
    )
    assert len(spills) == 1 and spills[0][1] > 1, spills
    assert float32_left == [0], f"float32 activations still held after the switch: {float32_left}"
    # float16 storage rounds each stored activation by up to 2^-11: the refits barely move.
    worst = max(abs(limited[n].error_after - full[n].error_after) for n in stacks)
    assert worst < 2e-3, f"refit errors with float16 storage differ by up to {worst:.2e}"
    assert all(limited[n].error_after < limited[n].error_before for n in stacks), limited


def test_the_limit_is_checked_batch_by_batch():
    """The float32 held when the walk switches to float16 passes the limit by at most one batch's output,
    though a single node's outputs (8 batches, both networks) are several times the limit."""
    model, stacks, batches = _model_and_stacks()
    batches = [batch for batch in batches for _ in range(4)]  # 8 batches
    sizes, spills = [], []
    keep = walk._Storage.keep

    def spy(self, value):
        if isinstance(value, torch.Tensor):
            sizes.append(value.nbytes)
        return keep(self, value)

    limit = 40_000
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(walk._Storage, "keep", spy)
        refit.refit_all_(model, stacks, batches, {name: 1 for name in stacks}, max_bytes=limit, spilled=lambda *a: spills.append(a))
    (node, held), = spills
    assert limit < held <= limit + max(sizes), f"switched at {node} holding {held} bytes; limit {limit}, largest batch output {max(sizes)}"
    assert 8 * max(sizes) > 2 * limit, "the test needs a node whose outputs pass the limit by far"


def test_below_the_memory_limit_nothing_is_stored_in_float16():
    model, stacks, batches = _model_and_stacks()
    spills = []
    refit.refit_all_(model, stacks, batches, {name: 1 for name in stacks}, max_bytes=2**40, spilled=lambda *a: spills.append(a))
    assert spills == [], spills


def test_a_write_through_a_view_keeps_float32_storage(caplog):
    class ViewWrite(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            out = self.a(x)
            out[:, :1].zero_()  # reaches `out` only through the view's shared storage
            return self.c(out)

    torch.manual_seed(0)
    model = fx.symbolic_trace(ViewWrite().eval())
    seen, spills = {}, []

    def visit(name, targets, hidden):
        seen[name] = hidden[0]
        return model.get_submodule(name)

    batch = torch.randn(2, 3, 8, 8)
    with caplog.at_level("WARNING", logger="compressor.walk"):
        walk.walk_(model, [batch], {"a": visit, "c": visit}, max_bytes=1, spilled=lambda *a: spills.append(a))
    with torch.no_grad():
        expected = model.a(batch)
        expected[:, :1] = 0
    assert spills == [] and "writes through a view" in caplog.text, (spills, caplog.text)
    assert torch.equal(seen["c"], expected), f"c's input off by {(seen['c'] - expected).abs().max():.3e}"


class _Block(nn.Module):
    """conv -> BN -> + shortcut, the shortcut either the input itself or computed after the branch."""

    def __init__(self, shortcut: str):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.shortcut = nn.Conv2d(4, 4, 1) if shortcut != "identity" else nn.Identity()
        self.alpha = nn.Parameter(torch.tensor(0.5))
        self.kind = shortcut

    def forward(self, x):
        x = torch.relu(self.stem(x))
        out = self.bn(self.conv(x))
        if self.kind == "late":  # evaluated after the branch in graph order
            skip = torch.tanh(self.shortcut(x))
        elif self.kind == "parameter":  # reads a parameter first used after the branch (a get_attr node)
            skip = self.alpha * x
        else:
            skip = x
        return torch.relu(out + skip)


def _conv_targets(model: fx.GraphModule, visited=("stem", "conv"), max_bytes=None):
    """Walk one batch with block targets, the stem replaced by a different conv (so the shortcut
    differs between the networks); returns that stem, the batch and the targets ``conv`` was handed.
    ``max_bytes=1`` stores every activation in float16 from the first one on."""
    stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    batch = torch.randn(2, 3, 6, 6)
    seen = {}

    def visit(name, targets, hidden):
        seen[name] = targets[0]
        return stem if name == "stem" else model.get_submodule(name)

    walk.walk_(model, [batch], {name: visit for name in visited}, block_targets=True, max_bytes=max_bytes)
    return stem, batch, seen["conv"]


@pytest.mark.parametrize("max_bytes", [None, 1], ids=["float32", "float16-stored"])
@pytest.mark.parametrize("shortcut", ["identity", "late", "parameter"])
def test_block_targets_absorb_the_shortcut_error(shortcut, max_bytes):
    """The conv feeding the sum is handed y + (s - s') / a: with it, the compressed block reproduces
    the original block's output where the branch alone could not; also from float16-stored activations."""
    torch.manual_seed(1)
    model = fx.symbolic_trace(zoo.randomize_batchnorm(_Block(shortcut)).eval())
    stem, batch, conv_targets = _conv_targets(model, max_bytes=max_bytes)
    tolerance = 1e-5 if max_bytes is None else 3e-3  # float16 storage rounds to 2^-11 relative
    with torch.no_grad():
        x_original, x_compressed = torch.relu(model.stem(batch)), torch.relu(stem(batch))
        skip = {
            "late": lambda x: torch.tanh(model.shortcut(x)), "parameter": lambda x: model.alpha * x, "identity": lambda x: x
        }[shortcut]
        bn = model.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        expected = model.conv(x_original) + (skip(x_original) - skip(x_compressed)) / scale.view(1, -1, 1, 1)
        # an output of exactly the handed target makes the compressed sum the original one
        sum_with_target = bn(conv_targets) + skip(x_compressed)
        original_sum = bn(model.conv(x_original)) + skip(x_original)
    off = float((conv_targets - expected).abs().max() / expected.abs().max())
    assert off < tolerance, f"target off by {off:.2e}"
    residual = float((sum_with_target - original_sum).abs().max() / original_sum.abs().max())
    assert residual < tolerance, f"the sum with the handed target is off the original sum by {residual:.2e}"
    print(f"{shortcut}, max_bytes {max_bytes}: target off by {off:.2e}, sum off by {residual:.2e}")


def test_block_targets_fall_back_when_the_shortcut_holds_a_visited_conv():
    torch.manual_seed(2)
    model = fx.symbolic_trace(zoo.randomize_batchnorm(_Block("late")).eval())
    _, batch, conv_targets = _conv_targets(model, visited=("stem", "conv", "shortcut"))
    with torch.no_grad():
        plain = model.conv(torch.relu(model.stem(batch)))
    assert torch.allclose(conv_targets, plain, atol=1e-6), "a shortcut holding a visited conv cannot run early: plain targets"


def test_released_inputs_are_dropped_batch_by_batch():
    graph = fx.symbolic_trace(nn.Sequential(nn.ReLU())).graph
    x, relu = [n for n in graph.nodes if n.op != "output"][-2:]
    batches = [torch.randn(2, 3) for _ in range(3)]
    shifted = [b - 1 for b in batches]
    original, compressed = {x: list(batches)}, {x: list(shifted)}
    modules = {"0": nn.ReLU()}
    walk._evaluate(relu, modules, original, compressed, {}, 3, release=[x])
    assert original[x] == [None] * 3 and compressed[x] == [None] * 3, "released input batches are still held"
    assert all(torch.equal(o, b.relu()) for o, b in zip(original[relu], batches))
    assert all(torch.equal(c, s.relu()) for c, s in zip(compressed[relu], shifted))


def test_block_targets_keep_the_plain_target_where_the_batchnorm_scale_is_zero():
    torch.manual_seed(3)
    model = fx.symbolic_trace(zoo.randomize_batchnorm(_Block("identity")).eval())
    with torch.no_grad():
        model.bn.weight[:3] = 0  # the median scale is 0 (a zero-initialized residual BatchNorm)
    _, batch, conv_targets = _conv_targets(model)
    with torch.no_grad():
        plain = model.conv(torch.relu(model.stem(batch)))
    assert torch.isfinite(conv_targets).all(), "a zero BatchNorm scale made the targets non-finite"
    assert torch.equal(conv_targets[:, :3], plain[:, :3]), "zero-scale channels must keep their plain targets"
    assert not torch.allclose(conv_targets[:, 3], plain[:, 3]), "the channel with a scale must be corrected"
