"""BENCHMARKS.md sections owned by other scripts survive benchmark.py's rewrite and are replaced in place."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from benchmarks_md import kept_sections, replace_section  # noqa: E402


def test_a_section_is_appended_then_replaced_in_place(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nrows\n")
    replace_section(path, "latency", ["## Speed", "", "| a |"])
    replace_section(path, "other", ["x"])
    replace_section(path, "latency", ["## Speed", "", "| b |"])
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nrows\n\n<!-- latency:begin -->\n## Speed\n\n| b |\n<!-- latency:end -->"), text
    assert "| a |" not in text and text.count("latency:begin") == 1 and text.endswith("<!-- other:end -->\n"), text
    assert kept_sections(path) == ["<!-- latency:begin -->\n## Speed\n\n| b |\n<!-- latency:end -->",
                                   "<!-- other:begin -->\nx\n<!-- other:end -->"], kept_sections(path)
