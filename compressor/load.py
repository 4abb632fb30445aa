"""Model files in, safely: state_dicts with an architecture factory, or trusted pickled modules.

The input file is only ever read.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from compressor import tree
from compressor.errors import ModelLoadError, describe_error
from compressor.exported import is_exported_program, load_exported

_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _not_a_pytorch_file(path: Path) -> str | None:
    """Why ``path`` cannot be a ``torch.save`` file, read from its first bytes (``None``: it may be one)."""
    size = path.stat().st_size
    if size == 0:
        return "it is empty (0 bytes)"
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            return f"it is an incomplete zip archive ({size} bytes; truncated or corrupt)"
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
        return f"its zip archive is corrupt (first bad member {broken})" if broken else None
    if head[:1] == b"\x80":  # a pickle protocol marker: the legacy torch.save format
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it is neither a zip archive nor a pickle (it starts with bytes {head[:8].hex(' ')})"
    return f"it is a text file (it starts with {text.splitlines()[0][:40]!r}), not a model saved with torch.save"


def _as_state_dict(obj) -> Mapping[str, torch.Tensor] | None:
    """The state_dict inside ``obj`` (itself, or under a usual checkpoint key), else ``None``."""
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, Mapping):
        for key in _CHECKPOINT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    return None


def build_architecture(spec: str) -> nn.Module:
    """Import ``package.module:callable`` and call it with no arguments."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ModelLoadError(f"--arch {spec!r}: expected MODULE:CALLABLE, e.g. compressor.zoo:resnet18")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # console scripts do not put the user's folder on the path
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ModelLoadError(f"--arch {spec!r}: {describe_error(err)}") from err
    try:
        model = factory()
    except Exception as err:
        raise ModelLoadError(f"--arch {spec!r}: calling it with no arguments failed: {describe_error(err)}") from err
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"--arch {spec!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def _load_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path, arch: str) -> nn.Module:
    expected = model.state_dict()
    mismatched = [
        f"{key} is {list(value.shape)} in the file but {list(expected[key].shape)} in the model"
        for key, value in state_dict.items()
        if key in expected and value.shape != expected[key].shape
    ]
    if mismatched:
        more = f" and {len(mismatched) - 3} more" if len(mismatched) > 3 else ""
        raise ModelLoadError(f"{path} does not fit --arch {arch}: " + "; ".join(mismatched[:3]) + more)
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        def some(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

        details = []
        if result.missing_keys:
            details.append(f"missing {len(result.missing_keys)} key(s): {some(result.missing_keys)}")
        if result.unexpected_keys:
            details.append(f"unexpected {len(result.unexpected_keys)} key(s): {some(result.unexpected_keys)}")
        raise ModelLoadError(f"{path} does not fit --arch {arch}: " + "; ".join(details))
    return model


def _wanted_classes(path: Path, shown: int = 6) -> str:
    """`` that import a.B, c.D and 3 more`` from the checkpoint's pickle, without running it ('' if unreadable)."""
    try:
        wanted = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # an older torch, or a pickle too odd to scan: the rest of the message still holds
        return ""
    if not wanted:
        return ""
    more = f" and {len(wanted) - shown} more" if len(wanted) > shown else ""
    return " that import " + ", ".join(wanted[:shown]) + more


def load_model(path: str | os.PathLike, *, arch: str | None = None, trust_model: bool = False) -> nn.Module:
    """Load a model file for compression, in eval mode on the CPU.

    - a state_dict (or a checkpoint dict holding one under ``state_dict``/``model_state_dict``/
      ``model``) needs ``arch`` (``MODULE:CALLABLE``) to build the module it belongs to;
    - a pickled ``nn.Module`` (``torch.save(model)``) holds code and is loaded only with
      ``trust_model=True``;
    - a ``torch.export`` archive (``.pt2``) is loaded as its graph, refusing pickled members unless
      ``trust_model=True`` (see :mod:`compressor.exported`);
    - TorchScript archives are refused: they cannot be rewritten.
    """
    path = Path(path)
    if path.is_dir():
        raise ModelLoadError(f"model path is a directory, not a file: {path}")
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    problem = _not_a_pytorch_file(path)
    if problem:
        raise ModelLoadError(f"cannot read {path} as a PyTorch file: {problem}")
    if is_exported_program(path):
        if arch is not None:
            raise ModelLoadError(f"{path} is a torch.export archive, which holds its own graph; --arch is only for state_dict files")
        return load_exported(path, trust_model=trust_model)
    if _is_torchscript(path):
        raise ModelLoadError(
            f"{path} is a TorchScript archive, which cannot be rewritten; save the nn.Module instead "
            "(torch.save(model.state_dict(), ...) and pass --arch MODULE:CALLABLE, or torch.save(model, ...))"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # torch's wording when weights-only refuses a class
            raise ModelLoadError(f"cannot read {path} as a PyTorch file: {describe_error(err)}") from err
        if not trust_model:
            raise ModelLoadError(
                f"{path} holds pickled Python objects (such as a whole nn.Module){_wanted_classes(path)}, and "
                "loading it would run code from the file; pass --trust-model if you trust it, or use a safe alternative: save "
                "model.state_dict() and pass --arch MODULE:CALLABLE, or call compressor.compress(model, ...) "
                "from Python on a model you build yourself"
            ) from err
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as inner:
            raise ModelLoadError(f"cannot load {path}: {describe_error(inner)}") from inner
    except Exception as err:
        raise ModelLoadError(f"cannot read {path} as a PyTorch file: {describe_error(err)}") from err
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), nn.Module):
        obj = obj["model"]  # a training checkpoint that pickled the whole module
    if isinstance(obj, nn.Module):
        if arch is not None:
            raise ModelLoadError(f"{path} holds a whole {type(obj).__name__}; --arch is only for state_dict files")
        return tree.set_training_(obj, False)  # not obj.eval(): a model may shadow children(), which eval() calls
    state_dict = _as_state_dict(obj)
    if state_dict is None:
        raise ModelLoadError(f"{path} holds a {type(obj).__name__}, neither an nn.Module nor a state_dict")
    if arch is None:
        raise ModelLoadError(
            f"{path} holds a state_dict ({len(state_dict)} tensors); pass --arch MODULE:CALLABLE to build its architecture"
        )
    return tree.set_training_(_load_state_dict(build_architecture(arch), state_dict, path, arch), False)
