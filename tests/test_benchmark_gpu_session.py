"""benchmarks/gpu_session.sh: the prepared command for a GPU loan (checked on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"


def test_the_script_parses():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_smoke_run_brings_back_the_tables_and_the_runs(tmp_path):
    """SMOKE=1: every phase on the CPU with 4-step trainings; OUT must hold the bundles, the
    sweep's table must have every run, and the repository's own tables must stay untouched."""
    tables = sorted((ROOT / "benchmarks" / "results").glob("ablations_tiny*"))
    before = {p: p.read_bytes() for p in tables}
    out = tmp_path / "out"
    env = dict(os.environ, SMOKE="1", PYTHON=sys.executable, PHASES="tests sweep long demo",
               SWEEP_CONFIGS="n8 fixed", SWEEP_STEPS="3", CACHE_DIR=str(tmp_path / "synthetic"))
    done = subprocess.run(["bash", str(SCRIPT), str(out), "400"], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["results.tgz", "runs.tgz", "session.log"]
    with tarfile.open(out / "results.tgz") as bundle:
        names = bundle.getnames()
        sweep = json.load(bundle.extractfile("./ablations_tiny.json"))
    assert "./ablations_tiny_6000.json" in names and "./cuda_tests.txt" in names
    assert [(r["name"], r["status"]) for r in sweep["runs"]] == [("n8", "ok"), ("fixed", "ok")]
    assert sweep["meta"]["steps"] == 3  # SWEEP_STEPS sets the sweep's budget
    with tarfile.open(out / "runs.tgz") as bundle:
        runs = bundle.getnames()
    assert any(n.endswith("demo/noflip-s0/metrics.jsonl") for n in runs)
    assert not any(n.endswith(".safetensors") for n in runs)
    assert {p: p.read_bytes() for p in tables} == before


@pytest.mark.slow
def test_smoke_sweep_on_the_demo_preset(tmp_path):
    """SWEEP_PRESET=demo runs the sweep with ablations.py --preset demo (the demo's model and recipe)."""
    out = tmp_path / "out"
    env = dict(os.environ, SMOKE="1", PYTHON=sys.executable, PHASES="sweep", SWEEP_PRESET="demo",
               SWEEP_CONFIGS="n8 fixed", SWEEP_STEPS="3", SWEEP_NAME="ablations_demo_smoke",
               CACHE_DIR=str(tmp_path / "synthetic"))
    done = subprocess.run(["bash", str(SCRIPT), str(out), "300"], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with tarfile.open(out / "results.tgz") as bundle:
        sweep = json.load(bundle.extractfile("./ablations_demo_smoke.json"))
    assert sweep["meta"]["preset"] == "demo" and sweep["meta"]["steps"] == 3
    assert [(r["name"], r["status"]) for r in sweep["runs"]] == [("n8", "ok"), ("fixed", "ok")]
    assert not (ROOT / "benchmarks" / "results" / "ablations_demo_smoke.json").exists()
