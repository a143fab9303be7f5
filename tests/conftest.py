"""Shared pytest configuration: small thread counts and hypothesis profiles for 2-core CI."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny():
    """A seeded ``build_eavl_tiny(img_size=64, num_queries=4)`` in eval mode, one per test module
    (test files that need another size define their own ``tiny``)."""
    from vlaligner.models import build_eavl_tiny

    torch.manual_seed(0)
    return build_eavl_tiny(img_size=64, num_queries=4).eval()


@pytest.fixture
def load_benchmark():
    """``load_benchmark("ablations")`` imports ``benchmarks/ablations.py`` afresh (a new module
    object per call, so that a test may monkeypatch it freely)."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
