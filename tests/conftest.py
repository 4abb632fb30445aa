"""Shared fixtures for the CLI and loader tests: small models and the files they are saved to."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import os

import pytest
import torch
from hypothesis import settings

# CI must not turn red on a draw nobody can reproduce: by default every run draws the same examples.
# HYPOTHESIS_PROFILE=explore draws fresh ones (run it locally to hunt for new counterexamples).
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

from tests.models_for_cli import tiny_net


@pytest.fixture(scope="session", autouse=True)
def _latency_cache(tmp_path_factory):
    """One latency cache for the whole run (``target: {latency: f}`` times layers once per shape),
    never the user's ~/.cache."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def tiny_state_dict() -> dict[str, torch.Tensor]:
    """The state_dict of ``tiny_net()`` (seeded, so every call of the factory gives the same one)."""
    return tiny_net().state_dict()


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, tiny_state_dict) -> dict[str, Path]:
    """One file of each kind a user may hand to the tool, written once per test module.

    ``state_dict``: ``torch.save(model.state_dict())`` at ``.../x/model.pt``; ``module``: a whole pickled
    ``nn.Module``; ``script``/``trace``: TorchScript archives of the same model.
    """
    root = tmp_path_factory.mktemp("model_files")
    (root / "x").mkdir()
    model = tiny_net()
    files = {
        "state_dict": root / "x" / "model.pt",
        "module": root / "whole_module.pt",
        "script": root / "scripted.pt",
        "trace": root / "traced.pt",
    }
    torch.save(tiny_state_dict, files["state_dict"])
    torch.save(model, files["module"])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script/trace are deprecated, still written
        torch.jit.script(model).save(str(files["script"]))
        torch.jit.trace(model, torch.randn(1, 3, 32, 32)).save(str(files["trace"]))
    return files
