"""The steps in order: recipe -> trace -> profile -> match -> (calibrate) -> ranks -> factorize
(-> refit) -> rewrite -> verify."""

from __future__ import annotations

import copy
import io
import json
import logging
import time
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compressor import export as onnx_export, tree
from compressor.allocate import assign_ranks, whitening_for
from compressor.batches import materialize
from compressor.calibrate import LayerStatistics, collect_statistics
from compressor.decompose import CPDegenerateError
from compressor.errors import CompressorError, ParityError, describe_error
from compressor.evaluate import evaluate
from compressor.task import Task, task_of
from compressor.exported import save_exported
from compressor.finetune import finetune, split_holdout
from compressor.methods import METHODS, factorize
from compressor.phases import peak_memory_mib, release_freed_memory, timed
from compressor.passes.sequential import as_sequential
from compressor.passes import LayerPlan, Traced, fold_computed_convs_, lift_functional_convs_, match_computed_convs, match_functional_convs, plan_layers, rewrite_, swap_, trace
from compressor.profile import LayerProfile, profile_model, totals
from compressor.progress import layers as layer_bar
from compressor.reconstruct import pieces as reconstruction_pieces, reconstruct_
from compressor.refit import refit_all_
from compressor.sensitivity import layer_sensitivities, sensitivity_batches
from compressor.ranks import allowed_ranks
from compressor.recipe import Recipe, load_recipe
from compressor.caveats import plan_caveats
from compressor.data import Dataset
from compressor.report import layer_record, planned_totals, render_plan, totals_record
from compressor.report_md import FILES as REPORT_MD_FILES, write_report_md
from compressor.bench import latency_step
from compressor.latency import latency_cost_for
from compressor.latency_target import hold_latency_target
from compressor.linear import linear_statistics
from compressor.layers import as_linear_stack, conv_view as layers_conv_view, portable as layers_portable
from compressor.quantize import INT8_FILE, int8_step

#: Written beside OUTPUT_FILES when the input model was a torch.export archive.
EXPORTED_PROGRAM_FILE = "compressed.pt2"
#: Every file a run may write (which ones depend on the recipe: report.json lists them as ``files``).
OUTPUT_FILES = ("compressed.pt", "original.onnx", "compressed.onnx", INT8_FILE, "report.json", *REPORT_MD_FILES)

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What :func:`compress` would do, computed without changing any weight."""

    traced: Traced
    layers: list[LayerPlan]
    profiles: dict[str, LayerProfile]
    recipe: Recipe
    #: Calibration batches (inputs only), when data was given.
    calibration: list[torch.Tensor] | None = field(default=None, repr=False)
    statistics: dict[str, LayerStatistics] = field(default_factory=dict, repr=False)
    #: The budget solver's record, under a recipe target.
    target: dict | None = None
    #: Wall time per phase (see :mod:`compressor.phases`), continued by compress() and Result.save().
    seconds: dict[str, float] = field(default_factory=dict)
    #: What the outputs are (the recipe's ``task:`` or detected), for the sensitivities, distillation and metrics.
    task: Task | None = field(default=None, repr=False)
    #: Set by the refit when its held activations passed ``calibration.activation_memory_gib`` and were
    #: stored in float16 from then on: where, and how much was held.
    refit_activations: dict | None = None

    @property
    def init(self) -> str:
        return "data" if self.calibration else "weights"

    def report(self) -> dict:
        report = {
            "graph": self.traced.graph,
            "trace_error": self.traced.trace_error,
            "init": self.init,
            "calibration_samples": sum(batch.shape[0] for batch in self.calibration or ()),
            "layers": [layer_record(layer) for layer in self.layers],
            "totals": planned_totals(totals(self.profiles), self.layers),
        }
        if self.target is not None:
            report["target"] = self.target
        if self.refit_activations is not None:
            report["refit_activations"] = self.refit_activations
        return report

    def __str__(self) -> str:
        """The table ``compress --dry-run`` prints (the dataclass repr stays for debugging)."""
        from rich.console import Console

        text = io.StringIO()
        render_plan(self.report(), Console(file=text, width=120, color_system=None))
        return text.getvalue().rstrip("\n")


def example_input_for(model: nn.Module, shape: Sequence[int]) -> torch.Tensor:
    """A seeded random input of ``shape`` in the model's parameter dtype and device."""
    parameter = tree.first_parameter(model)
    dtype = parameter.dtype if parameter is not None else torch.float32
    device = parameter.device if parameter is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    return torch.randn(tuple(shape), generator=generator).to(dtype=dtype, device=device)


