"""One pass of the calibration data through the original and the compressed network, side by side.

:func:`walk_` runs a traced ``GraphModule`` node by node, in the graph's (topological, which for a
traced forward is also execution) order, each node over every calibration batch before the next
node. It carries two environments: every live node's activations in the *original* network and in
the network *compressed so far*. When it reaches a conv named in ``visit``, it hands the callback
that conv's original outputs (or block targets) and compressed-network inputs (per batch); the callback returns the
module that replaces the conv in the compressed network (a refitted factor stack, or the conv
itself), and the walk continues with that module's outputs. Every module therefore runs at most
twice per batch (once per network, once for both while the networks still agree), so the forward
work is linear in depth, where re-running both networks from the input for every layer was
quadratic.

The compressed network the callback sees is exactly what a copy of the model with every earlier
visited conv swapped for its replacement would compute: same modules, same order, same batches.

Memory: an activation is freed after its last user has run, so what is held is the live
activations of both networks (one copy while they agree) for the whole calibration set, plus what
the callback keeps (the visited conv's outputs and inputs). For a CIFAR ResNet at 512 images that
is tens of MB; for an ImageNet ResNet-50 at 224x224, several GB per 512 images in float32 (a layer1
block input, 256x56x56, is 1.6 GB in each network). The calibration set is not chunked: a layer's
refit needs all of the set before the walk may go on, so chunking would not lower the peak. Instead,
once the held float32 activations pass ``max_bytes``, every held and later activation is *stored*
in float16 (computed in float32, rounded to 2^-11 relative when stored; a tensor float16 cannot
hold stays float32, as do the inputs of a node that writes into them while a later node reads them;
a graph that writes through a view, ``x[:, :2].zero_()``, stays float32 throughout, with a warning),
which halves what is held; ``spilled`` is told at which node that happened. The limit is checked as
each batch's output is kept, and held lists are converted one at a time, so the float32 held passes
it by at most one batch and one list; a visited conv's refit reads its inputs and outputs back one
batch at a time.

What the walk cannot serve, :func:`supports` says (and the caller falls back to re-running the
networks per layer): a model FX could not trace, a visited conv called more than once (its refit
would need inputs that only exist after the walk has passed it), or extra inputs without defaults.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Sequence

import torch
from torch import fx, nn

from compressor import tree

log = logging.getLogger(__name__)

Visit = Callable[[str, Sequence[torch.Tensor], Sequence[torch.Tensor]], nn.Module]
"""``(conv name, target outputs per batch, compressed-network inputs per batch) -> module`` that
runs in the compressed network from here on. The targets are the conv's outputs in the original
network (or, with ``block_targets``, what makes a residual sum match: see :func:`walk_`). The
sequences may be read any number of times."""


def supports(module: nn.Module, names: Sequence[str]) -> str | None:
    """``None`` when :func:`walk_` can visit ``names`` in ``module``; otherwise why not."""
    if not isinstance(module, fx.GraphModule):
        return "the model was not traced by torch.fx"
    modules = dict(module.named_modules(remove_duplicate=False))
    calls: dict[int, int] = {id(modules[name]): 0 for name in names}
    placeholders = 0
    for node in module.graph.nodes:
        if node.op == "call_module" and id(modules[node.target]) in calls:
            calls[id(modules[node.target])] += 1
        if node.op == "placeholder":
            placeholders += 1
            if placeholders > 1 and not node.args:
                return f"the forward takes a second input ({node.target}) without a default"
    repeated = [name for name in names if calls[id(modules[name])] != 1]
    if repeated:
        return f"{repeated[0]} is called {calls[id(modules[repeated[0]])]} times in the graph"
    return None


def last_uses(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """For each node, the nodes whose activations can be freed once it has run."""
    last_user: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        for used in node.all_input_nodes:
            last_user[used] = node
    freed: dict[fx.Node, list[fx.Node]] = {}
    for used, user in last_user.items():
        freed.setdefault(user, []).append(used)
    return freed


def _run(node: fx.Node, modules: dict[str, nn.Module], args: tuple, kwargs: dict, replaced: dict[str, nn.Module]):
    if node.op == "call_module":
        return replaced.get(node.target, modules[node.target])(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    raise ValueError(f"unexpected node op {node.op!r}")


class _Half:
    """A float32 activation stored in float16 to bound the walk's memory; :func:`_read` restores it."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor.to(torch.float16)


