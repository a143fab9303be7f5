"""The documentation stays true: the API reference is complete and current, the guide's code runs.

Axis legend: none (no tensors here beyond those of the guide).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API_MD = DOCS / "api.md"
GUIDE_MD = DOCS / "custom_model.md"

# Every module whose public names (``__all__``) the reference must cover. Listed here, not
# read from docs/gen_api.py, so that dropping a module from the generator fails this test.
DOCUMENTED_MODULES = (
    "vlaligner",
    "vlaligner.functional",
    "vlaligner.losses",
    "vlaligner.metrics",
    "vlaligner.no_target",
    "vlaligner.gres_losses",
    "vlaligner.gres_metrics",
    "vlaligner.gres_eval",
    "vlaligner.data",
    "vlaligner.models",
    "vlaligner.training",
    "vlaligner.query_diversity",
    "vlaligner.fileio",
    "vlaligner.predictor",
    "vlaligner.devices",
    "vlaligner.export",
    "vlaligner.hub",
    "vlaligner.batch_segment",
)


def _gen_api():
    sys.path.insert(0, str(DOCS))
    try:
        return importlib.import_module("gen_api")
    finally:
        sys.path.remove(str(DOCS))


def _import_or_skip(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as error:  # an extra that is not installed
        pytest.skip(f"{name} needs an optional extra: {error}")


@pytest.mark.parametrize("module_name", DOCUMENTED_MODULES)
def test_every_public_name_is_in_the_api_reference(module_name):
    module = _import_or_skip(module_name)
    names = list(module.__all__)
    assert names, f"{module_name}.__all__ is empty"
    text = API_MD.read_text(encoding="utf-8")
    missing = [n for n in names if f"### `{module_name}.{n}`" not in text]
    assert not missing, f"docs/api.md lacks {module_name}: {missing}; run python docs/gen_api.py"


def test_predictor_is_in_the_api_reference():
    text = API_MD.read_text(encoding="utf-8")
    assert "### `vlaligner.Predictor`" in text
    assert "### `vlaligner.predictor.Predictor`" in text
    assert "#### `Predictor.predict`" in text


def test_api_reference_is_current():
    for name in DOCUMENTED_MODULES:
        _import_or_skip(name)
    gen_api = _gen_api()
    expected = gen_api.render()
    current = API_MD.read_text(encoding="utf-8")
    assert current == expected, "docs/api.md is stale: run python docs/gen_api.py"


def test_api_reference_is_deterministic_and_machine_free():
    text = API_MD.read_text(encoding="utf-8")
    assert not re.search(r" at 0x[0-9a-f]+", text), "a memory address leaked into docs/api.md"
    assert str(ROOT) not in text, "a machine path leaked into docs/api.md"
    # Every documented entry has a signature or a value block right after its heading.
    headings = re.findall(r"^### `([\w.]+)`\n\n(.{3})", text, flags=re.M)
    assert len(headings) > 50
    for name, after in headings:
        if name == "vlaligner.Predictor":
            continue
        assert after == "```", f"entry {name} has no signature block"


def test_docstring_conversion_of_sections_and_code():
    gen_api = _gen_api()
    doc = '''Do a thing.

    Args:
        features: ``(b c h w)`` maps, with a long description that
            continues on the next line.
        a, b: two at once.

    Returns:
        ``(b n h w)`` masks.

    Example::

        y = f(x)
    '''
    md = gen_api.docstring_to_markdown(doc)
    assert "**Args:**" in md and "**Returns:**" in md
    assert "- `features`: `(b c h w)` maps, with a long description that continues on the next line." in md
    assert "- `a`, `b`: two at once." in md
    assert "```\ny = f(x)\n```" in md
    assert "``" not in re.sub(r"```.*?```", "", md, flags=re.S), "reST double backquotes left"


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_custom_model_guide_code_runs():
    import torch

    blocks = _python_blocks(GUIDE_MD)
    assert len(blocks) >= 8, f"expected the guide's code blocks, found {len(blocks)}"
    namespace: dict = {"__name__": "custom_model_guide"}
    torch.manual_seed(0)
    printed = io.StringIO()
    for index, block in enumerate(blocks):
        code = compile(block, f"{GUIDE_MD.name} python block {index + 1}", "exec")
        with contextlib.redirect_stdout(printed):
            exec(code, namespace)  # noqa: S102 - the point of the test
    out = printed.getvalue()
    # The shapes the guide's comments promise are the ones printed.
    assert "torch.Size([2, 8, 64]) torch.Size([2, 8, 12])" in out
    assert "torch.Size([2, 1, 32, 32]) torch.Size([2, 8])" in out
    assert "features must have shape (b c h w)" in out


def test_generalized_figure_script_draws_each_kind_of_sentence(tmp_path):
    """docs/make_generalized_figure.py on a small gRefCOCO folder and an untrained no-target model."""
    import importlib.util

    import torch

    from vlaligner.data import generate_synthetic_grefcoco
    from vlaligner.models import build_eavl_tiny

    spec = importlib.util.spec_from_file_location("make_generalized_figure", DOCS / "make_generalized_figure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    root = generate_synthetic_grefcoco(tmp_path / "g", num_images=12, seed=0, image_size=64)
    torch.manual_seed(0)
    build_eavl_tiny(img_size=64, dim=32, mask_channels=8, up_channels=(16, 8), decoder_layers=1, decoder_heads=2,
                    ffn_dim=32, no_target=True).save_pretrained(tmp_path / "ckpt")
    from vlaligner.data import RefDataset

    dataset = RefDataset(root, "grefcoco", "unc", "train")
    picked = module.pick_samples(dataset)
    kinds = [len(dataset._ref_anns[dataset.samples[i][0]]) for i in picked]
    assert kinds == sorted(kinds, key=lambda n: (n == 0, n > 1)) and 0 in kinds and any(n > 1 for n in kinds)
    out = tmp_path / "figure.png"
    assert module.main(["--checkpoint", str(tmp_path / "ckpt"), "--data-root", str(root), "--split", "train",
                        "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):  # a model without a no-target head is refused
        build_eavl_tiny(img_size=64, dim=32, mask_channels=8, up_channels=(16, 8), decoder_layers=1,
                        decoder_heads=2, ffn_dim=32).save_pretrained(tmp_path / "plain")
        module.main(["--checkpoint", str(tmp_path / "plain"), "--data-root", str(root), "--out", str(out)])
