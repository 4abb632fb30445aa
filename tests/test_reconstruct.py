"""Block reconstruction (compressor.reconstruct): where the graph is cut, and that training each piece
lowers its output error without touching the original."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

from compressor import compress, reconstruct, tree, zoo, zoo_unet
from compressor.methods import METHODS, factorize
from compressor.passes import swap_


def _traced_resnet(width: int = 4) -> fx.GraphModule:
    torch.manual_seed(0)
    return fx.symbolic_trace(zoo.randomize_batchnorm(zoo.resnet20_cifar(width=width)).eval())


def _stacks(model: fx.GraphModule, fraction: float = 1 / 3) -> dict[str, nn.Sequential]:
    """Every body conv of ``model`` as a grouped (Tucker-2) stack at ``fraction`` of its full rank."""
    method = METHODS["grouped"]
    stacks = {}
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d) and name.startswith("layer"):
            rank = max(1, int(method.full_rank(conv, 1) * fraction))
            stacks[name] = factorize(method, conv, rank, 1)[0]
    return stacks


def _batches(count: int = 3, size: int = 8) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randn(size, 3, 16, 16, generator=generator) for _ in range(count)]


def _covered(model: fx.GraphModule, pieces: list[reconstruct.Piece]) -> None:
    """Every computing node is in exactly one piece, in graph order, and each piece after the first
    reads only its own nodes, the previous piece's last node and constants."""
    computing = [n for n in model.graph.nodes if n.op not in ("placeholder", "output")]
    in_pieces = [n for piece in pieces for n in piece.nodes]
    assert in_pieces == computing, f"pieces hold {len(in_pieces)} nodes, the graph computes {len(computing)}"
    for previous, piece in zip(pieces, pieces[1:]):
        own = set(piece.nodes) | {previous.nodes[-1]}
        outside = [n.name for node in piece.nodes for n in node.all_input_nodes if n not in own and n.op != "get_attr"]
        assert not outside, f"piece ending at {piece.end} reads {outside} from before its input"


def test_a_resnet_is_cut_after_every_block():
    model = _traced_resnet()
    stacks = _stacks(model)
    pieces = reconstruct.pieces(model.graph, list(stacks), dict(model.named_modules()))
    _covered(model, pieces)
    layers = [piece.rewritten for piece in pieces]
    expected = [[f"layer{s}.{b}.conv1", f"layer{s}.{b}.conv2"] for s in (1, 2, 3) for b in range(3)]
    assert layers == expected, f"pieces hold {layers}"
    assert pieces[0].inputs[0].op == "placeholder" and pieces[0].nodes[0].target == "conv1", "the stem joins the first block"
    assert pieces[-1].nodes[-1].target == "linear", f"the tail joins the last block; it ends at {pieces[-1].end}"


def test_a_plain_chain_gives_each_rewritten_conv_what_follows_it():
    chain = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
    )
    model = fx.symbolic_trace(chain)
    pieces = reconstruct.pieces(model.graph, ["3", "6"], dict(model.named_modules()))
    _covered(model, pieces)
    shapes = [([n.target for n in piece.nodes], piece.rewritten) for piece in pieces]
    assert shapes == [(["0", "1", "2", "3", "4", "5"], ["3"]), (["6", "7", "8"], ["6"])], f"pieces: {shapes}"


def test_a_unet_keeps_each_skip_inside_one_piece():
    model = fx.symbolic_trace(zoo_unet.unet(num_classes=3, width=4).eval())
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels >= 4]
    pieces = reconstruct.pieces(model.graph, convs, dict(model.named_modules()))
    _covered(model, pieces)
    placed = [name for piece in pieces for name in piece.rewritten]
    assert sorted(placed) == sorted(convs), f"rewritten layers placed {len(placed)} times for {len(convs)} convs"


class _TwoHeads(nn.Module):
    """An early output beside a deeper one (a detector's heads), and a conv called in two blocks."""

    def __init__(self):
        super().__init__()
        self.first, self.second, self.third = (nn.Conv2d(c, 6, 3, padding=1) for c in (3, 6, 6))
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        early = torch.relu(self.second(torch.relu(self.third(torch.relu(self.first(x))))))
        return self.head(early), torch.relu(self.third(early))


def _chained(model: fx.GraphModule, pieces: list[reconstruct.Piece], batch: torch.Tensor):
    value = (batch,)
    with torch.no_grad():
        for piece in pieces:
            value = (reconstruct._piece_module(piece, model)(*value),)
    return value[0]


def test_the_pieces_chained_compute_the_model():
    model = _traced_resnet()
    batch = _batches(1)[0]
    chained = _chained(model, reconstruct.pieces(model.graph, list(_stacks(model)), dict(model.named_modules())), batch)
    with torch.no_grad():
        expected = model(batch)
    error = float((chained - expected).norm() / expected.norm())
    assert error < 1e-6, f"the chained pieces differ from the model by {error:.2e} (relative)"


