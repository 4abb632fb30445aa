"""ONNX Runtime latency benchmark: keys, positive finite numbers, the ``compress bench`` subcommand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from compressor import bench, cli
from compressor.errors import CompressorError
from compressor.export import export_onnx
from tests.models_for_cli import INPUT_SHAPE, tiny_net

KEYS = {"threads", "batch", "original_ms", "compressed_ms", "speedup", "original_p90_ms", "compressed_p90_ms"}


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    model = tiny_net()
    wider = torch.nn.Sequential(model, torch.nn.Linear(10, 10)).eval()
    x = torch.randn(INPUT_SHAPE)
    return export_onnx(model, x, folder / "a.onnx"), export_onnx(wider, x, folder / "b.onnx")


def test_benchmark_returns_positive_finite_medians_per_thread_setting(onnx_pair):
    records = bench.benchmark(*onnx_pair, INPUT_SHAPE, threads=[1, 0], runs=5, warmup=1)
    assert [r["threads"] for r in records] == [1, 0], records
    for record in records:
        assert KEYS <= set(record), f"missing {KEYS - set(record)} in {record}"
        for key in ("original_ms", "compressed_ms", "original_p90_ms", "compressed_p90_ms", "speedup"):
            assert math.isfinite(record[key]) and record[key] > 0, f"{key} = {record[key]} in {record}"
        assert record["original_p90_ms"] >= record["original_ms"], record
        assert record["speedup"] == pytest.approx(record["original_ms"] / record["compressed_ms"]), record
        assert record["batch"] == INPUT_SHAPE[0]


def test_extra_models_are_timed_in_the_same_rounds(onnx_pair):
    (record,) = bench.benchmark(onnx_pair[0], onnx_pair[1], (3, *INPUT_SHAPE[1:]), threads=[1], runs=3, warmup=0,
                                extra={"int8": onnx_pair[0]})
    assert record["batch"] == 3
    assert record["int8_ms"] > 0 and record["int8_speedup"] > 0, record


@pytest.mark.parametrize("settings", [{"runs": 0}, {"threads": []}])
def test_zero_runs_or_no_threads_skip_the_benchmark(onnx_pair, settings):
    assert bench.benchmark(*onnx_pair, INPUT_SHAPE, **{"threads": [1], "runs": 3, **settings}) == []


def test_unknown_provider_is_a_one_line_error_listing_the_available_ones(onnx_pair):
    with pytest.raises(CompressorError, match="NoSuchExecutionProvider.*available: .*CPUExecutionProvider"):
        bench.benchmark(*onnx_pair, INPUT_SHAPE, providers=["NoSuchExecutionProvider"])


def test_input_shape_is_read_from_the_file_with_batch_one(onnx_pair):
    assert bench.model_input_shape(onnx_pair[0]) == (1, *INPUT_SHAPE[1:])
    assert bench.model_input_shape(onnx_pair[0], batch=4) == (4, *INPUT_SHAPE[1:])


def test_bench_subcommand_prints_json_records(onnx_pair, capsys):
    code = cli.main(["bench", str(onnx_pair[0]), "--vs", str(onnx_pair[1]), "--runs", "3", "--threads", "1", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    (record,) = json.loads(captured.out)
    assert KEYS <= set(record) and record["speedup"] > 0, record


def test_bench_subcommand_table_without_vs(onnx_pair, capsys):
    assert cli.main(["bench", str(onnx_pair[0]), "--runs", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "MODEL ms (p90)" in out and "speedup" not in out, out


def test_bench_subcommand_missing_file_is_exit_2_with_one_line(tmp_path, capsys):
    assert cli.main(["bench", str(tmp_path / "nope.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compress: error: ONNX file not found"), err


def test_bench_models_of_different_input_sizes_is_exit_2_with_one_line(onnx_pair, tmp_path, capsys):
    other = export_onnx(tiny_net(), torch.randn(1, 3, 40, 40), tmp_path / "c40.onnx")
    code = cli.main(["bench", str(onnx_pair[0]), "--vs", str(other), "--runs", "2", "--threads", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, f"exit {code}, stderr {err}"
    assert len(err) == 1 and err[0].startswith("compress: error: ") and "c40.onnx" in err[0], err
    assert "internal error" not in err[0] and "40" in err[0], err


def test_bench_json_of_one_model_names_its_fields_model(onnx_pair, capsys):
    assert cli.main(["bench", str(onnx_pair[0]), "--runs", "2", "--threads", "1", "--json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert record["model_ms"] > 0 and record["model_p90_ms"] >= record["model_ms"], record
    assert not [key for key in record if key.startswith(("original", "compressed"))], record


def test_advice_names_the_fastest_setting_and_every_slower_one():
    from compressor.bench import deployment_advice

    rows = [
        {"threads": 1, "compressed_ms": 5.0, "speedup": 1.6, "int8_ms": 7.0},
        {"threads": 0, "compressed_ms": 6.0, "speedup": 0.9, "int8_ms": 6.5},
    ]
    advice = deployment_advice(rows)
    assert advice["threads"] == 1 and advice["compressed_ms"] == 5.0, advice
    assert advice["slower_than_original"] == [0], advice
    assert advice["format"] == "float" and abs(advice["int8_vs_float"] - 5.0 / 6.5) < 1e-12, advice
    rows[1]["int8_ms"] = 4.0
    assert deployment_advice(rows)["format"] == "int8", deployment_advice(rows)