def _profile(module: nn.Module, example_input: torch.Tensor) -> dict[str, LayerProfile]:
    entered: list[str] = []  # modules whose forward started and has not returned: the innermost failed

    def enter(name: str):
        def hook(*_) -> None:
            entered.append(name)

        return hook

    def leave(name: str):
        def hook(*_) -> None:  # must return None: a forward hook's return value replaces the output
            if entered and entered[-1] == name:
                entered.pop()

        return hook

    handles = []
    for name, child in tree.named_modules(module):
        if name:
            handles.append(child.register_forward_pre_hook(enter(name)))
            handles.append(child.register_forward_hook(leave(name)))
    try:
        return profile_model(module, example_input)
    except Exception as err:
        where = f" in {entered[-1]} ({type(tree.get_submodule(module, entered[-1])).__name__})" if entered else ""
        raise CompressorError(
            f"the model's forward failed{where} on an input of shape {tuple(example_input.shape)}: "
            f"{describe_error(err)} (set the input shape with --input-shape N,C,H,W)"
        ) from err
    finally:
        for handle in handles:
            handle.remove()


def _check_finite_weights(model: nn.Module) -> None:
    """Refuse NaN/inf parameters and buffers up front: every decomposition would fail on them, later and
    less clearly, and a model that computes NaN cannot be verified."""
    broken = []
    for name, tensor in [*tree.named_parameters(model), *tree.named_buffers(model)]:
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor.detach())).sum())
            if bad:
                broken.append(f"{name} ({bad} of {tensor.numel()})")
    if broken:
        more = f" and {len(broken) - 5} more" if len(broken) > 5 else ""
        raise CompressorError(f"the model's weights contain NaN or infinite values: {', '.join(broken[:5])}{more}")


def calibration_draw(data, seed: int):
    """What calibration reads its ``samples`` from: a random-access :class:`Dataset` (npz, image folder)
    in a pseudo-random order, so the draw spans the classes of a class-sorted file (the shared CIFAR-10
    training npz holds 2000 airplanes first: its first 512 images calibrated on one class and lost
    1.8 points more on held-out images at half the MACs). A callable's or iterable's own order is kept:
    shuffling would read all of it."""
    if isinstance(data, Dataset) and data.kind != "callable":
        return data.shuffled(seed)
    return data