def _read(value):
    return value.tensor.to(torch.float32) if isinstance(value, _Half) else value


class _Restored(Sequence):
    """A held list read back value by value (float32 for a :class:`_Half`), so a visited conv's
    inputs and outputs never exist as full float32 copies while float16 is stored."""

    def __init__(self, values: list):
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index):
        return _read(self.values[index])


def _same(value):
    return value


def _stored(value):
    """``value`` as a :class:`_Half` when it is a float32 tensor that float16 can hold (no overflow)."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
        return value
    half = _Half(value)
    return half if bool(torch.isfinite(half.tensor).all()) or not bool(torch.isfinite(value).all()) else value


def _held_bytes(*environments: dict) -> int:
    """Bytes of the node outputs held (placeholders and attributes belong to the caller)."""
    seen, total = set(), 0
    for environment in environments:
        for node, values in environment.items():
            if node.op in ("placeholder", "get_attr") or id(values) in seen:
                continue
            seen.add(id(values))
            for value in values:
                tensor = value.tensor if isinstance(value, _Half) else value
                total += tensor.nbytes if isinstance(tensor, torch.Tensor) else 0
    return total


def _store_(original: dict, compressed: dict, store: Callable, nodes=None) -> int:
    """Apply ``store`` to the held outputs of ``nodes`` (default: every node output), list by list, each
    list replaced in both networks before the next is converted (a list both share is one list);
    returns how many values it changed."""
    changed = 0
    for node in list(original.keys() | compressed.keys()):
        if node.op in ("placeholder", "get_attr") or (nodes is not None and node not in nodes):
            continue
        lists = {id(values): values for values in (original.get(node), compressed.get(node)) if values is not None}
        for values in lists.values():
            stored = [store(value) for value in values]
            changed += sum(new is not old for new, old in zip(stored, values))
            for environment in (original, compressed):
                if environment.get(node) is values:
                    environment[node] = stored
            del stored
    return changed


_VIEW_METHODS = {
    "view", "view_as", "reshape", "narrow", "select", "transpose", "permute", "expand", "expand_as", "squeeze",
    "unsqueeze", "flatten", "unflatten", "chunk", "split", "unbind", "t", "diagonal", "movedim", "as_strided",
}
_VIEW_FUNCTIONS = {
    operator.getitem, torch.reshape, torch.narrow, torch.select, torch.transpose, torch.permute, torch.squeeze,
    torch.unsqueeze, torch.flatten, torch.chunk, torch.split, torch.unbind, torch.t, torch.diagonal, torch.movedim,
}


def _writes_through_a_view(graph: fx.Graph, modules: dict[str, nn.Module]) -> fx.Node | None:
    """A node that writes into the output of a view op (``x[:, :2].zero_()``), if any. The write
    reaches the viewed tensor only while both are held as the same float32 storage, so such a graph
    keeps float32 storage."""
    for node in graph.nodes:
        if node.op in ("call_function", "call_method", "call_module") and may_mutate(node, modules):
            written = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            if written is not None and (
                (written.op == "call_function" and written.target in _VIEW_FUNCTIONS)
                or (written.op == "call_method" and written.target in _VIEW_METHODS)
            ):
                return node
    return None


_ADDS = {operator.add, operator.iadd, torch.add}


def _is_add(node: fx.Node) -> bool:
    if node.kwargs or len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return False
    return (node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method" and node.target in ("add", "add_"))


def _residual_partner(conv: fx.Node, modules: dict[str, nn.Module]) -> tuple[torch.Tensor | None, fx.Node] | None:
    """``(a, s)`` when ``conv``'s output ``y`` reaches an addition only through a per-channel affine map
    (an eval-mode BatchNorm, ``a * y + b``, or nothing: ``a`` is ``None``), the other operand being ``s``."""
    scale, current = None, conv
    users = list(current.users)
    if len(users) != 1:
        return None
    user = users[0]
    if user.op == "call_module" and isinstance(modules[user.target], nn.BatchNorm2d):
        norm = modules[user.target]
        if norm.training or norm.running_var is None or len(user.users) != 1:
            return None
        scale = torch.rsqrt(norm.running_var.detach().float() + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight.detach().float()
        current, user = user, next(iter(user.users))
    if not _is_add(user) or user.args[0] is user.args[1]:
        return None
    return scale, (user.args[1] if user.args[0] is current else user.args[0])


def _ahead(
    partner: fx.Node, conv: fx.Node, env: dict, modules: dict[str, nn.Module], visited: set, order: dict[fx.Node, int]
) -> list[fx.Node] | None:
    """The not-yet-evaluated nodes ``partner`` needs, in graph order, when they can run before ``conv``'s
    users: none of them reads ``conv``, is a visited conv, or writes into an input. ``None`` otherwise."""
    needed, stack = {}, [partner]
    while stack:
        node = stack.pop()
        if node in env or node in needed:
            continue
        if node is conv or node.op in ("placeholder", "output") or may_mutate(node, modules):
            return None
        if node.op == "call_module" and id(modules[node.target]) in visited:
            return None
        needed[node] = None
        stack.extend(node.all_input_nodes)
    ahead = sorted(needed, key=order.__getitem__)
    if ahead:
        # A node between the conv and these that writes into a tensor would be passed over: they
        # would read it before the write.
        between = [node for node in conv.graph.nodes if order[conv] < order[node] < order[ahead[-1]] and node not in needed]
        if any(may_mutate(node, modules) for node in between if node.op != "output"):
            return None
    return ahead


class _BlockTargets(Sequence):
    """What a conv must output for the residual sum it feeds to match the original's, batch by batch:
    ``y + (s_original - s_compressed) / a`` (channels whose ``|a|`` is under 1e-3 of the median keep ``y``)."""

    def __init__(self, outputs: list, original: list, compressed: list, scale: torch.Tensor | None):
        self.outputs, self.original, self.compressed = outputs, original, compressed
        if scale is None:
            self.inverse = None
        else:
            # A zero or tiny scale (a zero-initialized or pruned BatchNorm channel) would ask the conv for
            # an unbounded output: such channels keep the plain target.
            usable = torch.isfinite(scale) & (scale.abs() > 0) & (scale.abs() >= 1e-3 * scale.abs().median())
            self.inverse = torch.where(usable, 1 / torch.where(usable, scale, torch.ones_like(scale)), torch.zeros_like(scale))

    def __len__(self) -> int:
        return len(self.outputs)

    def __getitem__(self, index):
        y = _read(self.outputs[index])
        delta = _read(self.original[index]) - _read(self.compressed[index])
        if self.inverse is not None:
            delta = delta * self.inverse.to(delta).view(1, -1, *([1] * (delta.dim() - 2)))
        return y + delta


def walk_(
    module: fx.GraphModule,
    batches: Sequence[torch.Tensor],
    visit: dict[str, Visit],
    max_bytes: int | None = None,
    spilled: Callable[[str, int], None] = lambda node, held: None,
    block_targets: bool = False,
) -> dict[str, nn.Module]:
    """Walk ``batches`` through ``module`` once; return the replacement each visited conv got.

    ``visit`` maps conv names (as in ``module.named_modules()``) to their callbacks, which run in
    graph order. ``module`` itself is not changed. Check :func:`supports` first. Past ``max_bytes``
    of held activations, they are stored in float16 from then on, and ``spilled(node name, bytes
    held when it happened)`` is called once.

    With ``block_targets``, a visited conv whose output reaches a residual addition only through a
    per-channel affine map (an eval-mode BatchNorm) is handed, instead of its original outputs, what it
    must output for the *sum* to match the original network's: ``y + (s - s') / a``, with ``s`` and
    ``s'`` the other operand in the original and the compressed network and ``a`` the BatchNorm's
    scale. The shortcut carries every upstream layer's error uncorrected; fitting the branch to absorb
    it is the block-output reconstruction of layer-wise schemes such as BRECQ (Li et al., ICLR 2021),
    kept linear here. The other operand is evaluated early when it does not depend on the conv (a
    shortcut computed after the branch in graph order); when it cannot be (it holds a visited conv or
    an in-place op), the conv gets its original outputs.
    """
    modules = dict(module.named_modules(remove_duplicate=False))
    by_module = {id(modules[name]): name for name in visit}
    replaced: dict[str, nn.Module] = {}  # by node target (the name the graph calls the conv by)
    chosen: dict[str, nn.Module] = {}
    original: dict[fx.Node, list] = {}
    compressed: dict[fx.Node, list] = {}
    freed = last_uses(module.graph)
    order = {node: index for index, node in enumerate(module.graph.nodes)}
    inputs_seen = 0
    unsafe = _writes_through_a_view(module.graph, modules) if max_bytes is not None else None
    storage = _Storage(max_bytes, unsafe)
    evaluated_ahead: set[fx.Node] = set()

    def held_constant(node: fx.Node) -> list:
        return [tree.get_attribute(module, node.target)] * len(batches)

    def block_targets_of(node: fx.Node) -> _BlockTargets | None:
        """``node``'s block targets, evaluating the sum's other operand early if it must be; ``None``
        when the conv does not feed a sum that way or the operand cannot run yet."""
        partner = _residual_partner(node, modules)
        if partner is None:
            return None
        scale, other = partner
        needed = _ahead(other, node, original, modules, set(by_module), order)
        if needed is None:
            return None
        for ahead in needed:
            if ahead.op == "get_attr":
                original[ahead] = compressed[ahead] = held_constant(ahead)
            else:
                _evaluate(ahead, modules, original, compressed, replaced, len(batches), keep=storage.keep)
            evaluated_ahead.add(ahead)
        if original[other] is compressed[other] or not all(
            isinstance(o, (torch.Tensor, _Half)) and _read(o).shape == _read(y).shape for o, y in zip(original[other], original[node])
        ):
            return None
        return _BlockTargets(original[node], original[other], compressed[other], scale)

    with torch.no_grad():
        for node in module.graph.nodes:
            if node.op == "output":
                break
            if node in evaluated_ahead:
                pass
            elif node.op == "placeholder":
                inputs_seen += 1
                value = list(batches) if inputs_seen == 1 else [node.args[0]] * len(batches)
                original[node] = compressed[node] = value
            elif node.op == "get_attr":
                original[node] = compressed[node] = held_constant(node)
            else:
                name = by_module.get(id(modules[node.target])) if node.op == "call_module" else None
                if storage.half and may_mutate(node, modules):
                    # It writes into an input: an input read later must be the held tensor, not a
                    # float32 copy of it. An input nothing reads afterwards can stay float16.
                    read_later = {n for n in node.all_input_nodes if any(u is not node and order[u] > order[node] for u in n.users)}
                    _store_(original, compressed, _read, read_later)
                # A visited conv's inputs are read again by its refit, after this.
                release = [n for n in freed.get(node, ()) if n.op not in ("placeholder", "get_attr")] if name is None else []
                _evaluate(
                    node, modules, original, compressed, replaced, len(batches), both=name is None, keep=storage.keep, release=release
                )
                if name is not None:
                    hidden = _Restored([fx.node.map_arg(node.args, lambda n: compressed[n][b])[0] for b in range(len(batches))])
                    targets = block_targets_of(node) if block_targets else None
                    if targets is None:
                        targets = _Restored(original[node])
                    chosen[name] = replaced[node.target] = visit[name](name, targets, hidden)
                    compressed[node] = [storage.keep(chosen[name](x)) for x in hidden]
                    del hidden, targets  # they hold lists the environments may replace or free
            for done in freed.get(node, ()):
                original.pop(done, None)
                compressed.pop(done, None)
            storage.settle_(node, original, compressed, spilled)
    return chosen


class _Storage:
    """How the walk holds activations: as computed until they would pass ``max_bytes``, then every held
    and later float32 activation in float16. The limit is checked as each output is kept, batch by
    batch, so the float32 held never passes it by more than one batch's output; checked only after a
    node (ResNet-50 at 224, 512 images), the node's two 1.6 GB outputs came on top of the limit."""

    def __init__(self, max_bytes: int | None, unsafe: fx.Node | None):
        self.max_bytes, self.unsafe = max_bytes, unsafe
        self.half = self.warned = False
        self.held = 0
        self._switched_at: int | None = None

    def keep(self, value):
        if self.half:
            return _stored(value)
        if self.max_bytes is None or self.warned or not isinstance(value, torch.Tensor):
            return value
        self.held += value.nbytes
        if self.held <= self.max_bytes:
            return value
        if self.unsafe is not None:
            self.warned = True
            log.warning(
                "refit: the calibration activations hold %.1f GiB, over the limit, but %s writes through a view, "
                "so they stay float32", self.held / 2**30, self.unsafe.name,
            )
            return value
        self.half, self._switched_at = True, self.held
        return _stored(value)

    def settle_(self, node: fx.Node, original: dict, compressed: dict, spilled: Callable[[str, int], None]) -> None:
        """After ``node``: recount what is held (outputs were freed), and if the limit was passed while
        ``node`` ran, store every held activation in float16 and tell ``spilled``."""
        if self._switched_at is not None:
            _store_(original, compressed, _stored)
            spilled(node.name, self._switched_at)
            self._switched_at = None
        elif self.max_bytes is not None and not self.half and not self.warned:
            self.held = _held_bytes(original, compressed)


