"""Progress bars: quiet off a terminal, and a bar that runs through when asked for."""

from __future__ import annotations

from compressor.progress import layers


def test_quiet_when_stderr_is_not_a_terminal(capsys):
    with layers("refit", 3) as bar:
        for name in ("a", "b", "c"):
            bar.advance(name)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == "", f"printed {captured.err!r} {captured.out!r}"


def test_enabled_bar_counts_the_layers_that_finished():
    with layers("ranks", 3, enabled=True) as bar:
        for name in ("a", "b", "c"):
            bar.advance(name)
        task = bar.progress.tasks[0]
        assert (task.completed, task.fields["layer"]) == (2, "c"), (task.completed, task.fields)
    assert task.completed == 3, task.completed