def plan(
    model: nn.Module,
    recipe: Recipe | dict | str | Path,
    example_input: torch.Tensor,
    *,
    data: Iterable | None = None,
    progress: bool | None = None,
) -> Plan:
    """Trace a copy of ``model``, profile it and assign rules, methods and ranks. ``model`` is not modified.

    With ``data`` (calibration batches), the input statistics of every candidate layer are
    collected first, and spectral ranks (energy, vbmf) and the budget's errors are data-aware.
    ``progress``: a bar per layer-by-layer phase (default: when stderr is a terminal).
    """
    recipe = load_recipe(recipe)
    _check_finite_weights(model)
    seconds: dict[str, float] = {}
    with timed(seconds, "trace"):
        working = tree.set_training_(copy.deepcopy(model), False)
        # Before tracing: FX would trace through a computed-weight conv and never see a conv module.
        folded = fold_computed_convs_(working, match_computed_convs(working))
        traced = trace(working)
        lifted = lift_functional_convs_(traced.module, match_functional_convs(traced.module))
        profiles = _profile(traced.module, example_input)
        layers = plan_layers(traced.module, recipe, profiles)
        task = task_of(traced.module, example_input, recipe.task)
    for layer in layers:
        if layer.name in lifted:
            layer.add_note("lifted into an nn.Conv2d from a functional conv call")
        if layer.name in folded:
            computed = folded[layer.name]
            layer.add_note(
                f"{computed.kind}: folded into a plain nn.Conv2d holding its eval-mode weight "
                f"(probe relative error {computed.rel_error:.1e})"
            )
    calibration, statistics = None, {}
    if data is not None:
        with timed(seconds, "calibrate"):
            settings = recipe.calibration
            calibration = [
                inputs
                for inputs, _ in materialize(
                    calibration_draw(data, settings.seed), example_input, settings.batch_size, settings.samples, "calibration data"
                )
            ]
            requests, linears = {}, {}
            for layer in layers:
                methods = layer.choices or ((layer.method,) if layer.rewrites else ())
                kinds = [METHODS[m].statistic for m in methods if m in METHODS]
                if kinds:
                    linear = isinstance(tree.get_submodule(traced.module, layer.name), nn.Linear)
                    (linears if linear else requests)[layer.name] = kinds
            with linear_statistics(traced.module, linears) as statistics_of_linears, layer_bar(
                "calibrate", len(calibration) * len(requests), progress
            ) as bar:
                statistics = collect_statistics(traced.module, requests, lambda: iter(calibration), started=bar.advance)
            solved = [layer for layer in layers if layer.choices]
            if recipe.target is not None and solved and settings.sensitivity_samples:
                weights = layer_sensitivities(
                    traced.module, [layer.name for layer in solved],
                    sensitivity_batches(calibration, settings.sensitivity_samples), task,
                )
                for layer in solved:
                    layer.sensitivity = weights[layer.name]
            statistics.update(statistics_of_linears)
    with timed(seconds, "ranks"):  # a latency target's cost model is measured here, so it counts as choosing ranks
        latency = None
        if recipe.target is not None and recipe.target.metric == "latency":
            latency = latency_cost_for(traced.module, example_input, recipe, recipe.export.opset)
            target = hold_latency_target(layers, traced.module, profiles, recipe, statistics, latency, example_input)
        else:
            target = assign_ranks(layers, traced.module, profiles, recipe, statistics, progress=progress)
    result = Plan(traced, layers, profiles, recipe, calibration, statistics, target, seconds, task)
    for caveat in plan_caveats(result.report(), recipe):
        log.warning(caveat)
    return result


