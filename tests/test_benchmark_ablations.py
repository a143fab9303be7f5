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


def _metrics_row(split, step, miou, pr9=0.0):
    return json.dumps({"split": split, "step": step, "metrics": {"mIoU": miou, "Pr@0.9": pr9}})


def test_validation_curve_reads_the_runs_evaluations_of_one_split_in_step_order(load_benchmark, tmp_path):
    bench = load_benchmark("ablations")
    assert bench.validation_curve(tmp_path, "val") == []  # no metrics.jsonl
    rows = [_metrics_row("val", 1000, 40.0, 1.0), _metrics_row("testA", 500, 99.0),
            _metrics_row("val", 500, 30.0), "", _metrics_row("val", 1500, 45.5, 2.5)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    assert bench.validation_curve(tmp_path, "val") == [[500, 30.0, 0.0], [1000, 40.0, 1.0], [1500, 45.5, 2.5]]


def test_late_gain_is_the_miou_gained_over_the_last_part_of_the_budget(load_benchmark):
    bench = load_benchmark("ablations")
    curve = [[step, float(step) / 100, 0.0] for step in range(500, 6001, 500)]  # mIoU = step / 100
    assert bench.late_gain(curve, 1 / 6) == pytest.approx(60.0 - 50.0)  # from step 5000
    assert bench.late_gain(curve, 0.25) == pytest.approx(60.0 - 45.0)  # 4500
    assert bench.late_gain(curve, 0.1) == pytest.approx(60.0 - 50.0)  # 5400: the evaluation before it, 5000
    assert bench.late_gain([[600, 1.0, 0.0], [1200, 3.0, 0.0]], 1 / 6) == pytest.approx(2.0)  # 1000: step 600
    assert bench.late_gain([[6000, 60.0, 0.0]], 1 / 6) is None  # evaluated only at the end
    assert bench.late_gain([[5500, 1.0, 0.0], [6000, 2.0, 0.0]], 1 / 6) is None  # nothing as early as 5000


def test_tables_say_which_configurations_are_still_rising(load_benchmark, tmp_path, monkeypatch):
    bench = load_benchmark("ablations")
    gains = {"n8": (2.0, 3.0), "fixed": (0.2, 0.4)}  # per seed: n8 rises by 2.5 on average, fixed is flat

    def run_one(args, name, settings, seed):
        gain = gains[name][seed]
        curve = [[500, 10.0, 0.0], [2500, 50.0 - gain, 0.0], [3000, 50.0, 1.0]]
        return {"name": name, "seed": seed, "settings": settings, "status": "ok", "minutes": 1.0,
                "metrics": {key: 50.0 for key in bench.METRICS}, "train_args": {}, "curve": curve}

    monkeypatch.setattr(bench, "run_one", run_one)
    assert bench.main(["--configs", "n8", "fixed", "--seeds", "0", "1", "--steps", "3000",
                       "--results-dir", str(tmp_path), "--results-name", "t"]) == 0
    summary = json.loads((tmp_path / "t.json").read_text())["summary"]
    assert summary["n8"]["late_gain"] == pytest.approx(2.5) and summary["n8"]["late_gain_runs"] == 2
    assert summary["fixed"]["late_gain"] == pytest.approx(0.3)
    assert summary["fixed"]["late_gain_std"] == pytest.approx(0.02 ** 0.5)  # std of 0.2 and 0.4
    table = (tmp_path / "t.md").read_text()
    assert "## Convergence: val mIoU gained from step 2500" in table
    assert "| n8 | +2.50 ± 0.71 | 2 | still rising |" in table
    assert "| fixed | +0.30 ± 0.14 | 2 | flat |" in table


def test_no_convergence_section_when_runs_were_evaluated_only_at_the_end(load_benchmark, tmp_path, monkeypatch):
    bench = load_benchmark("ablations")
    monkeypatch.setattr(bench, "run_one", _fake_run(bench, {}, [0], [0]))  # records without curves
    assert bench.main(["--configs", "n8", "--results-dir", str(tmp_path), "--results-name", "t"]) == 0
    assert "Convergence" not in (tmp_path / "t.md").read_text()


def test_a_reused_record_from_before_curves_gets_its_curve_from_the_run(load_benchmark, tmp_path):
    bench = load_benchmark("ablations")
    args = bench.parse_args(["--configs", "n8", "--output-dir", str(tmp_path), "--steps", "20"])
    args.fingerprint = "code"
    settings = bench.all_configs([8], 8)["n8"]
    run_dir = tmp_path / "n8-seed0"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(_metrics_row("val", 10, 20.0) + "\n" + _metrics_row("val", 20, 25.0) + "\n")
    command = bench._comparable(bench.train_command(args, settings, run_dir, 0))
    old = {"name": "n8", "seed": 0, "command": command, "code": "code", "status": "ok",
           "metrics": {key: 25.0 for key in bench.METRICS}, "minutes": 1.0}
    (tmp_path / "n8-seed0.ablation.json").write_text(json.dumps(old))
    record = bench.run_one(args, "n8", settings, 0)  # reused: nothing is trained here
    assert record["curve"] == [[10, 20.0, 0.0], [20, 25.0, 0.0]]


def _record(bench, name, seed, miou, status="ok"):
    return {"name": name, "seed": seed, "status": status, "minutes": 1.0,
            "metrics": {key: miou for key in bench.METRICS}}


def test_paired_differences_say_which_differences_exceed_the_spread_over_seeds(load_benchmark):
    bench = load_benchmark("ablations")
    records = [_record(bench, "n8", s, v) for s, v in ((0, 60.0), (1, 64.0), (2, 62.0))]
    records += [_record(bench, "fixed", s, v) for s, v in ((0, 58.0), (1, 61.0), (2, 60.5))]  # -2, -3, -1.5
    records += [_record(bench, "n1", s, v) for s, v in ((0, 54.0), (1, 64.5), (2, 65.0))]  # -6, +0.5, +3
    records += [_record(bench, "n24", 1, 70.0), _record(bench, "n24", 3, 10.0)]  # seed 3 has no reference
    records += [_record(bench, "no-global", 0, 1.0, status="failed")]
    paired = bench.paired_differences(records, "n8")
    assert paired["fixed"]["differences"] == pytest.approx([-2.0, -3.0, -1.5])
    assert paired["fixed"]["mean"] == pytest.approx(-13 / 6) and paired["fixed"]["consistent"]
    assert paired["n1"]["seeds"] == [0, 1, 2] and not paired["n1"]["consistent"]  # mixed signs
    assert paired["n24"] == {"seeds": [1], "differences": [6.0], "mean": 6.0, "std": None, "consistent": False}
    assert "no-global" not in paired
    # one sign but the mean inside the differences' spread: not beyond it
    wide = [_record(bench, "n8", s, 50.0) for s in (0, 1, 2)] + [
        _record(bench, "fixed", s, v) for s, v in ((0, 50.1), (1, 50.1), (2, 58.0))]
    assert not bench.paired_differences(wide, "n8")["fixed"]["consistent"]
    lines = "\n".join(bench.paired_lines(paired, "n8"))
    assert "| fixed | -2.00 (s0), -3.00 (s1), -1.50 (s2) | -2.17 ± 0.76 | beyond the spread |" in lines
    assert "| n1 | -6.00 (s0), +0.50 (s1), +3.00 (s2) |" in lines and "within the spread" in lines
    assert "| n24 | +6.00 (s1) | +6.00 | one seed: an anecdote |" in lines
    assert bench.paired_lines({}, "n8") == []


def _finished(bench, args, name, seed, miou, output_dir):
    cmd = bench._comparable(bench.train_command(args, bench.all_configs(list(bench.DEFAULT_QUERIES), 8)[name], output_dir / f"{name}-seed{seed}", seed))
    return {**_record(bench, name, seed, miou), "command": cmd, "code": "oldcode" + "0" * 58}


def test_included_runs_join_the_tables_only_with_the_same_training_command(load_benchmark, tmp_path, monkeypatch, capsys):
    bench = load_benchmark("ablations")
    base = ["--preset", "demo", "--steps", "40", "--results-dir", str(tmp_path), "--train-args", "--eval-every", "20"]
    earlier_args = bench.parse_args(base)
    earlier = [_finished(bench, earlier_args, "n8", s, 60.0 + s, tmp_path / "old") for s in (0, 1)]
    earlier += [_finished(bench, earlier_args, "n24", 0, 99.0, tmp_path / "old")]  # this sweep trains it: not taken
    (tmp_path / "earlier.json").write_text(json.dumps({"meta": {}, "summary": {}, "runs": earlier}))
    monkeypatch.setattr(bench, "run_one", lambda args, name, settings, seed: _record(bench, name, seed, 63.0 + seed))
    argv = ["--configs", "n24", "--seeds", "0", "1", "--include-runs", str(tmp_path / "earlier.json"),
            "--results-name", "t"] + base
    assert bench.main(argv) == 0
    document = json.loads((tmp_path / "t.json").read_text())
    assert [(r["name"], r["seed"], r.get("included_from")) for r in document["runs"]] == [
        ("n24", 0, None), ("n24", 1, None), ("n8", 0, str(tmp_path / "earlier.json")), ("n8", 1, str(tmp_path / "earlier.json"))]
    assert document["summary"]["n8"]["mIoU"] == pytest.approx(60.5)
    assert document["paired"]["n24"]["differences"] == pytest.approx([3.0, 3.0])
    table = (tmp_path / "t.md").read_text()
    assert f"Included from `{tmp_path / 'earlier.json'}`" in table and "n8 seed 0, n8 seed 1" in table
    assert "trained by code oldcode00000" in table and "seed(s) 0, 1," in table
    # another budget: refused, naming both commands, and no table is written
    argv_other = ["--configs", "n24", "--seeds", "0", "--include-runs", str(tmp_path / "earlier.json"),
                  "--preset", "demo", "--steps", "80", "--results-dir", str(tmp_path), "--results-name", "u",
                  "--train-args", "--eval-every", "20"]
    assert bench.main(argv_other) == 2
    err = capsys.readouterr().err
    assert "run n8 seed 0 was trained with" in err and "--max-steps 40" in err and "--max-steps 80" in err
    assert not (tmp_path / "u.md").exists()
    (tmp_path / "notes.json").write_text("[1, 2]")
    assert bench.main(argv_other[:5] + [str(tmp_path / "notes.json")] + argv_other[6:]) == 2
    assert "not an ablation table of this script" in capsys.readouterr().err