def test_an_early_output_stays_live_and_a_shared_conv_is_not_trained():
    model = fx.symbolic_trace(_TwoHeads())
    pieces = reconstruct.pieces(model.graph, ["first", "second", "third", "head"], dict(model.named_modules()))
    _covered(model, pieces)
    placed = [name for piece in pieces for name in piece.rewritten]
    assert sorted(placed) == ["first", "head", "second"], f"trained layers: {placed}"
    assert [sorted(p.shared) for p in pieces] == [[], ["third"], [], ["third"]], [(p.end, p.shared) for p in pieces]
    batch = torch.randn(2, 3, 8, 8)
    chained, expected = _chained(model, pieces, batch), model(batch)
    assert all(torch.equal(a, b) for a, b in zip(chained, expected)), "the chained pieces lost an output"
    working = copy.deepcopy(model)
    with torch.no_grad():
        for name in ("first", "second", "head"):
            working.get_submodule(name).weight.mul_(1.2)
    records = reconstruct.reconstruct_(model, working, pieces, [batch], 5, 1e-2, "all")
    assert [r["layers"] for r in records] == [["first"], ["second"], ["head"]], records
    assert torch.equal(working.third.weight, model.third.weight), "the conv two pieces call was trained"
    assert not torch.equal(working.second.weight, model.second.weight * 1.2), "a piece's own conv was not trained"


class _WritesItsInput(nn.Module):
    """A block that writes into its input in place after reading it (as an ``inplace=True`` op can)."""

    def __init__(self):
        super().__init__()
        self.first, self.second, self.third = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 1)

    def forward(self, x):
        held = torch.relu(self.first(x))
        shifted = held + 1.0  # its backward does not need ``held``, so the write below is legal
        held.mul_(0.5)
        return self.second(shifted) + self.third(held)


def test_a_piece_that_writes_into_its_input_is_fed_copies():
    torch.manual_seed(0)
    model = fx.symbolic_trace(_WritesItsInput())
    generator = torch.Generator().manual_seed(1)
    stacks = {name: copy.deepcopy(model.get_submodule(name)) for name in ("first", "second", "third")}
    for stack in stacks.values():
        with torch.no_grad():
            stack.weight.add_(0.3 * torch.randn(stack.weight.shape, generator=generator) * stack.weight.std())
    working = swap_(copy.deepcopy(model), stacks)
    batches = [torch.randn(4, 3, 8, 8, generator=generator) for _ in range(2)]
    kept = [b.clone() for b in batches]
    pieces = reconstruct.pieces(model.graph, list(stacks), dict(model.named_modules()))
    assert [p.mutates for p in pieces] == [False, True], [(p.end, p.mutates) for p in pieces]
    start = _output_error(model, working, batches)
    records = reconstruct.reconstruct_(model, working, pieces, batches, 40, 1e-2)
    end = _output_error(model, working, batches)
    assert all(torch.equal(a, b) for a, b in zip(batches, kept)), "the calibration batches were written"
    # Fed the held input itself, every step would halve it again and the training would be undone.
    written = records[-1]
    assert written["error_after"] < 0.5 * written["error_before"], f"the writing piece did not train: {written}"
    assert end < 0.5 * start, f"output error {start:.4f} -> {end:.4f}; records {records}"
    assert abs(records[-1]["error_after"] - end) < 1e-5 * max(end, 1e-12) + 1e-7, (records[-1], end)


def _reconstructed(train: str = "all", steps: int = 30, lr: float = 1e-2):
    model = _traced_resnet()
    stacks = _stacks(model)
    working = swap_(copy.deepcopy(model), stacks)
    batches = _batches()
    before_state = tree.snapshot(model)
    with torch.no_grad():
        before = [working(b) for b in batches]
    records = reconstruct.reconstruct_(model, working, reconstruct.pieces(model.graph, list(stacks), dict(model.named_modules())), batches, steps, lr, train)
    return model, working, batches, before_state, before, records


def _output_error(model, working, batches, outputs=None) -> float:
    with torch.no_grad():
        outputs = outputs or [working(b) for b in batches]
        targets = [model(b) for b in batches]
    return float(sum(((o - t) ** 2).sum() for o, t in zip(outputs, targets)) / sum((t**2).sum() for t in targets))


