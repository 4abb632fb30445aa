"""Block reconstruction: after the layer-wise refit, train each block's factors so that the block's
*output* matches the original's, by gradient descent on the calibration images (no labels).

The refit solves each stack in closed form against its own layer's output (or, with block targets,
its residual sum), through a linear model of the layer; what follows the layer, a ReLU and the next
factorized conv of the same block, is not in its objective. This step puts it there: the traced graph
is cut wherever exactly one activation is live (for a ResNet, after each block's final ReLU; for a
plain chain, after every layer, whose pieces are joined so that each piece holds one rewritten layer
and what follows it up to the next), and the pieces are visited in order. For each piece with
rewritten layers, its output in the original network (fed by the original network) is the target;
its parameters (by default all of them: the factors, the normalization layers' affine parameters,
the layers kept as they were) are trained with Adam under a cosine schedule so that, fed by the network *compressed so far*, it reproduces that target in
relative squared error. The best of the start and the end is kept, so a piece's error on the
calibration set never rises.

This is block reconstruction as in Li et al., "BRECQ: Pushing the Limit of Post-Training Quantization
by Block Reconstruction" (ICLR 2021), applied to factorized layers instead of rounded weights: it
reads the unlabelled calibration images the refit read and nothing else, and it costs
``steps x pieces`` forward and backward passes of one piece over one calibration batch.

Measured on the shared CIFAR-10 ResNet-32 without a fine-tune, 9154 held-out test images, mean drop
over three calibration draws of 1024 images, 100 steps a block (docs/benchmarks.md): half the MACs
-0.89 -> -0.50 points, 1/3 of the MACs -3.38 (512 images) -> -1.79, 26-39 s on 2 cores.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from compressor import tree, walk

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass
class Piece:
    """Consecutive graph nodes with one input (the previous cut; the placeholders for the first piece)
    and one output value; ``rewritten`` are the call targets in it that the compression replaced."""

    nodes: list[fx.Node]
    inputs: list[fx.Node]
    output: fx.Node | object
    rewritten: list[str]
    #: Modules and attributes it calls or reads that another piece does too: never trained, since
    #: training them for this piece would move the other.
    shared: frozenset[str] = frozenset()
    #: Some node in it may write into a tensor in place (``relu_``, ``inplace=True``, ``x += y``):
    #: it is then fed copies, so the held activations it reads (every training step reads them
    #: again, and both networks share them while they agree) are never written.
    mutates: bool = False

    @property
    def end(self) -> str:
        return self.nodes[-1].name if self.nodes else self.inputs[-1].name


def _live_sizes(graph: fx.Graph, nodes: Sequence[fx.Node]) -> list[int]:
    """How many activations are live after each of ``nodes`` (get_attr values are constants, not
    counted); a value the graph returns stays live to the end (a detector's early head output)."""
    freed = walk.last_uses(graph)
    live: set[fx.Node] = set()
    sizes = []
    for node in nodes:
        if node.op != "get_attr" and node.users:
            live.add(node)
        live.difference_update(freed.get(node, ()))
        sizes.append(len(live))
    return sizes


def _reads(chunk: list[fx.Node]) -> set[str]:
    """The modules ``chunk`` calls and the attributes it reads (a piece copies the get_attr nodes it
    reads, wherever they stand in the graph)."""
    called = {node.target for node in chunk if node.op == "call_module"}
    return called | {used.target for node in chunk for used in node.all_input_nodes if used.op == "get_attr"}


def pieces(graph: fx.Graph, rewritten: Sequence[str], modules: dict[str, nn.Module]) -> list[Piece]:
    """Cut ``graph`` where one activation is live, then join each cut-free chunk to the piece before it
    unless both hold rewritten layers: every piece with rewritten layers reaches up to the next one
    (the stem joins the first piece, the tail after the last rewritten layer joins the last, whose
    output is the graph's). A rewritten layer called in more than one piece (a shared module) is
    not listed in any (nor trained: see ``Piece.shared``)."""
    nodes = [node for node in graph.nodes if node.op != "output"]
    output = next(node for node in graph.nodes if node.op == "output")
    names = set(rewritten)
    sizes = _live_sizes(graph, nodes)
    placeholders = [node for node in nodes if node.op == "placeholder"]
    minimal: list[list[fx.Node]] = [[]]
    for node, size in zip(nodes, sizes):
        if node.op == "placeholder":
            continue
        minimal[-1].append(node)
        if size == 1 and node.op != "get_attr":
            minimal.append([])

    def has_rewritten(chunk: list[fx.Node]) -> bool:
        return any(node.op == "call_module" and node.target in names for node in chunk)

    joined: list[list[fx.Node]] = []
    for chunk in minimal:
        if joined and not (has_rewritten(chunk) and has_rewritten(joined[-1])):
            joined[-1].extend(chunk)
        else:
            joined.append(list(chunk))
    calls: dict[str, int] = {}
    for chunk in joined:
        for target in _reads(chunk):
            calls[target] = calls.get(target, 0) + 1
    result, inputs = [], placeholders
    for index, chunk in enumerate(joined):
        last = index == len(joined) - 1
        if not chunk and not last:
            continue
        targets = [node.target for node in chunk if node.op == "call_module" and node.target in names and calls[node.target] == 1]
        shared = frozenset(target for target in _reads(chunk) if calls[target] > 1)
        mutates = any(walk.may_mutate(node, modules) for node in chunk if node.op in ("call_function", "call_method", "call_module"))
        result.append(Piece(chunk, inputs, output.args[0] if last else chunk[-1], list(dict.fromkeys(targets)), shared, mutates))
        if chunk:
            inputs = [chunk[-1]]
    return result


def _piece_module(piece: Piece, root: nn.Module) -> fx.GraphModule:
    """``piece`` as a module of its own over ``root``'s submodules and attributes (shared, not copied)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    owners: dict[str, object] = {}

    def lookup(node: fx.Node) -> fx.Node:
        if node not in env and node.op == "get_attr":  # constants are copied into every piece that reads them
            env[node] = graph.get_attr(node.target)
            owners[node.target] = tree.get_attribute(root, node.target)
        return env[node]

    for node in piece.inputs:
        env[node] = graph.node_copy(node) if node.op == "placeholder" else graph.placeholder(node.name)
    for node in piece.nodes:
        if node.op == "get_attr":
            lookup(node)
            continue
        env[node] = graph.node_copy(node, lookup)
        if node.op == "call_module":
            owners[node.target] = tree.get_submodule(root, node.target)
    graph.output(fx.map_arg(piece.output, lookup))
    return fx.GraphModule(owners, graph)


def _leaves(value) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]


def _squared(outputs, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared error of ``outputs`` against ``targets`` and the targets' energy, over their float leaves."""
    pairs = list(zip(_leaves(outputs), _leaves(targets)))
    error = sum((((out - target) ** 2).sum() for out, target in pairs), torch.zeros(()))
    energy = sum(((target.detach() ** 2).sum() for _, target in pairs), torch.zeros(()))
    return error, energy


def _relative_error(outputs, targets) -> torch.Tensor:
    error, energy = _squared(outputs, targets)
    return error / energy.clamp_min(1e-30)


def _fed(values: tuple, copy: bool) -> tuple:
    return tuple(pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, values)) if copy else values


