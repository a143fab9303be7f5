"""benchmarks/bench_layout.py: a training step in the plain and the channels-last layout."""

from __future__ import annotations

import pytest


def test_bench_layout_times_both_layouts(load_benchmark, capsys):
    bench = load_benchmark("bench_layout")
    argv = ["--rounds", "1", "--steps", "1", "--img-size", "64", "--batch-size", "2",
            "--model-kwargs", '{"dim": 32, "mask_channels": 8, "up_channels": [16, 8], "decoder_layers": 1}']
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "layout" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["plain", "channels-last"]
    assert all(float(row.split("|")[2]) > 0 and float(row.split("|")[3]) > 0 for row in rows)
    assert "ratio (channels-last / plain): CPU" in out
    with pytest.raises(SystemExit):
        bench.main(["--rounds", "0"])
    with pytest.raises(SystemExit):
        bench.main(["--model-kwargs", "[1]"])
