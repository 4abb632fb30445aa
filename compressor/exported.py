"""``torch.export`` archives (``.pt2``) in and out, without running code from the file.

``torch.export.load`` is mostly data (a JSON graph and raw tensor bytes), but it unpickles some
payloads: weights or constants saved with ``use_pickle``, custom and opaque objects, legacy
``.pt`` members, and sample inputs it retries with ``weights_only=False``. :func:`unsafe_members`
reads the archive's own configs to find those before anything is loaded; without
``--trust-model`` such an archive is refused, so a plain-tensor ``.pt2`` is the safe format.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path, PurePosixPath

import torch
import torch.fx
from torch import nn

from compressor.errors import CompressorError, ModelLoadError, describe_error

SUFFIX = ".pt2"


def _members(archive: zipfile.ZipFile) -> dict[PurePosixPath, str]:
    """Member paths relative to the archive's top folder (``r20/data/...`` -> ``data/...``)."""
    relative = {}
    for name in archive.namelist():
        parts = PurePosixPath(name).parts
        if len(parts) > 1:
            relative[PurePosixPath(*parts[1:])] = name
    return relative


def is_exported_program(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        members = _members(archive)
        marker = members.get(PurePosixPath("archive_format"))
        return marker is not None and archive.read(marker).strip() == b"pt2"


def unsafe_members(path: Path) -> list[str]:
    """Members that ``torch.export.load`` would unpickle (empty for an archive of plain tensors)."""
    unsafe = []
    with zipfile.ZipFile(path) as archive:
        members = _members(archive)
        for relative, name in sorted(members.items()):
            folder = relative.parts[:2]
            if folder in (("data", "weights"), ("data", "constants")):
                if relative.suffix == ".pt":
                    unsafe.append(f"{relative} (a legacy pickled payload)")
                elif relative.name.endswith("_config.json"):
                    try:
                        config = json.loads(archive.read(name)).get("config", {})
                    except (ValueError, AttributeError):
                        unsafe.append(f"{relative} (unreadable config)")
                        continue
                    for key, entry in sorted(config.items()):
                        path_name = str(entry.get("path_name", ""))
                        if entry.get("use_pickle", False):
                            unsafe.append(f"{key} (pickled in {relative.parent / path_name})")
                        elif folder[1] == "constants" and not path_name.startswith("tensor_"):
                            unsafe.append(f"{key} (a pickled custom object)")
            elif relative.parts[:2] == ("data", "sample_inputs"):
                try:
                    torch.load(io.BytesIO(archive.read(name)), map_location="cpu", weights_only=True)
                except Exception:
                    unsafe.append(f"{relative} (sample inputs that are not plain tensors)")
    return unsafe


def load_exported(path: Path, *, trust_model: bool) -> torch.fx.GraphModule:
    """The program of a ``.pt2`` archive as a plain, picklable ``GraphModule`` with parameters.

    Its convolutions are functional (``aten.conv2d`` on parameter inputs); the pipeline lifts them
    into ``nn.Conv2d`` modules named like the eager model's (see :mod:`compressor.passes.functional`).
    Input guards are dropped so that calibration and parity batches of other sizes run: a program
    that bakes its example batch size into the graph fails that check here, with how to fix it.
    """
    if not trust_model:
        unsafe = unsafe_members(path)
        if unsafe:
            more = f" and {len(unsafe) - 4} more" if len(unsafe) > 4 else ""
            raise ModelLoadError(
                f"{path} is a torch.export archive with pickled members ({', '.join(unsafe[:4])}{more}); loading it "
                "would run code from the file. Pass --trust-model if you trust it, or re-export with plain tensors"
            )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path))
    except Exception as err:
        raise ModelLoadError(f"cannot load {path} as a torch.export archive: {describe_error(err)}") from err
    unlifted = program.module(check_guards=False)
    # A fresh GraphModule over the same graph: no guard pre-hook and no train()/eval() overrides,
    # so it behaves (and pickles) like any traced module.
    module = torch.fx.GraphModule(unlifted, unlifted.graph).eval()
    _check_runs_at_another_batch_size(path, program, module)
    return module


def _example_inputs(program) -> list:
    """The fake tensors the program was exported with, one per user input (``None`` for non-tensors)."""
    user_inputs = set(program.graph_signature.user_inputs)
    return [node.meta.get("val") for node in program.graph.nodes if node.op == "placeholder" and node.name in user_inputs]


def _check_runs_at_another_batch_size(path: Path, program, module: nn.Module) -> None:
    """Calibration and parity use other batch sizes than the export's: the program must treat the
    first dimension as a batch (one more sample gives one more output row, the others unchanged)."""
    from compressor.export import flatten_outputs

    examples = _example_inputs(program)
    if len(examples) != 1 or not isinstance(examples[0], torch.Tensor) or not all(isinstance(size, int) for size in examples[0].shape):
        return  # several inputs, or symbolic sizes: nothing static to check
    shape = tuple(examples[0].shape)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(shape, generator=generator).to(examples[0].dtype)
    grown = torch.cat([inputs, inputs[:1]])
    problem = None
    try:
        with torch.no_grad():
            expected, got = flatten_outputs(module(inputs)), flatten_outputs(module(grown))
        if any(g.shape[:1] != (shape[0] + 1,) or not torch.allclose(g[: shape[0]], e, rtol=1e-4, atol=1e-5) for g, e in zip(got, expected)):
            problem = "its outputs do not follow the batch dimension"
    except Exception as err:
        problem = describe_error(err)
    if problem:
        raise ModelLoadError(
            f"{path} was exported for input shape {list(shape)} and fails at batch size {shape[0] + 1} "
            f"({problem}); export it with a dynamic batch dimension: torch.export.export(model, (x,), "
            "dynamic_shapes=({0: torch.export.Dim('batch')},))"
        )


def save_exported(model: nn.Module, example_input: torch.Tensor, path: Path) -> float:
    """Export ``model`` with a dynamic batch dimension, save it, and return the relative error of the
    reloaded program against ``model`` on another batch size."""
    from compressor.export import torch_relative_error

    # Export specializes sizes 0 and 1, so trace at batch >= 2 for the batch to stay dynamic.
    generator = torch.Generator().manual_seed(1)
    traced_at = torch.randn((max(2, example_input.shape[0]), *example_input.shape[1:]), generator=generator)
    probe = torch.randn((traced_at.shape[0] + 1, *example_input.shape[1:]), generator=generator)
    traced_at, probe = (t.to(example_input.dtype) for t in (traced_at, probe))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, (traced_at,), dynamic_shapes=({0: torch.export.Dim("batch")},))
            torch.export.save(program, str(path))
            reloaded = torch.export.load(str(path)).module()
            return torch_relative_error(model, reloaded, probe)
    except Exception as err:
        raise CompressorError(f"cannot save the compressed model as a torch.export archive {path}: {describe_error(err)}") from err
