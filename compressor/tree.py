"""Walk a user's module tree without calling any method through the user's instances.

Published models assign plain attributes that shadow ``nn.Module`` methods (a segmentation model
sets ``self.modules = [...]`` in its ``__init__``), and torch's own helpers call through the
instance: ``model.eval()`` runs ``self.children()``, ``model.to()`` runs ``self._apply`` over
``self.children()``, ``modules()`` runs ``self.named_modules()``. Every helper here reads the
registries (``_modules``, ``_parameters``, ``_buffers``) directly, which no attribute can shadow
without breaking the module itself, so the tool works on such models and never depends on what a
model named its attributes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

__all__ = [
    "first_parameter",
    "get_submodule",
    "modules",
    "move_",
    "named_buffers",
    "named_modules",
    "named_parameters",
    "parameters",
    "requires_grad_",
    "restore_",
    "set_training_",
    "snapshot",
]


def named_modules(model: nn.Module, *, remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Module]]:
    """``(qualified name, module)`` in the order of ``nn.Module.named_modules``, the root first as ``""``."""
    seen: set[int] = set()

    def visit(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        if remove_duplicate:
            if id(module) in seen:
                return
            seen.add(id(module))
        yield prefix, module
        for name, child in module._modules.items():
            if child is not None:
                yield from visit(f"{prefix}.{name}" if prefix else name, child)

    yield from visit("", model)


def modules(model: nn.Module) -> Iterator[nn.Module]:
    for _, module in named_modules(model):
        yield module


def _named_tensors(model: nn.Module, registry: str) -> Iterator[tuple[str, torch.Tensor]]:
    seen: set[int] = set()
    for prefix, module in named_modules(model):
        for name, tensor in getattr(module, registry).items():
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            yield (f"{prefix}.{name}" if prefix else name), tensor


def named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Every parameter once (a shared one under its first name), like ``nn.Module.named_parameters``."""
    return _named_tensors(model, "_parameters")


def parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    for _, parameter in named_parameters(model):
        yield parameter


def named_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    return _named_tensors(model, "_buffers")


def first_parameter(model: nn.Module) -> nn.Parameter | None:
    return next(parameters(model), None)


def get_submodule(model: nn.Module, target: str) -> nn.Module:
    """The module at dotted path ``target`` (``""``: the root), read from ``_modules`` only."""
    module = model
    for part in target.split(".") if target else ():
        child = module._modules.get(part)
        if child is None:
            raise AttributeError(f"{type(module).__name__} has no submodule {part!r} (looking up {target!r})")
        module = child
    return module


def get_attribute(model: nn.Module, target: str):
    """The module, parameter, buffer or plain attribute at dotted path ``target`` (an FX ``get_attr``)."""
    value = model
    for part in target.split("."):
        value = getattr(value, part)
    return value


def set_training_(model: nn.Module, training: bool) -> nn.Module:
    """``model.train(training)`` without calling ``train``/``children`` through the instances."""
    for module in modules(model):
        module.training = training
    return model


def requires_grad_(model: nn.Module, requires_grad: bool) -> nn.Module:
    for parameter in parameters(model):
        parameter.requires_grad_(requires_grad)
    return model


def move_(
    model: nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    memory_format: torch.memory_format | None = None,
) -> nn.Module:
    """``model.to(device, dtype, memory_format)`` in place; ``dtype`` applies to floating-point tensors
    only and ``memory_format`` to 4-d ones, as in torch."""

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(device=device, dtype=dtype)
        else:
            tensor = tensor.to(device=device)
        if memory_format is not None and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=memory_format)
        return tensor

    for module in modules(model):
        module._apply(convert, recurse=False)
    return model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of every parameter and buffer by name (what ``state_dict`` would hold, cloned)."""
    return {name: tensor.detach().clone() for name, tensor in [*named_parameters(model), *named_buffers(model)]}


def restore_(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Copy a :func:`snapshot` back into ``model``'s tensors in place."""
    with torch.no_grad():
        for name, tensor in [*named_parameters(model), *named_buffers(model)]:
            tensor.copy_(state[name])
    return model
