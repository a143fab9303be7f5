"""benchmarks/ablations.py: the sweep's plan, its parallel runs and the tables over seeds."""

from __future__ import annotations

import json
import threading
import time

import pytest


def _fake_run(bench, delays, running, peak):
    """A run_one that sleeps instead of training and returns a record whose mIoU encodes its run."""
    lock = threading.Lock()

    def run_one(args, name, settings, seed):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(delays.get((name, seed), 0.0))
        with lock:
            running[0] -= 1
        value = 10.0 * settings["num_queries"] + seed + (5.0 if settings["head"] == "fixed" else 0.0)
        metrics = {key: value for key in bench.METRICS}
        metrics["num_samples"] = 7
        return {"name": name, "seed": seed, "settings": settings, "status": "ok", "minutes": 0.1,
                "metrics": metrics, "train_args": {"model": "tiny", "batch_size": 16}}

    return run_one


@pytest.mark.parametrize("jobs", [1, 2])
def test_parallel_sweep_gives_the_tables_of_the_plain_loop(tmp_path, monkeypatch, jobs, load_benchmark):
    bench = load_benchmark("ablations")
    running, peak = [0], [0]
    # The first planned run finishes last: the records must still come in plan order.
    delays = {("n8", 0): 0.3}
    monkeypatch.setattr(bench, "run_one", _fake_run(bench, delays, running, peak))
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    argv = ["--configs", "n8", "fixed", "n1", "--seeds", "0", "1", "--jobs", str(jobs),
            "--results-name", "t"]
    assert bench.main(argv) == 0
    document = json.loads((tmp_path / "t.json").read_text())
    assert [(r["name"], r["seed"]) for r in document["runs"]] == [
        (n, s) for s in (0, 1) for n in ("n8", "fixed", "n1")]
    summary = document["summary"]
    # mean and std over the two seeds (values 80 + seed, 85 + seed, 10 + seed)
    assert summary["n8"]["mIoU"] == pytest.approx(80.5) and summary["fixed"]["mIoU"] == pytest.approx(85.5)
    assert summary["n1"]["mIoU_std"] == pytest.approx(0.5 ** 0.5)
    assert peak[0] == jobs
    assert "| fixed kernel | 85.50 ± 0.71" in (tmp_path / "t.md").read_text()


def test_jobs_must_be_positive(load_benchmark):
    bench = load_benchmark("ablations")
    with pytest.raises(SystemExit):
        bench.parse_args(["--jobs", "0"])


def _command(bench, argv):
    args = bench.parse_args(argv)
    return bench.train_command(args, bench.all_configs([8], 8)["n8"], bench.ROOT / "runs" / "x", seed=0)


def _value(cmd, flag):
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


def test_presets_resolve_to_the_training_command(load_benchmark, tmp_path):
    bench = load_benchmark("ablations")
    tiny = _command(bench, [])  # no --data-root: the tiny preset, the measured protocol
    assert "--demo" not in tiny
    assert (_value(tiny, "--model"), _value(tiny, "--img-size"), _value(tiny, "--batch-size")) == ("tiny", "160", "16")
    assert _value(tiny, "--max-steps") == "3000"
    demo = _command(bench, ["--preset", "demo"])
    assert "--demo" in demo and _value(demo, "--max-steps") == "3276" and _value(demo, "--model") is None
    mine = _command(bench, ["--img-size", "128", "--steps", "40"])  # options beat the preset
    assert _value(mine, "--img-size") == "128" and _value(mine, "--max-steps") == "40"
    paper = _command(bench, ["--data-root", str(tmp_path), "--steps", "10"])
    assert "--demo" not in paper and _value(paper, "--model") is None and _value(paper, "--img-size") is None


def test_the_paper_preset_needs_a_budget(load_benchmark, tmp_path, capsys):
    bench = load_benchmark("ablations")
    with pytest.raises(SystemExit):
        bench.parse_args(["--data-root", str(tmp_path)])
    assert "--preset paper needs --steps" in capsys.readouterr().err


def test_results_dir_must_be_a_folder_and_receives_the_tables(load_benchmark, tmp_path, monkeypatch, capsys):
    bench = load_benchmark("ablations")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(SystemExit):
        bench.parse_args(["--results-dir", str(tmp_path / "file")])
    assert "--results-dir must be a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"
    monkeypatch.setattr(bench, "run_one", _fake_run(bench, {}, [0], [0]))
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "not-here")
    assert bench.main(["--configs", "n8", "--results-dir", str(tmp_path / "tables"), "--results-name", "t"]) == 0
    assert (tmp_path / "tables" / "t.md").is_file() and not (tmp_path / "not-here").exists()


def test_preset_values_are_not_replaced_silently_and_bad_values_are_refused(load_benchmark, capsys):
    bench = load_benchmark("ablations")
    for flag, value, message in (("--batch-size", "0", "--batch-size must be >= 1, got 0"),
                                 ("--img-size", "-32", "--img-size must be >= 1, got -32"),
                                 ("--lr", "0", "--lr must be > 0, got 0.0")):
        with pytest.raises(SystemExit):
            bench.parse_args([flag, value])
        assert message in capsys.readouterr().err
    assert _value(_command(bench, ["--batch-size", "4"]), "--batch-size") == "4"


def test_a_file_of_the_tables_name_that_the_script_did_not_write_is_never_overwritten(load_benchmark, tmp_path, capsys):
    bench = load_benchmark("ablations")
    (tmp_path / "notes.md").write_text("my notes")
    with pytest.raises(SystemExit):
        bench.parse_args(["--results-dir", str(tmp_path), "--results-name", "notes"])
    assert "notes.md exists and is not a table this script wrote" in capsys.readouterr().err
    (tmp_path / "other.json").write_text('{"mine": 1}')
    with pytest.raises(SystemExit):
        bench.parse_args(["--results-dir", str(tmp_path), "--results-name", "other"])
    assert (tmp_path / "notes.md").read_text() == "my notes" and (tmp_path / "other.json").read_text() == '{"mine": 1}'
    # the script's own tables (JSON with meta, summary, runs) are rewritten as before
    (tmp_path / "mine.json").write_text('{"meta": {}, "summary": {}, "runs": []}')
    (tmp_path / "mine.md").write_text("old table")
    assert bench.parse_args(["--results-dir", str(tmp_path), "--results-name", "mine"]).results_name == "mine"