def _error_on(module: nn.Module, inputs: list, targets: list, copy: bool) -> float:
    """Relative squared error of ``module`` over every calibration batch."""
    error = energy = 0.0
    with torch.no_grad():
        for values, target in zip(inputs, targets):
            batch_error, batch_energy = _squared(module(*_fed(values, copy)), target)
            error, energy = error + float(batch_error), energy + float(batch_energy)
    return error / max(energy, 1e-30)


#: What :func:`reconstruct_` trains in a piece: every parameter (``all``), or the rewritten layers'
#: factors with (``factors_and_norms``) or without (``factors``) the normalization layers' affine ones.
TRAIN = ("all", "factors_and_norms", "factors")


def _trainable(piece_module: fx.GraphModule, piece: Piece, train: str) -> list[nn.Parameter]:
    if train not in TRAIN:
        raise ValueError(f"train must be one of {', '.join(TRAIN)}; got {train!r}")
    if train == "all":
        named = list(tree.named_parameters(piece_module))
    else:
        modules = [(name, piece_module.get_submodule(name)) for name in piece.rewritten]
        if train == "factors_and_norms":
            modules += [(name, m) for name, m in tree.named_modules(piece_module) if isinstance(m, _NORMS)]
        named = [(f"{name}.{key}", p) for name, module in modules for key, p in tree.named_parameters(module)]
    parameters = {
        id(p): p for name, p in named
        if p.is_floating_point() and not any(name == s or name.startswith(s + ".") for s in piece.shared)
    }
    return list(parameters.values())