@dataclass
class Result:
    """A compressed model and its report (the content of report.json)."""

    model: nn.Module
    report: dict
    original: nn.Module = field(repr=False)
    example_input: torch.Tensor = field(repr=False)
    recipe: Recipe = field(repr=False)
    eval_batches: list[tuple] | None = field(default=None, repr=False)
    #: Calibration input batches (static INT8 quantization calibrates on them).
    calibration: list[torch.Tensor] | None = field(default=None, repr=False)
    #: What the outputs are (see :mod:`compressor.task`); ``None``: detected again where needed.
    task: Task | None = field(default=None, repr=False)
    #: A bar per export and latency step in :meth:`save` (``None``: when stderr is a terminal).
    progress: bool | None = field(default=None, repr=False)

    def export_onnx(self, path: str | Path, *, original_path: str | Path | None = None) -> onnx_export.Parity:
        """Export the compressed model (and optionally the original) and verify it in ONNX Runtime.

        Records the paths and parity numbers in ``report["onnx"]``; raises ``ParityError`` (after
        recording) when the relative error exceeds the recipe's ``export.tolerance``.
        """
        settings = self.recipe.export
        seconds = self.report.setdefault("seconds", {})
        batch = onnx_export.parity_batch(self.example_input)
        record: dict = {"opset": settings.opset, "tolerance": settings.tolerance, "batch_size": batch.shape[0]}
        if original_path is not None:
            with timed(seconds, "export"):
                onnx_export.export_onnx(self.original, self.example_input, original_path, settings.opset)
            with timed(seconds, "verify"):
                original_parity = onnx_export.parity(self.original, original_path, batch)
            record.update(
                original=str(original_path),
                original_parity_max_abs=original_parity.max_abs,
                original_parity_rel=original_parity.rel,
                original_parity_rel_outputs=original_parity.outputs,
            )
        with timed(seconds, "export"):
            onnx_export.export_onnx(self.model, self.example_input, path, settings.opset)
        with timed(seconds, "verify"):
            result = onnx_export.parity(self.model, path, batch)
        worst = max(result.rel, record.get("original_parity_rel", 0.0))
        record.update(
            compressed=str(path), parity_max_abs=result.max_abs, parity_rel=result.rel, parity_rel_outputs=result.outputs,
            passed=worst <= settings.tolerance,
        )
        record.setdefault("original", None)
        self.report["onnx"] = record
        if self.eval_batches is not None and original_path is not None and record["passed"]:
            with timed(seconds, "verify"):
                self.report["metrics"]["onnx"] = evaluate(
                    onnx_export.onnx_predictor(original_path), onnx_export.onnx_predictor(path), self.eval_batches, self.task
                )
        if not record["passed"]:
            raise ParityError(
                f"ONNX Runtime disagrees with PyTorch: relative error {worst:.3e} > tolerance {settings.tolerance:.1e} "
                f"(compressed max|diff| {result.max_abs:.3e}, rel {result.rel:.3e})"
            )
        return result

    def save(self, out_dir: str | Path, *, final_dir: str | Path | None = None, exported_program: bool = False) -> Path:
        """Write every output file into ``out_dir``: compressed.pt, original.onnx, compressed.onnx,
        report.json, report.md with its plots, and what the recipe adds (compressed.int8.onnx);
        report.json's ``files`` lists them.

        report.json is written even when parity fails, so the numbers are there to inspect.
        ``final_dir``: where the files will be moved afterwards (the CLI writes into a staging
        folder); report.json records the ONNX paths there. ``exported_program``: also write
        compressed.pt2, a ``torch.export`` archive (the safe format, for inputs that were one).
        """
        started = time.perf_counter()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        seconds = self.report.setdefault("seconds", {})
        try:
            with timed(seconds, "export"):
                torch.save(layers_portable(self.model), out / "compressed.pt")  # loads with torch alone
        except Exception as err:  # pickling runs arbitrary __reduce__ code of user modules
            raise CompressorError(
                f"cannot pickle the compressed model to {out / 'compressed.pt'}: {describe_error(err)}"
            ) from err
        try:
            # Steps the recipe turned off get no time entry, so a report never shows a phase that did not run.
            quantizing = self.recipe.export.quantize != "none"
            benchmarking = self.recipe.bench.runs > 0 and bool(self.recipe.bench.threads)
            with layer_bar("export", 1 + int(exported_program) + int(quantizing), self.progress) as bar:
                if exported_program:
                    bar.advance(EXPORTED_PROGRAM_FILE)
                    with timed(seconds, "export"):  # save_exported also reloads and compares, a check it cannot skip
                        rel = save_exported(self.model, self.example_input, out / EXPORTED_PROGRAM_FILE)
                    self.report["pt2"] = {"path": str(Path(final_dir or out) / EXPORTED_PROGRAM_FILE), "parity_rel": rel}
                    if not rel <= self.recipe.export.tolerance:
                        raise ParityError(
                            f"the reloaded {EXPORTED_PROGRAM_FILE} disagrees with the compressed model: relative error {rel:.3e}"
                        )
                bar.advance("original.onnx, compressed.onnx")
                self.export_onnx(out / "compressed.onnx", original_path=out / "original.onnx")
                if quantizing:
                    bar.advance(INT8_FILE)
                with timed(seconds, "int8") if quantizing else nullcontext():
                    int8_path = int8_step(self, out, Path(final_dir) if final_dir is not None else None)
            with timed(seconds, "latency") if benchmarking else nullcontext():
                latency_step(self.report, self.recipe, out, int8_path, progress=self.progress)
        finally:
            onnx = self.report.get("onnx")
            if final_dir is not None and onnx:
                for key in ("original", "compressed"):
                    if onnx.get(key):
                        onnx[key] = str(Path(final_dir) / Path(onnx[key]).name)
            written = [name for name in (*OUTPUT_FILES, EXPORTED_PROGRAM_FILE) if (out / name).exists()]
            # report.md comes from the same numbers; on a failed verification it explains the failure.
            # total: compress() plus this save, so it covers export, verify, int8 and latency too; last.
            seconds["total"] = seconds.pop("total", 0.0) + time.perf_counter() - started
            written += write_report_md(self.report, out)
            self.report["files"] = sorted({*written, "report.json"})
            self.report["peak_memory_mib"] = peak_memory_mib()  # export and verification included
            (out / "report.json").write_text(json.dumps(self.report, indent=2) + "\n")
        return out


