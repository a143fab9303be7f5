"""The wheel installs into a fresh virtual environment with only torch, einops and numpy.

This proves the extras are really optional: the aligner core imports and runs without
timm, transformers, pycocotools or PIL. It builds the wheel from this checkout, creates a
new venv (no system site-packages), installs torch + einops + numpy and the wheel, and runs
the three modules there. It needs a torch wheel pip can install quickly without the internet:
the CPU wheel in pip's configured find-links (as on the project's CI machine), or any torch
when ``VLALIGNER_PACKAGING_TORCH`` names a requirement (e.g. ``torch==2.5.1``); else skipped.
"""

import glob
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _torch_requirement():
    if os.environ.get("VLALIGNER_PACKAGING_TORCH"):
        return os.environ["VLALIGNER_PACKAGING_TORCH"]
    wheels = sorted(glob.glob("/opt/wheels/torch-*+cpu-*.whl"))
    return wheels[-1] if wheels else None


def _run(cmd, **kw):
    result = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_wheel_installs_and_core_runs_without_extras(tmp_path):
    torch_req = _torch_requirement()
    if torch_req is None:
        pytest.skip("no local torch wheel; set VLALIGNER_PACKAGING_TORCH to run this test")
    wheel_dir = tmp_path / "wheel"
    _run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir)])
    wheel = next(wheel_dir.glob("vlaligner-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py = venv / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "-q", torch_req, "einops", "numpy"])
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)])
    script = textwrap.dedent(
        """
        import importlib.util, torch
        import vlaligner
        from vlaligner import MultiQueryGenerator, MultiMaskGenerator, MultiQueryEstimator, VisionLanguageAligner
        for extra in ("timm", "transformers", "pycocotools", "PIL", "safetensors"):
            assert importlib.util.find_spec(extra) is None, extra + " should not be installed here"
        gen = MultiQueryGenerator(vision_channels=(4, 8, 16), text_dim=6, dim=8, num_queries=3, grid_size=(2, 2))
        feats = [torch.randn(1, 4, 8, 8), torch.randn(1, 8, 4, 4), torch.randn(1, 16, 2, 2)]
        queries = gen(feats, torch.randn(1, 5, 6), torch.ones(1, 5, dtype=torch.bool))
        out = VisionLanguageAligner(in_channels=8, query_dim=8, num_heads=2)(torch.randn(1, 8, 4, 4), queries)
        masks = MultiMaskGenerator(in_channels=8, query_dim=8)(torch.randn(1, 8, 4, 4), queries)
        scores = MultiQueryEstimator(query_dim=8, num_heads=2)(queries)
        assert out.logits.shape == (1, 1, 4, 4) and masks.shape == (1, 3, 4, 4) and scores.shape == (1, 3)
        import vlaligner.metrics  # numpy + torch only
        print("core-ok", vlaligner.__version__)
        """
    )
    result = _run([str(py), "-c", script], cwd=tmp_path)
    assert "core-ok" in result.stdout


def test_vlaligner_train_and_evaluate_run_from_the_installed_wheel(tmp_path):
    """``vlaligner train`` / ``evaluate`` need no checkout: the wheel alone, run from elsewhere.

    The wheel goes into a fresh venv's site-packages; the extras (torch, timm, transformers,
    ...) come from this environment's site-packages through a ``.pth`` line (not a site dir,
    so this checkout's editable install is not picked up). The run is in ``tmp_path``, far
    from the repository, and ``vlaligner`` must be imported from the venv.
    """
    import site
    import sysconfig

    pytest.importorskip("timm")
    pytest.importorskip("pycocotools")
    wheel_dir = tmp_path / "wheel"
    _run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir)])
    wheel = next(wheel_dir.glob("vlaligner-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    venv_site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(venv_site), str(wheel)])
    ours = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (venv_site / "zz_extras.pth").write_text("\n".join(dict.fromkeys(ours)) + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", VLALIGNER_CACHE=str(tmp_path / "cache"))
    where = _run([str(py), "-c", "import vlaligner; print(vlaligner.__file__)"], cwd=work, env=env).stdout
    assert str(venv_site) in where and str(REPO) not in where
    small = ('{"dim": 32, "mask_channels": 16, "up_channels": [32, 32], "ffn_dim": 64, "decoder_layers": 1, '
             '"backbone": "convnext_atto", "backbone_kwargs": {"dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1]}}')
    train = [str(py), "-m", "vlaligner.cli", "train", "--model", "tiny", "--model-kwargs", small,
             "--img-size", "64", "--synthetic-images", "8", "--train-samples", "4", "--val-samples", "2",
             "--batch-size", "2", "--max-steps", "2", "--num-workers", "0", "--device", "cpu", "--no-progress",
             "--output-dir", "run"]
    _run(train, cwd=work, env=env, timeout=900)
    assert (work / "run" / "last" / "model.safetensors").is_file()
    result = _run([str(py), "-m", "vlaligner.cli", "evaluate", "--checkpoint", "run/last", "--num-workers", "0",
                   "--no-progress"], cwd=work, env=env, timeout=900)
    assert "mIoU" in result.stdout and (work / "run" / "last" / "metrics.json").is_file()
