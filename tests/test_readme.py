"""The README's quick start runs as written and gives the shapes its comments promise."""

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quick_start_runs():
    text = README.read_text()
    start = text.index("```python", text.index("## Quick start")) + len("```python")
    code = text[start : text.index("```", start)]
    namespace: dict = {}
    exec(compile(code, "README quick start", "exec"), namespace)
    assert tuple(namespace["queries"].shape) == (2, 24, 512)
    out = namespace["out"]
    assert tuple(out.logits.shape) == (2, 1, 120, 120) and tuple(out.query_masks.shape) == (2, 24, 120, 120)


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in README.read_text()