def _versions() -> dict[str, str]:
    """Versions of the packages whose numerics the report depends on."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("compressor", "torch", "tensorly", "onnx", "onnxruntime"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed as a distribution"
    return found


def _cheaper_tucker(conv: nn.Conv2d, layer: LayerPlan, profile: LayerProfile) -> int | None:
    """The largest Tucker-2 (grouped, G=1) rank costing no more MACs than ``layer``'s CP choice."""
    tucker = METHODS["grouped"]
    if tucker.skip_reason(conv) is not None:
        return None
    fitting = [r for r in allowed_ranks(tucker, conv, 1, layer.round_to, layer.round_small) if tucker.macs(conv, profile.calls, r, 1) <= layer.macs_after]
    return fitting[-1] if fitting else None


def _factorize_layer(plan_: Plan, layer: LayerPlan, conv: nn.Conv2d) -> nn.Sequential | None:
    """Factorize one planned layer (falling back from a degenerate CP fit); ``None`` means keep."""
    method = METHODS[layer.method]
    statistics = plan_.statistics.get(layer.name)
    try:
        stack, layer.weight_rel_error = factorize(
            method, conv, layer.rank, layer.groups, whitening_for(method, statistics, conv.groups)
        )
        return stack
    except CPDegenerateError as err:
        profile = plan_.profiles[layer.name]
        rank = _cheaper_tucker(conv, layer, profile)
        reason = f"cp rank {layer.rank} degenerated ({err})"
        if rank is None:
            layer.method, layer.rank = "keep", None
            layer.macs_after, layer.params_after = layer.macs_before, layer.params_before
            layer.skipped_reason = f"{reason}; no Tucker-2 rank fits its MACs, so the layer is kept"
            return None
        tucker = METHODS["grouped"]
        layer.method, layer.rank, layer.groups = "grouped", rank, 1
        layer.macs_after = tucker.macs(conv, profile.calls, rank, 1)
        layer.params_after = tucker.params(conv, rank, 1)
        layer.add_note(f"{reason}; fell back to Tucker-2 (grouped, groups 1) at rank {rank}")
        stack, layer.weight_rel_error = factorize(tucker, conv, rank, 1, whitening_for(tucker, statistics))
        return stack


def _rewriting(plan_: Plan) -> list[LayerPlan]:
    """The layers ``plan_`` rewrites, in execution order (the order the refit must follow)."""
    return sorted((layer for layer in plan_.layers if layer.rewrites), key=lambda layer: plan_.profiles[layer.name].first_call)


def _decompose_all(plan_: Plan, progress: bool | None = None) -> dict[str, nn.Sequential]:
    """Factorize every rewriting layer (whitened by ``plan_.statistics`` when there are any)."""
    module = plan_.traced.module
    rewriting = _rewriting(plan_)
    replacements: dict[str, nn.Sequential] = {}
    with layer_bar("decompose", len(rewriting), progress) as bar:
        for layer in rewriting:
            bar.advance(layer.name)
            original = tree.get_submodule(module, layer.name)
            with timed(plan_.seconds, "decompose"):
                stack = _factorize_layer(plan_, layer, layers_conv_view(original))
            if stack is None:
                continue
            if isinstance(original, nn.Linear):
                stack = as_linear_stack(original, stack)
            layer.init = plan_.init
            replacements[layer.name] = stack
    return replacements