def test_reconstruction_lowers_every_piece_and_the_output_error():
    model, working, batches, original_state, before, records = _reconstructed()
    assert len(records) == 9, f"{len(records)} records for nine blocks"
    risen = [(r["end"], r["error_before"], r["error_after"]) for r in records if r["error_after"] > r["error_before"]]
    assert not risen, f"pieces whose error rose: {risen}"
    lowered = [r["error_after"] / r["error_before"] for r in records]
    assert max(lowered) < 0.97, f"a piece kept {max(lowered):.3f} of its error after 30 steps; ratios {lowered}"
    start, end = _output_error(model, working, batches, before), _output_error(model, working, batches)
    assert end < 0.9 * start, f"output error {start:.4f} -> {end:.4f}"
    changed = [name for name, tensor in tree.snapshot(model).items() if not torch.equal(tensor, original_state[name])]
    assert not changed, f"the original changed: {changed[:3]}"
    flags = {name for name, p in working.named_parameters() if not p.requires_grad or p.grad is not None}
    assert not flags, f"parameters left frozen or holding gradients: {sorted(flags)[:3]}"


@pytest.mark.parametrize("train", reconstruct.TRAIN)
def test_each_setting_trains_what_it_names(train):
    model, working, *_, records = _reconstructed(train=train, steps=5, lr=1e-3)  # small steps: none undone
    assert all(r["error_after"] < r["error_before"] for r in records), records
    norm_names = [n for n, m in working.named_modules() if isinstance(m, nn.BatchNorm2d)]
    kept_names = ["conv1", "linear"]  # the stem (in the first piece) and the classifier (in the last)

    def moved(names):
        return [n for n in names if not torch.equal(working.get_submodule(n).weight, model.get_submodule(n).weight)]

    running = [n for n in norm_names if not torch.equal(working.get_submodule(n).running_mean, model.get_submodule(n).running_mean)]
    assert not running, f"running statistics changed: {running[:3]}"
    expected_norms = norm_names if train != "factors" else []
    expected_kept = kept_names if train == "all" else []
    assert (moved(norm_names), moved(kept_names)) == (expected_norms, expected_kept), f"train={train}"


def test_a_piece_whose_training_would_raise_its_error_is_restored(monkeypatch):
    def worsen(module, parameters, *args):
        with torch.no_grad():
            for parameter in parameters:
                parameter.mul_(3.0)

    monkeypatch.setattr(reconstruct, "_train_", worsen)
    model, working, batches, _, before, records = _reconstructed(steps=1)
    unchanged = [r["end"] for r in records if r["error_after"] != r["error_before"]]
    assert not unchanged, f"records whose error moved although every step was undone: {unchanged}"
    with torch.no_grad():
        drift = max(float((working(b) - o).abs().max()) for b, o in zip(batches, before))
    assert drift == 0.0, f"outputs moved by {drift:.2e} though every piece was restored"


def _recipe(**extra) -> dict:
    return {
        "rules": [{"match": "layer*", "method": "grouped", "rank": {"macs": 0.4}}],
        "calibration": {"samples": 16, "batch_size": 8}, **extra,
    }


def test_compress_reports_the_reconstruction():
    torch.manual_seed(0)
    model = zoo.randomize_batchnorm(zoo.resnet20_cifar(width=4)).eval()
    data = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    example = torch.zeros(1, 3, 16, 16)
    plain = compress(model, _recipe(), example, data=data, progress=False)
    rebuilt = compress(model, _recipe(reconstruct={"steps": 20, "lr": 1e-2}), example, data=data, progress=False)
    record = rebuilt.report["reconstruct"]
    assert [len(p["layers"]) for p in record["pieces"]] == [2] * 9, record
    assert rebuilt.report["seconds"]["reconstruct"] > 0, rebuilt.report["seconds"]
    assert "reconstruct" not in plain.report and "reconstruct" not in plain.report["seconds"]
    errors = [_output_error(model, result.model, data) for result in (plain, rebuilt)]
    assert errors[1] < errors[0], f"output error on the calibration data: refit {errors[0]:.4f}, reconstructed {errors[1]:.4f}"
    names = [n for n, m in rebuilt.model.named_modules() if isinstance(m, nn.Conv2d)]
    assert names == [n for n, m in plain.model.named_modules() if isinstance(m, nn.Conv2d)], "same rewrite, other layers"


@pytest.mark.parametrize(
    "extra, data, reason",
    [({"steps": 0}, True, "reconstruct.steps is 0"), ({"steps": 5}, False, "no --data")],
)
def test_compress_says_why_it_skipped_the_reconstruction(extra, data, reason):
    model = zoo.resnet20_cifar(width=4).eval()
    batches = [torch.randn(8, 3, 16, 16)] if data else None
    result = compress(model, _recipe(reconstruct=extra), torch.zeros(1, 3, 16, 16), data=batches, progress=False)
    assert reason in result.report["reconstruct"]["skipped"], result.report["reconstruct"]


def test_the_recipe_offers_what_reconstruct_trains():
    from typing import get_args

    from compressor.recipe import Reconstruct

    offered = get_args(Reconstruct.model_fields["train"].annotation)
    assert offered == reconstruct.TRAIN, f"recipe {offered} vs reconstruct.TRAIN {reconstruct.TRAIN}"
