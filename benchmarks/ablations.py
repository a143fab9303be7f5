"""The paper's ablations (tables II-IV) at small scale, with the project's own training script.

Axis legend: n queries (the only tensor axis named here; the training script owns the rest).

Each configuration trains EAVL with ``examples/train_eavl.py`` (a subprocess per run, so that
every run starts from a clean process) on the same data, with the same seed and the same
number of optimizer steps, then evaluates the final model on the validation split:

- table II: n in {1, 4, 8, 16, 24} (aligner, estimator, F_g and F_s on);
- table III: the aligner vs the fixed-kernel head (``--head fixed``) at the reference n;
- table IV: without the Multi-Query Estimator (weights 1/n), without the global vision
  feature F_g, without the global text feature F_s, without both, at the reference n.

Presets (every option below overrides them):

- ``tiny`` (the default without ``--data-root``): ``examples/train_eavl.py --model tiny`` with
  its own defaults (the tiny default model and the ``scratch-small`` recipe, synthetic set)
  at 160 px, batch 16, ``--steps 3000``: the budget of the project's tiny reference run. On one
  H200, 18 runs (6 configurations x 3 seeds) took about 10 minutes of two calls of
  ``benchmarks/gpu_session.sh`` (``--device cuda``, 4-7 runs at a time, 2.6-3.1 min a run); on a
  2-core CPU a run takes about 30 minutes alone.
- ``demo``: ``examples/train_eavl.py --demo`` (the ten-minute CPU demo's model, recipe and
  input size), ``--steps 3276`` (its 14 epochs).
- ``paper`` (the default with ``--data-root``): the training script's defaults (Swin-B +
  BERT-base, the paper's recipe); ``--steps`` must be given.

The reference configuration is not converged at 3,000 steps (its curve at twice the budget
keeps rising: ``benchmarks/results/ablations_tiny_6000.md``); the tables compare every
configuration at the same budget, and say so. With ``--train-args --eval-every K`` every run
is also evaluated along the way, and the tables gain a convergence section: the val mIoU each
configuration gained over the last sixth of the budget (mean ± std over seeds), "still
rising" above one point. Examples::

    python benchmarks/ablations.py --list                           # the configurations
    python benchmarks/ablations.py --device cuda --jobs 7 --seeds 0 1 2 \\
        --configs n8 fixed n1 no-estimator n24 no-global             # the measured sweep
    python benchmarks/ablations.py --steps 5 --configs n1 fixed --results-name ablations_smoke
    python benchmarks/ablations.py --preset demo --jobs 2 --threads 1 --seeds 0 1 2  # CPU, demo size
    python benchmarks/ablations.py --model swin-b --pretrained --device cuda --amp bf16 \\
        --data-root data --dataset refcoco+ --img-size 480 --batch-size 32 --lr 5e-5 \\
        --steps 94000 --reference-queries 24 --num-workers 8
    python benchmarks/ablations.py ... --train-args --eval-every 1000  # anything for train_eavl.py

Runs go to ``--output-dir`` (default ``runs/ablations``), one folder per configuration and
seed; a finished run whose command and code (training script, package) have not changed is
reused, so an interrupted sweep continues where it stopped (``--rerun`` forces it). The
tables are rewritten after every run to ``benchmarks/results/<results-name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.machine_info import describe_machine  # noqa: E402

TRAIN_SCRIPT = ROOT / "examples" / "train_eavl.py"
RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("mIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9", "oIoU")
DEFAULT_QUERIES = (1, 4, 8, 16, 24)
#: The tables' convergence check: the mIoU gained over this last part of each run's budget.
LATE_FRACTION = 1 / 6
#: A configuration whose mean gain over that last part exceeds this (points) is "still rising".
FLAT_GAIN = 1.0
#: What each preset sets on the training command line (demo: --demo does it; paper: nothing).
PRESET_DEFAULTS: Dict[str, Dict[str, Any]] = {"tiny": {"model": "tiny", "img_size": 160, "batch_size": 16}}
#: Optimizer steps per run when --steps is not given (paper: required).
PRESET_STEPS: Dict[str, int] = {"tiny": 3000, "demo": 3276}
# The switches of table IV; each maps onto a flag of examples/train_eavl.py.
SWITCH_CONFIGS: Dict[str, Dict[str, Any]] = {
    "fixed": {"head": "fixed"},
    "no-estimator": {"use_estimator": False},
    "no-global-vision": {"use_global_vision": False},
    "no-global-text": {"use_global_text": False},
    "no-global": {"use_global_vision": False, "use_global_text": False},
}


# ---------------------------------------------------------------------------- configurations
def all_configs(queries: List[int], reference: int) -> Dict[str, Dict[str, Any]]:
    """Name -> model settings, in table order. The n = reference run is every table's baseline."""
    base = {"num_queries": reference, "head": "aligner", "use_estimator": True,
            "use_global_vision": True, "use_global_text": True}
    configs = {f"n{n}": {**base, "num_queries": n} for n in sorted(set(queries) | {reference})}
    for name, change in SWITCH_CONFIGS.items():
        configs[name] = {**base, **change}
    return configs