def _refit_all(plan_: Plan, replacements: dict[str, nn.Sequential], progress: bool | None = None) -> None:
    """Refit the stacks in execution order against the original layers, each fed by the network
    compressed so far (:mod:`compressor.refit`); records each layer's refitted output error."""
    module = plan_.traced.module
    by_name = {layer.name: layer for layer in _rewriting(plan_)}
    if plan_.calibration:
        limit = plan_.recipe.calibration.activation_memory_gib

        def spilled(node: str, held: int) -> None:
            plan_.refit_activations = {"stored": "float16", "from_node": node, "held_gib": held / 2**30, "limit_gib": limit}
            log.warning(
                "refit: the calibration activations held %.1f GiB at %s, over calibration.activation_memory_gib %g: "
                "stored in float16 from there on", held / 2**30, node, limit,
            )

        with timed(plan_.seconds, "refit"), layer_bar("refit", len(replacements), progress) as bar:
            refits = refit_all_(
                module,
                {name: (by_name[name].method, stack) for name, stack in replacements.items()},
                plan_.calibration,
                {name: len(plan_.profiles[name].calls) for name in replacements},
                started=bar.advance,
                max_bytes=int(limit * 2**30),
                spilled=spilled,
                block_targets=plan_.recipe.calibration.block_targets,
            )
        for name, refit in refits.items():
            by_name[name].output_rel_error = refit.error_after


def _reconstructed(plan_: Plan, replacements: dict[str, nn.Sequential], progress: bool | None = None) -> tuple[nn.Module, dict | None]:
    """The module to rewrite, and the report's ``reconstruct`` record: with the recipe's ``reconstruct``
    section and calibration data, a copy of the traced model holding the stacks, trained piece by piece
    against the traced original (:mod:`compressor.reconstruct`); otherwise the traced model itself."""
    settings, module = plan_.recipe.reconstruct, plan_.traced.module
    if settings is None:
        return module, None
    if not settings.steps:
        return module, {"skipped": "reconstruct.steps is 0"}
    if not plan_.calibration:
        return module, {"skipped": "no --data: block reconstruction trains on calibration images"}
    if not isinstance(module, torch.fx.GraphModule):
        return module, {"skipped": "the model was not traced by torch.fx, so it cannot be cut into blocks"}
    if not replacements:
        return module, {"skipped": "no layer was rewritten"}
    working = swap_(copy.deepcopy(module), replacements)
    pieces = reconstruction_pieces(module.graph, list(replacements), dict(tree.named_modules(module, remove_duplicate=False)))
    with timed(plan_.seconds, "reconstruct"), layer_bar("reconstruct", sum(bool(p.rewritten) for p in pieces), progress) as bar:
        records = reconstruct_(
            module, working, pieces, plan_.calibration, settings.steps, settings.lr, settings.train,
            seed=plan_.recipe.calibration.seed, started=bar.advance,
        )
    return working, {"steps": settings.steps, "lr": settings.lr, "train": settings.train, "pieces": records}