def _train_(
    module: nn.Module, parameters: list[nn.Parameter], inputs: list, targets: list, steps: int, lr: float, seed: int, copy: bool
) -> None:
    trained = {id(p) for p in parameters}
    flags = {p: p.requires_grad for p in tree.parameters(module)}  # put back as they were afterwards
    for parameter in flags:
        parameter.requires_grad_(id(parameter) in trained)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    try:
        for _ in range(steps):
            if not order:
                order = torch.randperm(len(inputs), generator=generator).tolist()
            index = order.pop()
            loss = _relative_error(module(*_fed(inputs[index], copy)), targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    finally:
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
            parameter.grad = None


def reconstruct_(
    original: fx.GraphModule,
    compressed: fx.GraphModule,
    cut: Sequence[Piece],
    calibration: Sequence[torch.Tensor],
    steps: int,
    lr: float,
    train: str = "all",
    seed: int = 0,
    started: Callable[[str], None] = lambda end: None,
) -> list[dict]:
    """Train ``compressed`` piece by piece, in place (``train``: what, see :data:`TRAIN`); one record a
    piece with rewritten layers.

    ``cut`` is :func:`pieces` of ``original``'s graph, which ``compressed`` must share (a copy of
    ``original`` with the stacks swapped in under the conv names, not yet inlined); both are called
    with one calibration batch each, in eval mode; ``original`` is not changed. Each record: the piece's last node,
    its rewritten layers, its relative squared output error before and after, and its seconds.
    """
    records = []
    parameter = tree.first_parameter(original)
    if parameter is not None:  # as the refit does: batches in the model's dtype and device
        calibration = [batch.to(device=parameter.device, dtype=parameter.dtype) for batch in calibration]
    modes = {module: module.training for module in tree.modules(compressed)}
    tree.set_training_(compressed, False)
    original_values: list = [(batch,) for batch in calibration]
    compressed_values: list = original_values
    for number, piece in enumerate(cut):
        clock = time.perf_counter()
        reference, working = _piece_module(piece, original), _piece_module(piece, compressed)
        with torch.no_grad():
            targets = [reference(*_fed(values, piece.mutates)) for values in original_values]
        record: dict = {"end": piece.end, "layers": piece.rewritten}
        if piece.rewritten:  # a piece without any only carries both networks' values on
            started(piece.end)
            parameters = _trainable(working, piece, train)
            before = _error_on(working, compressed_values, targets, piece.mutates)
            kept = tree.snapshot(working)
            _train_(working, parameters, compressed_values, targets, steps, lr, seed + number, piece.mutates)
            after = _error_on(working, compressed_values, targets, piece.mutates)
            if not after < before:  # also when training diverged to NaN
                tree.restore_(working, kept)
                after = before
            record.update(error_before=before, error_after=after)
        agree = compressed_values is original_values and not piece.rewritten
        original_values = [(target,) for target in targets]
        if agree:
            compressed_values = original_values
        else:
            with torch.no_grad():
                compressed_values = [(working(*_fed(values, piece.mutates)),) for values in compressed_values]
        if piece.rewritten:
            record["seconds"] = time.perf_counter() - clock
            records.append(record)
    for module, training in modes.items():
        module.training = training
    return records
