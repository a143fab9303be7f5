"""benchmarks/bench_loss.py: a training step with the loss on the logits' grid and at the input size."""

from __future__ import annotations

import pytest


def test_bench_loss_times_both_ways(load_benchmark, capsys):
    bench = load_benchmark("bench_loss")
    assert bench.main(["--rounds", "1", "--steps", "1", "--img-size", "64", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "loss taken" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["on the logits' grid (nearest target)", "at the input size"]
    assert all(float(row.split("|")[2]) > 0 for row in rows)
    assert "ratio (input size / logits' grid):" in out
    with pytest.raises(SystemExit):
        bench.main(["--rounds", "0"])
