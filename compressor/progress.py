"""A rich progress bar for the phases that go layer by layer (ranks, decompose, refit).

Shown on stderr when it is a terminal, with the layer being worked on; silent otherwise (CI logs,
pipes, tests), so it never mixes into output other programs read.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class _Quiet:
    def advance(self, layer: str) -> None:
        pass


class _Bar:
    def __init__(self, progress, task) -> None:
        self.progress, self.task, self.started = progress, task, 0

    def advance(self, layer: str) -> None:
        """Mark the previous layer done and show ``layer`` as the one being worked on."""
        self.progress.update(self.task, completed=self.started, layer=layer)
        self.started += 1


@contextmanager
def layers(phase: str, total: int, enabled: bool | None = None) -> Iterator[_Bar | _Quiet]:
    """A bar over ``total`` layers titled ``phase``; ``enabled`` defaults to stderr being a terminal.

    Call ``advance(name)`` once per layer as it starts.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled or total == 0:
        yield _Quiet()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn(f"{phase:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[layer]}"),
        console=Console(stderr=True),
        transient=True,
    )
    task = progress.add_task(phase, total=total, layer="")
    with progress:
        yield _Bar(progress, task)
        progress.update(task, completed=total, layer="")