_INPLACE_FUNCTIONS = {
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift, operator.imatmul,
}


def may_mutate(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` may write into an input (``x += y``, ``relu_``, ``inplace=True``)."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_module":
        return getattr(modules[node.target], "inplace", False) is True
    if node.op == "call_method":
        return node.target.endswith("_")
    return node.target in _INPLACE_FUNCTIONS or getattr(node.target, "__name__", "").endswith("_")


def _evaluate(
    node, modules, original, compressed, replaced, count: int, *, both: bool = True, keep: Callable = _same, release=()
) -> None:
    """Run ``node`` on every batch in the original network and, if ``both``, the compressed one;
    once for both while all its inputs are the same tensors in both. Each output is held as
    ``keep(output)`` (:func:`_stored` once the walk stores float16). ``release``: inputs nothing reads
    after this node; each of their batches is dropped as soon as both networks have read it, so a
    node's inputs and outputs are not all held at once (ResNet-50 at 224, 512 images: a layer1 add's
    float16 inputs and output, in both networks, are 4.9 GB; with this, at most 3.3 GB and a batch)."""
    inputs = node.all_input_nodes
    same = all(original[n] is compressed[n] for n in inputs) and node.target not in replaced
    run_compressed = both and not same
    shared = [n for n in inputs if original[n] is compressed[n]]
    # A node that writes into an input must not write into a tensor the other network still reads.
    private = run_compressed and shared and may_mutate(node, modules)
    originals, compresseds = [], []
    for b in range(count):
        # (a stored _Half is read into a fresh tensor anyway)
        copies = {n: original[n][b].clone() for n in shared if isinstance(original[n][b], torch.Tensor)} if private else {}
        args = fx.node.map_arg(node.args, lambda n: _read(original[n][b]))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: _read(original[n][b]))
        originals.append(keep(_run(node, modules, args, kwargs, {})))
        if run_compressed:
            args = fx.node.map_arg(node.args, lambda n: copies[n] if n in copies else _read(compressed[n][b]))
            kwargs = fx.node.map_arg(node.kwargs, lambda n: copies[n] if n in copies else _read(compressed[n][b]))
            compresseds.append(keep(_run(node, modules, args, kwargs, replaced)))
        for n in release:
            original[n][b] = compressed[n][b] = None
    original[node] = originals
    if same and both:
        compressed[node] = originals
    elif run_compressed:
        compressed[node] = compresseds