def model_flags(settings: Dict[str, Any]) -> List[str]:
    flags = ["--num-queries", str(settings["num_queries"]), "--head", settings["head"]]
    if not settings["use_estimator"]:
        flags.append("--no-estimator")
    if not settings["use_global_vision"]:
        flags.append("--no-global-vision")
    if not settings["use_global_text"]:
        flags.append("--no-global-text")
    return flags


def train_command(args: argparse.Namespace, settings: Dict[str, Any], run_dir: Path, seed: int) -> List[str]:
    """The examples/train_eavl.py command line of one run (same budget for every configuration)."""
    # The preset gives everything not set here (the demo's batch, lr, input size, ... as the
    # training script's author tuned them), identically for every configuration.
    cmd = [sys.executable, str(TRAIN_SCRIPT)] + (["--demo"] if args.preset == "demo" else []) + [
        "--max-steps", str(args.steps),
        # Enough epochs that --max-steps is what ends every run (and sets the lr schedule).
        "--epochs", str(10**6),
        "--seed", str(seed),
        "--output-dir", str(run_dir),
        "--overwrite", "--no-progress",
        # Evaluate once, at the end: the numbers in the table are those of the final model.
        "--eval-every", str(args.steps),
        "--log-every", str(max(1, args.steps // 10)),
        "--val-split", args.val_split,
        "--dataset", args.dataset,
        "--amp", args.amp,
    ] + model_flags(settings)
    preset = PRESET_DEFAULTS.get(args.preset, {})
    def given_or_preset(name: str):
        value = getattr(args, name)
        return preset.get(name) if value is None else value

    for flag, value in (("--model", given_or_preset("model")),
                        ("--batch-size", given_or_preset("batch_size")), ("--lr", args.lr),
                        ("--img-size", given_or_preset("img_size")), ("--device", args.device)):
        if value is not None:
            cmd += [flag, str(value)]
    if args.pretrained:
        cmd.append("--pretrained")
    if args.split_by is not None:
        cmd += ["--split-by", args.split_by]
    if args.data_root is not None:
        cmd += ["--data-root", str(args.data_root)]
    else:
        if args.synthetic_images is not None:
            cmd += ["--synthetic-images", str(args.synthetic_images)]
        if args.cache_dir is not None:
            cmd += ["--cache-dir", str(args.cache_dir)]
    for flag, value in (("--threads", args.threads), ("--num-workers", args.num_workers),
                        ("--val-samples", args.val_samples), ("--train-samples", args.train_samples),
                        ("--eval-batch-size", args.eval_batch_size)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd + list(args.train_args)


# ---------------------------------------------------------------------------- running
def _comparable(cmd: List[str]) -> List[str]:
    # The interpreter path may differ between machines without changing the run.
    return [Path(cmd[1]).name] + cmd[2:]


def code_fingerprint() -> str:
    """SHA-256 of the training script and the package sources: a finished run is reused only
    when neither changed (a preset or a model tuned since would otherwise go unnoticed)."""
    digest = hashlib.sha256()
    for path in [TRAIN_SCRIPT] + sorted((ROOT / "vlaligner").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def final_metrics(run_dir: Path, split: str) -> Optional[dict]:
    """The last evaluation of ``split`` in the run's metrics.jsonl, or None."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("split") == split]
    return rows[-1] if rows else None


def validation_curve(run_dir: Path, split: str) -> List[List[float]]:
    """``[[step, mIoU, Pr@0.9], ...]`` of every evaluation of ``split`` in the run's
    metrics.jsonl, in step order (empty without the file). With ``--train-args --eval-every K``
    a run evaluates every K steps, and the tables can say whether it was still learning."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    points = {int(r["step"]): [int(r["step"]), float(r["metrics"]["mIoU"]), float(r["metrics"]["Pr@0.9"])]
              for r in rows if r.get("split") == split and "step" in r and "metrics" in r}
    return [points[step] for step in sorted(points)]


def late_gain(curve: List[List[float]], fraction: float = LATE_FRACTION) -> Optional[float]:
    """mIoU gained over the last ``fraction`` of the run: the final evaluation's mIoU minus that
    of the latest evaluation at or before ``final step x (1 - fraction)``. None when the curve
    has no evaluation that early (a run evaluated only at its end).

    ``curve``: ``[[step, mIoU, ...], ...]`` in step order (``validation_curve``)."""
    if len(curve) < 2:
        return None
    final_step, final_miou = curve[-1][0], curve[-1][1]
    start = final_step * (1.0 - fraction)
    earlier = [point for point in curve[:-1] if point[0] <= start]
    return None if not earlier else final_miou - earlier[-1][1]


def run_one(args: argparse.Namespace, name: str, settings: Dict[str, Any], seed: int) -> dict:
    """Train + evaluate one configuration (or reuse a finished identical run)."""
    run_dir = Path(args.output_dir) / f"{name}-seed{seed}"
    record_path = run_dir.with_name(run_dir.name + ".ablation.json")  # beside the run, as its log
    cmd = train_command(args, settings, run_dir, seed)
    if record_path.is_file() and not args.rerun:
        record = json.loads(record_path.read_text())
        same = record.get("command") == _comparable(cmd) and record.get("code") == args.fingerprint
        if same and record.get("status") == "ok":
            print(f"[{name} seed {seed}] reusing {run_dir} (same command and code; --rerun to train again)",
                  flush=True)
            if "curve" not in record:  # a record from before curves were kept
                record["curve"] = validation_curve(run_dir, args.val_split)
            return record
    if args.dry_run:
        print(" ".join(cmd))
        return {"name": name, "seed": seed, "status": "dry-run"}
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    # Beside the run folder, not in it: a training run refuses a folder holding files it did not write.
    stdout_log = run_dir.with_name(run_dir.name + ".stdout.log")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    print(f"[{name} seed {seed}] training: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    with open(stdout_log, "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT)).returncode
    minutes = (time.perf_counter() - t0) / 60
    row = final_metrics(run_dir, args.val_split)
    try:  # the settings the run really used (preset values included)
        used = json.loads((run_dir / "last" / "training_state.json").read_text())["args"]
        used = {k: used.get(k) for k in ("model", "batch_size", "lr", "recipe", "optimizer", "img_size", "max_steps", "augment",
                                         "synthetic_images", "dataset", "device", "amp", "dice_weight",
                                         "threads", "num_workers")}
    except (OSError, ValueError, KeyError):
        used = None
    record = {
        "name": name, "seed": seed, "settings": settings, "command": _comparable(cmd), "code": args.fingerprint,
        "minutes": minutes, "returncode": code, "run_dir": str(run_dir),
        "status": "ok" if code == 0 and row is not None else "failed",
        "metrics": row["metrics"] if row else None, "step": row["step"] if row else None,
        "train_args": used, "curve": validation_curve(run_dir, args.val_split),
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    if record["status"] != "ok":
        tail = stdout_log.read_text().splitlines()[-15:]
        print(f"[{name} seed {seed}] FAILED (exit {code}); last lines of {stdout_log}:",
              *tail, sep="\n  ", flush=True)
    else:
        m = record["metrics"]
        print(f"[{name} seed {seed}] {minutes:.1f} min: mIoU {m['mIoU']:.2f} oIoU {m['oIoU']:.2f} "
              f"Pr@0.5 {m['Pr@0.5']:.2f} Pr@0.9 {m['Pr@0.9']:.2f}", flush=True)
    return record


def _without_output_dir(command: List[str]) -> List[str]:
    out = list(command)
    if "--output-dir" in out and out.index("--output-dir") + 1 < len(out):
        out[out.index("--output-dir") + 1] = "<output-dir>"
    return out


def included_runs(args: argparse.Namespace, configs: Dict[str, Dict[str, Any]],
                  planned: List[Tuple[int, str]]) -> List[dict]:
    """The finished runs of ``--include-runs`` files that this sweep does not train itself.

    A run is taken when its configuration is known here and its training command equals the
    one this sweep would run for it but for ``--output-dir``; a run of the same configuration
    and seed with another command (budget, preset, flags) is refused with ``ValueError``
    naming both commands, since mixing it in would compare unlike runs. Each taken record gains
    ``included_from`` (the file)."""
    taken: Dict[Tuple[str, int], dict] = {}
    for path in args.include_runs:
        try:
            document = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"--include-runs {path}: not a readable ablation table ({err})") from None
        if not (isinstance(document, dict) and isinstance(document.get("runs"), list)):
            raise ValueError(f"--include-runs {path}: not an ablation table of this script (no 'runs' list)")
        for record in document["runs"]:
            key = (record.get("name"), record.get("seed"))
            if record.get("status") != "ok" or key[0] not in configs or (key[1], key[0]) in planned or key in taken:
                continue
            mine = _without_output_dir(_comparable(train_command(args, configs[key[0]], Path("x"), key[1])))
            theirs = _without_output_dir(record.get("command") or [])
            if mine != theirs:
                raise ValueError(
                    f"--include-runs {path}: run {key[0]} seed {key[1]} was trained with {' '.join(theirs)}, "
                    f"this sweep trains {' '.join(mine)}; only runs of the same command can share the tables")
            taken[key] = {**record, "included_from": str(path)}
    return list(taken.values())


# ---------------------------------------------------------------------------- tables
def aggregate(records: List[dict]) -> Dict[str, dict]:
    """Per configuration: mean (and std over seeds) of every metric, and the minutes."""
    out: Dict[str, dict] = {}
    for name in dict.fromkeys(r["name"] for r in records):
        ok = [r for r in records if r["name"] == name and r.get("status") == "ok"]
        if not ok:
            out[name] = {"seeds": 0}
            continue
        entry: Dict[str, Any] = {"seeds": len(ok), "minutes": statistics.mean(r["minutes"] for r in ok)}
        gains = [g for g in (late_gain(r.get("curve") or []) for r in ok) if g is not None]
        if gains:  # runs evaluated along the way (--train-args --eval-every K)
            entry["late_gain"] = statistics.mean(gains)
            entry["late_gain_std"] = statistics.stdev(gains) if len(gains) > 1 else None
            entry["late_gain_runs"] = len(gains)
        for key in METRICS + ("num_samples",):
            values = [float(r["metrics"][key]) for r in ok if key in r["metrics"]]
            if values:
                entry[key] = statistics.mean(values)
                entry[key + "_std"] = statistics.stdev(values) if len(values) > 1 else None
        out[name] = entry
    return out


def paired_differences(records: List[dict], reference: str, metric: str = "mIoU") -> Dict[str, dict]:
    """Per configuration other than ``reference``: ``metric`` minus the reference's at the same
    seed, over the seeds both finished (a seed's data order and initialisation are shared, so
    the pairing removes the part of the spread that comes from the seed).

    Returns name -> {"seeds", "differences" (in seed order), "mean", "std" (None for one seed),
    "consistent"}. ``consistent``: at least two seeds, every difference of one sign, and the
    mean's size beyond the differences' std; otherwise the difference is within the spread
    over seeds and says nothing."""
    ok = [r for r in records if r.get("status") == "ok" and r.get("metrics")]
    ref = {r["seed"]: float(r["metrics"][metric]) for r in ok if r["name"] == reference}
    out: Dict[str, dict] = {}
    for name in dict.fromkeys(r["name"] for r in ok if r["name"] != reference):
        mine = {r["seed"]: float(r["metrics"][metric]) for r in ok if r["name"] == name}
        seeds = sorted(set(mine) & set(ref))
        if not seeds:
            continue
        diffs = [mine[seed] - ref[seed] for seed in seeds]
        mean = statistics.mean(diffs)
        std = statistics.stdev(diffs) if len(diffs) > 1 else None
        one_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
        out[name] = {"seeds": seeds, "differences": diffs, "mean": mean, "std": std,
                     "consistent": bool(std is not None and one_sign and abs(mean) > std)}
    return out


def paired_lines(paired: Dict[str, dict], reference: str) -> List[str]:
    """The tables' section on differences from the reference, paired by seed."""
    if not paired:
        return []
    lines = ["", f"## Differences from {reference}, paired by seed (mIoU points)", "",
             "| configuration | per seed | mean ± std | |", "|---|---|---|---|"]
    for name, entry in paired.items():
        per_seed = ", ".join(f"{d:+.2f} (s{seed})" for seed, d in zip(entry["seeds"], entry["differences"]))
        mean = f"{entry['mean']:+.2f}" + (f" ± {entry['std']:.2f}" if entry["std"] is not None else "")
        verdict = ("beyond the spread" if entry["consistent"] else
                   "one seed: an anecdote" if entry["std"] is None else "within the spread")
        lines.append(f"| {name} | {per_seed} | {mean} | {verdict} |")
    lines += ["", "'Beyond the spread': every seed's difference has the same sign and the mean exceeds the "
                  "differences' std. Anything else says nothing at this number of seeds."]
    return lines


def _cells(entry: Optional[dict]) -> str:
    if not entry or not entry.get("seeds"):
        return " | ".join(["not run"] * len(METRICS)) + " | - |"
    cells = []
    for key in METRICS:
        std = entry.get(key + "_std")
        cells.append(f"{entry[key]:.2f}" + (f" ± {std:.2f}" if std is not None else ""))
    return " | ".join(cells) + f" | {entry['minutes']:.1f} |"


def foreign_results(folder: Path, name: str) -> Optional[Path]:
    """The first of ``<folder>/<name>.md`` / ``.json`` that exists but is not an ablation table.

    The tables are rewritten as runs finish; a file of that name that this script did not
    write (its JSON is not ``{"meta", "summary", "runs"}``) is never overwritten.
    """
    md, js = folder / f"{name}.md", folder / f"{name}.json"
    if js.exists():
        try:
            data = json.loads(js.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return js
        if not (isinstance(data, dict) and {"meta", "summary", "runs"} <= set(data)):
            return js
    elif md.exists():
        return md
    return None


def _preset_words(preset: str) -> str:
    return {"demo": "train_eavl.py --demo", "tiny": "train_eavl.py --model tiny with its defaults (no --demo)",
            "paper": "train_eavl.py's defaults (no --demo)"}.get(preset, f"preset {preset}")


def included_lines(meta: dict) -> List[str]:
    """The tables' lines naming the runs ``--include-runs`` brought in (none: no lines)."""
    lines = [
        f"Included from `{item['file']}` (the same training command but for the output folder; trained by "
        f"code {', '.join(c[:12] for c in item['code'])}, this sweep's code is {str(meta.get('code', '?'))[:12]}): "
        + ", ".join(f"{name} seed {seed}" for name, seed in item["runs"]) + ".  "
        for item in meta.get("included", [])
    ]
    return lines + [""] if lines else []


def markdown(summary: Dict[str, dict], configs: Dict[str, Dict[str, Any]], meta: dict,
             paired: Optional[Dict[str, dict]] = None) -> str:
    ref = meta["reference_queries"]
    used = meta.get("used") or {}  # what the runs really used (the preset's values included)
    data = meta["data"]
    loss = f"BCE + {used['dice_weight']:g} x Dice" if used.get("dice_weight") else "BCE"
    if meta["data"] == "synthetic" and used.get("synthetic_images"):
        data = f"synthetic RefCOCO-layout set ({used['synthetic_images']} images, generation seed 0)"
    head = "| " + " | ".join(METRICS) + " | train+eval min |"
    sep = "|---" * (len(METRICS) + 1) + "|"  # metric columns + minutes; callers add the label columns
    samples = next((e.get("num_samples") for e in summary.values() if e.get("num_samples")), None)
    lines = [
        "# Ablations at small scale (paper tables II-IV)", "",
        f"Command: `{meta['command']}`  ",
        f"Setting: {_preset_words(meta['preset'])}: model `{used.get('model')}`, {data}, "
        f"{meta['steps']} optimizer steps of batch {used.get('batch_size')} (recipe {used.get('recipe')}: "
        f"{used.get('optimizer')}, lr {used.get('lr')}, poly decay), loss {loss}, "
        f"input {used.get('img_size')}, augmentation {'on' if used.get('augment') else 'off'}, "
        f"{used.get('threads') or 'default'} thread(s), seed(s) "
        f"{', '.join(map(str, meta['seeds']))}, device {used.get('device')}. Every configuration: same data, "
        f"same seed, same steps. Metrics (percent) of the final model on `{meta['val_split']}`"
        + (f" ({int(samples)} sentences)" if samples else "") + "; ± is the std over seeds.  ",
        f"Machine: {meta['machine']}; torch {meta['torch']}; load average at start {meta['loadavg']}.", "",
    ] + included_lines(meta) + [
        "## Table II: number of queries n (aligner with estimator, F_g and F_s)", "",
        "| n " + head, "|---" + sep,
    ]
    # Rows: the configurations of this invocation, plus the reference run every table compares with.
    shown = [name for name in configs if name in summary or name == f"n{ref}"]
    for name in shown:
        if name.startswith("n") and name[1:].isdigit():
            lines.append(f"| {configs[name]['num_queries']} | {_cells(summary.get(name))}")
    lines += ["", f"## Table III: Vision-Language Aligner vs fixed kernel (n = {ref})", "",
              "| head " + head, "|---" + sep]
    if "fixed" in shown:
        lines.append(f"| fixed kernel | {_cells(summary.get('fixed'))}")
    lines += [f"| aligner | {_cells(summary.get(f'n{ref}'))}",
              "", f"## Table IV: estimator and global features (n = {ref})", "",
              "| estimator | F_g | F_s " + head, "|---|---|---" + sep]
    yes, no = "✓", "-"
    for name in ("no-estimator", "no-global-vision", "no-global-text", "no-global", f"n{ref}"):
        if name not in shown:
            continue
        s = configs[name]
        lines.append(f"| {yes if s['use_estimator'] else no} | {yes if s['use_global_vision'] else no} | "
                     f"{yes if s['use_global_text'] else no} | {_cells(summary.get(name))}")
    lines += paired_lines(paired or {}, f"n{ref}")
    lines += convergence_lines(summary, [name for name in shown if name in summary], meta["steps"])
    lines += ["", "Paper (Swin-B + BERT-base, RefCOCO+ val, 25 epochs): more queries help up to n = 24, "
              "the aligner beats the fixed kernel at every n, removing the estimator costs 1.02 points, "
              "and removing F_g or F_s (worst: both) lowers every metric. At this scale differences "
              "smaller than the spread over seeds say nothing."]
    return "\n".join(lines) + "\n"


def convergence_lines(summary: Dict[str, dict], names: List[str], steps: int) -> List[str]:
    """The tables' convergence section: per configuration, the mIoU gained over the last
    ``LATE_FRACTION`` of the budget (mean ± std over seeds); nothing when no run was evaluated
    along the way."""
    rows = [(name, summary[name]) for name in names if summary[name].get("late_gain") is not None]
    if not rows:
        return []
    start = int(round(steps * (1 - LATE_FRACTION)))
    lines = ["", f"## Convergence: val mIoU gained from step {start} (or the evaluation before it) "
                 f"to step {steps}", "",
             "| configuration | gain (points) | runs | |", "|---|---|---|---|"]
    for name, entry in rows:
        std = entry.get("late_gain_std")
        rising = entry["late_gain"] > FLAT_GAIN
        lines.append(f"| {name} | {entry['late_gain']:+.2f}" + (f" ± {std:.2f}" if std is not None else "")
                     + f" | {entry['late_gain_runs']} | {'still rising' if rising else 'flat'} |")
    lines += ["", f"'Still rising': a mean gain over {FLAT_GAIN:g} point over the last "
                  f"{steps - start} steps; such a configuration has not converged at this budget, "
                  "and a longer one may change the comparison."]
    return lines


# ---------------------------------------------------------------------------- main
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=None,
                   help="configurations to run (default: all; see --list)")
    p.add_argument("--list", action="store_true", help="print the configurations and exit")
    p.add_argument("--queries", type=int, nargs="+", default=list(DEFAULT_QUERIES), help="n of table II")
    p.add_argument("--reference-queries", type=int, default=8,
                   help="n of the baseline that tables III-IV compare against (paper: 24)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per run, the budget (default: tiny 3000, demo 3276; paper: required)")
    p.add_argument("--preset", choices=("tiny", "demo", "paper"), default=None,
                   help="what every option not given here defaults to: tiny (train_eavl.py --model tiny at "
                        "160 px, batch 16; the default without --data-root), demo (train_eavl.py --demo) or "
                        "paper (train_eavl.py's defaults; the default with --data-root)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: the preset's)")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the preset's)")
    p.add_argument("--model", choices=("tiny", "swin-b"), default=None, help="default: the preset's")
    p.add_argument("--pretrained", action="store_true", help="Swin-B / BERT weights available offline")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the preset's; demo: cpu)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed and configuration")
    p.add_argument("--data-root", type=Path, default=None, help="real data (refer layout); default synthetic")
    p.add_argument("--dataset", default="refcoco")
    p.add_argument("--split-by", default=None)
    p.add_argument("--val-split", default="val")
    p.add_argument("--synthetic-images", type=int, default=None, help="size of the generated set (default: the preset's)")
    p.add_argument("--cache-dir", type=Path, default=None, help="where the synthetic set is generated")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per run")
    p.add_argument("--num-workers", type=int, default=None, help="data loader workers per run")
    p.add_argument("--val-samples", type=int, default=None, help="evaluate on the first N samples only")
    p.add_argument("--train-samples", type=int, default=None)
    p.add_argument("--eval-batch-size", type=int, default=None)
    p.add_argument("--output-dir", type=Path, default=ROOT / "runs" / "ablations")
    p.add_argument("--results-name", default="ablations", help="the tables' file name: <results-dir>/<name>.md and .json")
    p.add_argument("--results-dir", type=Path, default=None, help="where the tables go (default benchmarks/results)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at the same time (one subprocess each; with --threads 1, up to "
                        "the number of cores). The tables do not depend on it")
    p.add_argument("--include-runs", type=Path, nargs="+", default=[], metavar="JSON",
                   help="tables of earlier sweeps (their .json): their finished runs of configurations and "
                        "seeds this sweep does not train join the tables, when their training command is "
                        "this sweep's but for the output folder; the tables name the file and the code "
                        "that trained them")
    p.add_argument("--rerun", action="store_true", help="train again even when an identical run finished")
    p.add_argument("--dry-run", action="store_true", help="print the training commands only")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                   help="everything after this goes to examples/train_eavl.py unchanged")
    args = p.parse_args(argv)
    if args.preset is None:
        args.preset = "tiny" if args.data_root is None else "paper"
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.results_dir is not None and args.results_dir.exists() and not args.results_dir.is_dir():
        p.error(f"--results-dir must be a folder (made if missing), got the file {args.results_dir}")
    foreign = foreign_results(args.results_dir or RESULTS, args.results_name)
    if foreign:
        p.error(f"{foreign} exists and is not a table this script wrote (no ablation JSON beside it); "
                "choose another --results-name or --results-dir")
    for name in ("batch_size", "img_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr is not None and not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if args.steps is None:
        if args.preset not in PRESET_STEPS:
            p.error(f"--preset {args.preset} needs --steps (the budget of every run)")
        args.steps = PRESET_STEPS[args.preset]
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if any(n < 1 for n in args.queries + [args.reference_queries]):
        p.error(f"query counts must be >= 1, got {args.queries} and {args.reference_queries}")
    configs = all_configs(args.queries, args.reference_queries)
    unknown = [c for c in (args.configs or []) if c not in configs]
    if unknown:
        p.error(f"unknown configuration(s) {unknown}; known: {', '.join(configs)}")
    if not TRAIN_SCRIPT.is_file():
        p.error(f"the training script {TRAIN_SCRIPT} is missing")
    args.fingerprint = code_fingerprint()
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    configs = all_configs(args.queries, args.reference_queries)
    if args.list:
        for name, settings in configs.items():
            print(f"{name:>18}: {' '.join(model_flags(settings))}")
        return 0
    chosen = args.configs or list(configs)
    import torch  # only for the record of the environment

    meta = {
        "command": "python benchmarks/ablations.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "preset": args.preset, "steps": args.steps, "seeds": args.seeds, "device": args.device,
        "val_split": args.val_split, "reference_queries": args.reference_queries, "used": None,
        "data": f"{args.dataset} from {args.data_root}" if args.data_root is not None else "synthetic",
        # The GPU's name where the runs use one (the training script's "auto" picks CUDA when
        # present, except with --demo, which trains on the CPU).
        "machine": (torch.cuda.get_device_name(0) if torch.cuda.is_available() and (
                    (args.device or "").startswith("cuda") or (args.device in (None, "auto") and args.preset != "demo"))
                    else describe_machine()),
        "torch": torch.__version__,
        "loadavg": "%.1f %.1f %.1f" % os.getloadavg() if hasattr(os, "getloadavg") else "n/a",
        "code": getattr(args, "fingerprint", None),
    }
    t0 = time.perf_counter()
    plan = [(seed, name) for seed in args.seeds for name in chosen]
    try:
        included = included_runs(args, configs, plan)
    except ValueError as err:
        print(f"ablations.py: error: {err}", file=sys.stderr)
        return 2
    if included:  # the tables' seeds are those of every run in them
        meta["seeds"] = sorted(set(args.seeds) | {r["seed"] for r in included})
        meta["included"] = [
            {"file": str(path), "runs": [[r["name"], r["seed"]] for r in included if r["included_from"] == str(path)],
             "code": sorted({r.get("code", "?") for r in included if r["included_from"] == str(path)})}
            for path in dict.fromkeys(r["included_from"] for r in included)]
    # One slot per planned run, in (seed, configuration) order whatever order they finish in.
    done: Dict[int, dict] = {}

    def record_finished(index: int, record: dict) -> None:
        done[index] = record
        if meta["used"] is None and record.get("train_args"):
            meta["used"] = record["train_args"]
        if args.dry_run:
            return
        records = [done[i] for i in sorted(done)] + included
        results = args.results_dir or RESULTS
        results.mkdir(parents=True, exist_ok=True)
        paired = paired_differences(records, f"n{args.reference_queries}")
        (results / f"{args.results_name}.md").write_text(markdown(aggregate(records), configs, meta, paired))
        (results / f"{args.results_name}.json").write_text(json.dumps(
            {"meta": meta, "summary": aggregate(records), "paired": paired, "runs": records}, indent=2) + "\n")

    if args.jobs == 1 or args.dry_run:
        for index, (seed, name) in enumerate(plan):
            record_finished(index, run_one(args, name, configs[name], seed))
    else:
        # Threads only wait on the training subprocesses; the tables are written here, one at a time.
        from concurrent.futures import ThreadPoolExecutor, as_completed

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(run_one, args, name, configs[name], seed): index
                       for index, (seed, name) in enumerate(plan)}
            for future in as_completed(futures):
                record_finished(futures[future], future.result())
    records = [done[i] for i in sorted(done)] + included
    if args.dry_run:
        return 0
    print(markdown(aggregate(records), configs, meta, paired_differences(records, f"n{args.reference_queries}")))
    print(f"{len(records)} runs in {(time.perf_counter() - t0) / 60:.1f} min; wrote "
          f"{(args.results_dir or RESULTS) / (args.results_name + '.md')} and .json")
    return 0 if all(r.get("status") == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
