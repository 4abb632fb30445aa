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


def test_calibrate_export_and_latency_have_bars_naming_their_step(monkeypatch, tmp_path):
    """compress + save with progress on: every slow phase opens a bar and names what it works on."""
    import contextlib

    import torch

    import compressor
    from compressor import bench, pipeline
    from tests.models_for_cli import INPUT_SHAPE, tiny_net

    seen: dict[str, list[str]] = {}

    @contextlib.contextmanager
    def recording(phase, total, enabled=None):
        assert enabled is True, f"{phase}: progress=True did not reach the bar ({enabled!r})"
        names = seen.setdefault(phase, [])

        class Bar:
            def advance(self, name: str) -> None:
                names.append(name)

        yield Bar()
        assert len(names) <= total or phase == "calibrate", f"{phase}: {len(names)} steps, bar of {total}"

    monkeypatch.setattr(pipeline, "layer_bar", recording)
    monkeypatch.setattr(bench, "progress_bar", recording)
    recipe = {
        "rules": [{"match": "*", "method": "spatial_separable", "rank": 2, "min_kernel_size": 3}],
        "calibration": {"samples": 8, "batch_size": 4},
        "bench": {"threads": [1], "runs": 2},
    }
    data = [(torch.randn(4, *INPUT_SHAPE[1:]), None) for _ in range(2)]
    result = compressor.compress(tiny_net(), recipe, torch.randn(INPUT_SHAPE), data=data, progress=True)
    result.save(tmp_path)
    layers = [layer["name"] for layer in result.report["layers"] if layer.get("rank")]
    calibrated = set(seen["calibrate"])  # each requested layer once per calibration batch
    assert set(layers) <= calibrated and len(seen["calibrate"]) == 2 * len(calibrated), (layers, seen["calibrate"])
    assert seen["export"] == ["original.onnx, compressed.onnx"], seen["export"]
    assert seen["latency"] == ["1 thread: original, compressed"], seen["latency"]
