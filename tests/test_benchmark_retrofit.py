"""benchmarks/retrofit.py (the paper's table V at small scale) trains through the project's Trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_sweep_trains_every_host_and_head_through_the_trainer_and_reuses_runs(tmp_path, monkeypatch, load_benchmark):
    bench = load_benchmark("retrofit")
    argv = ["--hosts", "vlt", "cris", "--seeds", "0", "1", "--steps", "2", "--batch-size", "2",
            "--img-size", "64", "--val-samples", "4", "--synthetic-images", "8",
            "--cache-dir", str(tmp_path / "synth"), "--output-dir", str(tmp_path / "runs"),
            "--results-dir", str(tmp_path / "results"), "--results-name", "smoke"]
    assert bench.main(argv) == 0
    document = json.loads((tmp_path / "results" / "smoke.json").read_text())
    assert {(r["host"], r["head"], r["seed"]) for r in document["runs"]} == {
        (h, k, s) for h in ("vlt", "cris") for k in ("fixed", "aligner") for s in (0, 1)
    }
    for record in document["runs"]:
        run = Path(record["run_dir"])
        # the Trainer's run folder: its logs, the final evaluation at the last step, a checkpoint
        assert record["steps"] == 2 and record["metrics"]["num_samples"] == 4
        assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [2]
        config = json.loads((run / "last" / "config.json").read_text())
        assert config["host"] == record["host"] and config["config"]["head"] == record["head"]
    by_key = {(r["host"], r["head"], r["seed"]): r for r in document["runs"]}
    assert any(by_key[(h, k, 0)]["final_loss"] != by_key[(h, k, 1)]["final_loss"] for h in ("vlt", "cris") for k in ("fixed", "aligner"))
    params = {(r["host"], r["head"]): r["params"] for r in document["runs"]}
    assert params[("vlt", "aligner")] > params[("vlt", "fixed")] and params[("cris", "aligner")] > params[("cris", "fixed")]
    table = (tmp_path / "results" / "smoke.md").read_text()
    assert "| vlt | aligner |" in table and "| cris | fixed |" in table and "Partial results" not in table
    # Same seed, same data order: two seeds differ, a rerun of one seed reproduces it exactly.
    again = tmp_path / "again"
    assert bench.main([*argv[:4], "0", *argv[6:-6], "--output-dir", str(again), "--results-dir",
                       str(tmp_path / "results2"), "--results-name", "smoke", "--hosts", "vlt"]) == 0
    first = {(r["host"], r["head"], r["seed"]): r for r in document["runs"]}
    for record in json.loads((tmp_path / "results2" / "smoke.json").read_text())["runs"]:
        assert record["first_loss"] == first[(record["host"], record["head"], 0)]["first_loss"]
        assert record["final_loss"] == first[(record["host"], record["head"], 0)]["final_loss"]
    # A rerun of the same command reuses every finished run (nothing is trained again).
    monkeypatch.setattr(bench, "run_config", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert bench.main(argv) == 0