def compress(
    model: nn.Module,
    recipe: Recipe | dict | str | Path,
    example_input: torch.Tensor,
    *,
    data: Iterable | None = None,
    eval_data: Iterable | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> Result:
    """Rewrite the convs of ``model`` as ``recipe`` says and return the new model with its report.

    ``model`` is left untouched (a deep copy is rewritten). ``recipe`` is a YAML path, a dict or a
    :class:`~compressor.recipe.Recipe`. ``example_input`` fixes the input shape used for tracing,
    MAC counts and export. ``data`` (calibration: input tensors or ``(inputs, labels)`` batches, or a
    :class:`compressor.data.Dataset`; the recipe's ``calibration.samples`` are used) makes the
    initialization data-aware: whitened decompositions and least-squares refits. ``eval_data``
    (same forms) adds a ``metrics`` section comparing both models, in PyTorch and, after
    :meth:`Result.save`, in ONNX Runtime.

    With a recipe ``finetune`` section and ``data``, the rewritten model is fine-tuned by distillation
    from the original (see :mod:`compressor.finetune`) on ``device`` (default: CUDA when available),
    choosing its best weights on a ``finetune.holdout`` part of ``data`` that calibration and training
    never see (``eval_data`` is never used for a choice: it only measures); ``progress`` shows its bar
    (default: on a terminal). Without ``data`` it is skipped and the report says so.
    """
    started = time.perf_counter()
    recipe = load_recipe(recipe)
    if recipe.export.quantize == "static" and data is None:
        raise CompressorError("export.quantize: static calibrates activation ranges on data; pass --data (or use dynamic)")
    tuning = recipe.finetune
    holdout = None
    if tuning is not None and tuning.enabled and data is not None:
        # The fine-tune picks its best weights on a part of --data that calibration and training never
        # see; --eval-data stays a test set that no choice was made on, so its numbers are not flattered.
        data, holdout = split_holdout(data, tuning.holdout, tuning.seed, example_input)
    # The caller's module keeps its train/eval flags: compare against an eval-mode copy if needed.
    original = tree.set_training_(copy.deepcopy(model), False) if any(m.training for m in tree.modules(model)) else model
    layer_plan = plan(original, recipe, example_input, data=data, progress=progress)  # first: it names a failing forward's layer
    task = layer_plan.task
    seconds = layer_plan.seconds
    replacements = _decompose_all(layer_plan, progress)
    # The calibration Grams and their whitenings served the ranks and the decompositions and are not
    # read again; for ResNet-50 at 224 they hold 3.4 GB, which the refit's activations need.
    layer_plan.statistics = {}
    release_freed_memory()
    _refit_all(layer_plan, replacements, progress)
    rewriting, reconstructed = _reconstructed(layer_plan, replacements, progress)
    compressed = tree.set_training_(rewrite_(rewriting, replacements), False)
    compressed = as_sequential(original, compressed, replacements)  # result.model[0] works as on the input
    finetuned = None
    if tuning is not None:
        if not tuning.enabled:
            finetuned = {"skipped": "finetune.steps is 0"}
        elif data is None:
            finetuned = {"skipped": "no --data: fine-tuning needs training data"}
        else:
            budget = ", ".join(f"{key} {getattr(tuning, key)}" for key in ("steps", "epochs", "max_minutes") if getattr(tuning, key) is not None)
            log.info("fine-tuning by distillation until the first of: %s (the recipe's finetune section)", budget)
            with timed(seconds, "finetune"):
                finetuned = finetune(
                    compressed, original, tuning, data, holdout, example_input,
                    rewritten=list(replacements), device=device, progress=progress, task=task,
                )
    report = layer_plan.report()
    report["task"] = task.record()
    if reconstructed is not None:
        report["reconstruct"] = reconstructed
    if finetuned is not None:
        report["finetune"] = finetuned
    report["input_shape"] = list(example_input.shape)
    report["versions"] = _versions()
    report["recipe"] = layer_plan.recipe.model_dump(mode="json")
    # The plan profiled the traced copy before the rewrite: the same convs and MACs as the original.
    before, after = totals(layer_plan.profiles), totals(_profile(compressed, example_input))
    report["totals"] = totals_record(before, after)
    if layer_plan.target is not None and layer_plan.target["metric"] != "latency":  # latency: measured in save()
        metric = layer_plan.target["metric"]
        report["target"]["achieved"] = after[metric] / max(before[metric], 1)
    with timed(seconds, "evaluate"):
        report["output_rel_error"] = onnx_export.torch_relative_error(original, compressed, onnx_export.parity_batch(example_input))
        eval_batches = None
        if eval_data is not None:
            eval_batches = materialize(eval_data, example_input, recipe.calibration.batch_size, None, "evaluation data")
            report["metrics"] = evaluate(original, compressed, eval_batches, task)
    seconds["total"] = time.perf_counter() - started
    report["seconds"] = seconds
    report["peak_memory_mib"] = peak_memory_mib()
    log.info("compressed in %.1fs; Result.save() exports, verifies and benchmarks", seconds["total"])
    return Result(
        compressed, report, original, example_input, layer_plan.recipe, eval_batches, calibration=layer_plan.calibration,
        task=task, progress=progress,
    )
