"""Tests for compressor.zoo: the self-written CNN architectures used by demo, tests, benchmarks."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from compressor import tree, zoo
from compressor.export import flatten_outputs

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESNET20_PTH = DATA / "resnet20-cifar10.pth"
CIFAR_NPZ = DATA / "cifar10-train-4660.npz"

NUM_CLASSES = 7

# edge_cases deliberately has a 4x4 conv with padding='same'; torch warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")

# Small configurations: (factory kwargs, test input HxW, expected output shape without batch).
SMALL = {
    "resnet18": (dict(num_classes=NUM_CLASSES, width=8), 64, (NUM_CLASSES,)),
    "resnet50": (dict(num_classes=NUM_CLASSES, width=8), 64, (NUM_CLASSES,)),
    "resnet20_cifar": (dict(num_classes=NUM_CLASSES, width=8), 32, (NUM_CLASSES,)),
    "vgg11_bn": (dict(num_classes=NUM_CLASSES, width=8), 32, (NUM_CLASSES,)),
    "mobilenet_v2": (dict(num_classes=NUM_CLASSES, width_mult=0.25), 64, (NUM_CLASSES,)),
    "inception_style": (dict(num_classes=NUM_CLASSES, width=4), 75, (NUM_CLASSES,)),
    "deeplab_style": (dict(num_classes=NUM_CLASSES, width=8), 64, (NUM_CLASSES, 64, 64)),
    "edge_cases": (dict(num_classes=NUM_CLASSES, width=8), 32, (NUM_CLASSES,)),
    "untraceable": (dict(num_classes=NUM_CLASSES, width=8), 32, (NUM_CLASSES,)),
    "unet": (dict(num_classes=NUM_CLASSES, width=8), 64, (NUM_CLASSES, 64, 64)),
    "shadowed_unet": (dict(num_classes=NUM_CLASSES, width=8), 64, (NUM_CLASSES, 64, 64)),
    # Three scales (strides 8, 16, 32) of 4 x reg_max (4) box channels + the classes.
    "yolo_style": (
        dict(num_classes=NUM_CLASSES, width=8), 64, [(16 + NUM_CLASSES, 8, 8), (16 + NUM_CLASSES, 4, 4), (16 + NUM_CLASSES, 2, 2)]
    ),
}
TRACEABLE = [n for n in SMALL if n != "untraceable"]


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    kwargs, _, _ = SMALL[name]
    model = zoo.ZOO[name](**kwargs)
    zoo.randomize_batchnorm(model, seed=seed)
    return tree.set_training_(model, False)  # shadowed_unet shadows children(), which eval() calls


def small_input(name: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    _, hw, _ = SMALL[name]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, hw, hw, generator=gen)


def test_zoo_registry_complete():
    expected = set(SMALL)
    assert set(zoo.ZOO) == expected, f"ZOO keys {sorted(zoo.ZOO)} != {sorted(expected)}"
    for name, factory in zoo.ZOO.items():
        assert factory.__name__ == name, f"ZOO[{name!r}] is {factory.__name__}"
        assert getattr(zoo, name) is factory


@pytest.mark.parametrize("name", sorted(SMALL))
def test_factory_signature_keyword_only_with_defaults(name):
    sig = inspect.signature(zoo.ZOO[name])
    params = sig.parameters
    wanted = {"num_classes", "width_mult" if name == "mobilenet_v2" else "width"}
    assert wanted <= set(params), f"{name}: parameters {list(params)} lack {wanted}"
    for p in params.values():
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, f"{name}.{p.name} kind is {p.kind}"
        assert p.default is not inspect.Parameter.empty, f"{name}.{p.name} has no default"


@pytest.mark.parametrize("name", sorted(SMALL))
def test_default_input_shape(name):
    shape = zoo.default_input_shape(name)
    assert isinstance(shape, tuple) and len(shape) == 4, f"{name}: {shape!r}"
    assert shape[0] == 1 and shape[1] == 3, f"{name}: {shape!r}"
    assert zoo.default_input_shape(f"compressor.zoo:{name}") == shape
    # the small version must accept the default input shape too
    model = build(name)
    with torch.no_grad():
        outputs = flatten_outputs(model(torch.randn(*shape)))
    assert all(out.shape[0] == 1 for out in outputs), f"{name}: outputs {[tuple(o.shape) for o in outputs]} for input {shape}"


def test_default_input_shape_unknown():
    with pytest.raises(KeyError):
        zoo.default_input_shape("no_such_model")


@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_shape_and_finite(name):
    model = build(name)
    _, _, out_shape = SMALL[name]
    x = small_input(name)
    with torch.no_grad():
        outputs = flatten_outputs(model(x))
    expected = out_shape if isinstance(out_shape, list) else [out_shape]
    assert [tuple(o.shape) for o in outputs] == [(2, *shape) for shape in expected], f"{name}: got {[tuple(o.shape) for o in outputs]}"
    for out in outputs:
        assert torch.isfinite(out).all(), f"{name}: non-finite outputs"
        std = out.std().item()
        assert 1e-4 < std < 1e4, f"{name}: output std {std:.3g} is degenerate"


@pytest.mark.parametrize("name", sorted(SMALL))
def test_convs_are_named_conv2d_modules(name):
    model = build(name)
    convs = [n for n, m in tree.named_modules(model) if isinstance(m, nn.Conv2d)]
    assert len(convs) >= 3, f"{name}: only {len(convs)} Conv2d modules: {convs}"
    assert all(convs), f"{name}: unnamed Conv2d module"


@pytest.mark.parametrize("name", TRACEABLE)
def test_symbolic_trace_matches_eager(name):
    model = build(name)
    gm = torch.fx.symbolic_trace(model)
    x = small_input(name)
    with torch.no_grad():
        ref, got = flatten_outputs(model(x)), flatten_outputs(gm(x))
    err = max((r - g).abs().max().item() for r, g in zip(ref, got))
    assert len(ref) == len(got) and err == 0.0, f"{name}: traced vs eager max abs diff {err:.3g}"


def test_untraceable_raises_but_runs_both_branches():
    model = build("untraceable")
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)
    called = []
    model.conv3a.register_forward_hook(lambda m, i, o: called.append("conv3a"))
    model.conv3b.register_forward_hook(lambda m, i, o: called.append("conv3b"))
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
        model(20.0 * small_input("untraceable", batch=1).abs())
    assert set(called) == {"conv3a", "conv3b"}, f"branches taken: {called}"


@pytest.mark.parametrize("name", sorted(SMALL))
def test_pickle_roundtrip(name, tmp_path):
    model = build(name)
    path = tmp_path / f"{name}.pt"
    torch.save(model, path)
    loaded = tree.set_training_(torch.load(path, weights_only=False), False)
    assert type(loaded) is type(model)
    x = small_input(name)
    with torch.no_grad():
        ref, got = flatten_outputs(model(x)), flatten_outputs(loaded(x))
    err = max((r - g).abs().max().item() for r, g in zip(ref, got))
    assert err == 0.0, f"{name}: reloaded model differs by {err:.3g}"


def test_pickle_loads_in_fresh_process(tmp_path):
    names = ["resnet20_cifar", "deeplab_style", "edge_cases", "untraceable"]
    for name in names:
        model = build(name)
        x = small_input(name)
        with torch.no_grad():
            y = model(x)
        torch.save({"model": model, "x": x, "y": y}, tmp_path / f"{name}.pt")
    script = (
        "import sys, torch\n"
        "for name in sys.argv[2:]:\n"
        "    d = torch.load(f'{sys.argv[1]}/{name}.pt', weights_only=False)\n"
        "    with torch.no_grad():\n"
        "        err = (d['model'].eval()(d['x']) - d['y']).abs().max().item()\n"
        "    assert err == 0.0, (name, err)\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path), *names],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, (
        f"fresh-process load failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def test_deterministic_given_seed():
    a = build("edge_cases", seed=3).state_dict()
    b = build("edge_cases", seed=3).state_dict()
    c = build("edge_cases", seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "same seed gave different weights"
    assert not all(torch.equal(a[k], c[k]) for k in a), "different seeds gave identical weights"


def test_randomize_batchnorm():
    torch.manual_seed(0)
    model = zoo.resnet18(num_classes=10, width=8)
    rng_state = torch.get_rng_state()
    zoo.randomize_batchnorm(model, seed=5)
    assert torch.equal(rng_state, torch.get_rng_state()), "randomize_batchnorm used global RNG"
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert (bn.running_var > 0).all()
    torch.manual_seed(0)
    again = zoo.randomize_batchnorm(zoo.resnet18(num_classes=10, width=8), seed=5)
    sa, sb = model.state_dict(), again.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "randomize_batchnorm not deterministic"


def test_option_a_shortcut_matches_reference_formula():
    x = torch.randn(2, 16, 8, 8)
    planes = 32
    ref = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))
    got = zoo.OptionAShortcut(planes)(x)
    assert torch.equal(ref, got), f"shapes {tuple(ref.shape)} vs {tuple(got.shape)}"


def test_edge_cases_contents():
    model = build("edge_cases")
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    kinds = {
        "stride 2": any(m.stride == (2, 2) for m in convs.values()),
        "dilation 2": any(m.dilation == (2, 2) and m.padding == (2, 2) for m in convs.values()),
        "same odd": any(m.padding == "same" and m.kernel_size[0] % 2 for m in convs.values()),
        "same even": any(m.padding == "same" and m.kernel_size == (4, 4) for m in convs.values()),
        "1x5": any(m.kernel_size == (1, 5) for m in convs.values()),
        "5x1": any(m.kernel_size == (5, 1) for m in convs.values()),
        "bias": any(m.bias is not None for m in convs.values()),
        "no bias": any(m.bias is None for m in convs.values()),
        "reflect": any(m.padding_mode == "reflect" for m in convs.values()),
        "groups 2": any(m.groups == 2 for m in convs.values()),
        "depthwise": any(m.groups == m.in_channels > 1 for m in convs.values()),
        "1x1": any(m.kernel_size == (1, 1) for m in convs.values()),
        "odd channels": any(m.out_channels in (7, 13) for m in convs.values()),
        "stride (2,1) pad (2,1)": any(m.stride == (2, 1) and m.padding == (2, 1)
                                      for m in convs.values()),
    }
    missing = [k for k, ok in kinds.items() if not ok]
    assert not missing, f"edge_cases lacks: {missing}"

    gm = torch.fx.symbolic_trace(model)
    shared_calls = [n for n in gm.graph.nodes
                    if n.op == "call_module" and n.target == "conv_shared"]
    functional = [n for n in gm.graph.nodes
                  if n.op == "call_function" and n.target is F.conv2d]
    assert len(shared_calls) == 2, f"conv_shared called {len(shared_calls)} times"
    assert len(functional) == 1, f"{len(functional)} functional conv2d calls"
    fanout = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "conv_fanout")
    assert len(fanout.users) >= 2, f"conv_fanout has {len(fanout.users)} users"
    bn_input = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "bn")
    assert bn_input.args[0].target == "conv_bn"


def test_resnet20_cifar_matches_checkpoint_names():
    model = zoo.resnet20_cifar()
    keys = set(model.state_dict())
    assert "conv1.weight" in keys and "linear.weight" in keys and "layer3.2.bn2.running_var" in keys
    assert model.linear.in_features == 64 and model.linear.out_features == 10
    assert len(zoo.CIFAR10_MEAN) == 3 and len(zoo.CIFAR10_STD) == 3


def test_resnet20_cifar_pretrained_accuracy():
    if not RESNET20_PTH.exists() or not CIFAR_NPZ.exists():
        pytest.skip(f"benchmark data not present under {DATA}")
    model = zoo.resnet20_cifar()
    state = torch.load(RESNET20_PTH, weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    with np.load(CIFAR_NPZ) as data:
        x = torch.from_numpy(data["x"][:200]).float() / 255.0
        y = torch.from_numpy(data["y"][:200]).long()
    mean = torch.tensor(zoo.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(zoo.CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        pred = model((x - mean) / std).argmax(1)
    acc = (pred == y).float().mean().item()
    assert acc > 0.9, f"resnet20_cifar accuracy on the first 200 images: {acc:.3f}"
