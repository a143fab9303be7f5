"""Generate docs/api.md, the API reference, from the public names and docstrings of vlaligner.

Every name in each documented module's ``__all__`` gets an entry: its signature (from
``inspect.signature``), its docstring (Google style, turned into markdown), and for classes
their own public methods and properties. Module-level constants show their value and the
``#:`` comment written above them in the source. The output is deterministic (no memory
addresses, no machine paths), so ``tests/test_docs.py`` can check that docs/api.md is current.

    python docs/gen_api.py            # write docs/api.md
    python docs/gen_api.py --check    # exit 1 if docs/api.md is stale
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "api.md"

#: (module, one-line description) in the order they appear in the reference.
MODULES: Tuple[Tuple[str, str], ...] = (
    ("vlaligner", "the aligner core: the three EAVL modules, the composed aligner, the neck (torch + einops only)"),
    ("vlaligner.functional", "pure functions: dynamic convolution, parameter split, kernel fusion"),
    ("vlaligner.losses", "the training loss"),
    ("vlaligner.metrics", "oIoU, mIoU and Precision@X for referring segmentation"),
    ("vlaligner.no_target", "the no-target decision for generalized referring segmentation (torch only)"),
    ("vlaligner.gres_losses", "the no-target loss terms (gRefCOCO)"),
    ("vlaligner.gres_metrics", "gIoU, cIoU, Pr@X, N-acc and T-acc as ReLA's evaluator (gRefCOCO)"),
    ("vlaligner.no_target_threshold", "the no-target threshold chosen on a validation split (gRefCOCO)"),
    ("vlaligner.gres_eval", "evaluate a generalized model over a loader (gRefCOCO)"),
    ("vlaligner.data", "RefCOCO / RefCOCO+ / G-Ref / gRefCOCO loading, transforms, the synthetic sets (extra `data`)"),
    ("vlaligner.models", "the full EAVL model and its builders (extra `models`)"),
    ("vlaligner.training", "the training package: recipes, the Trainer, evaluation, checkpoints (extra `train`)"),
    ("vlaligner.query_diversity", "how different the N queries are: the measures of query collapse"),
    ("vlaligner.fileio", "atomic writes, hashes and logs shared by checkpoints and runs"),
    ("vlaligner.predictor", "image + sentence in, mask out (`vlaligner.Predictor`)"),
    ("vlaligner.devices", "device choice (CUDA, MPS, CPU) and TF32"),
    ("vlaligner.export", "ONNX export and onnxruntime checks (extra `export`)"),
    ("vlaligner.hub", "checkpoint folders on the Hugging Face Hub (huggingface_hub, extra `models`)"),
    ("vlaligner.batch_segment", "`vlaligner segment` over many images"),
    ("vlaligner.viz", "overlays and per-query grids"),
    ("vlaligner.cli", "the `vlaligner` console script"),
)
#: Names reachable on a module without being in its ``__all__`` (lazy imports).
EXTRA_NAMES = {"vlaligner": ("Predictor",)}

SECTION = re.compile(
    r"^(Args|Arguments|Parameters|Returns|Return|Raises|Attributes|Yields|Examples?|Notes?|Warnings?|Shapes?)\s*:\s*$"
)
LIST_SECTIONS = {"Args", "Arguments", "Parameters", "Raises", "Attributes", "Shape", "Shapes"}


# ---------------------------------------------------------------------------- sanitising
def _machine_paths() -> List[Tuple[str, str]]:
    """Paths that differ between machines, longest first, with what replaces them."""
    import vlaligner

    pairs = [(str(Path(vlaligner.__file__).resolve().parent), "<vlaligner>"),
             (str(Path(vlaligner.__file__).parent), "<vlaligner>"),
             (str(ROOT), "<repo>")]
    home = os.path.expanduser("~")
    if home not in ("", "/", "~"):
        pairs.append((home, "~"))
    return sorted(set(pairs), key=lambda p: -len(p[0]))


def sanitize(text: str) -> str:
    """Remove what changes between runs or machines: addresses, install paths."""
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", text)
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    text = re.sub(r"<function ([\w.<>]+)>", r"\1", text)
    text = re.sub(r"ForwardRef\('([^']*)'\)", r"\1", text)
    for path, replacement in _machine_paths():
        text = text.replace(path, replacement)
    return text


# ---------------------------------------------------------------------------- docstrings
def _inline(text: str) -> str:
    """reST inline markup -> markdown: ``x`` -> `x`, :class:`X` -> `X`."""
    text = re.sub(r":(?:class|func|meth|mod|data|attr|obj|exc):`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def docstring_to_markdown(doc: Optional[str]) -> str:
    """A Google-style docstring as markdown: sections become bold labels with bullet lists,
    ``::`` blocks and ``>>>`` examples become fenced code."""
    if not doc:
        return "*(no docstring)*"
    lines = inspect.cleandoc(doc).splitlines()
    out: List[str] = []
    i = 0
    section: Optional[str] = None
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        match = SECTION.match(stripped) if not line.startswith(" ") else None
        if match:
            section = match.group(1)
            label = stripped[:-1]
            out += ["", f"**{label}:**", ""]
            i += 1
            continue
        if stripped.startswith(">>>"):
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i].strip())
                i += 1
            out += ["", "```python", *block, "```", ""]
            continue
        if stripped.endswith("::") and not SECTION.match(stripped):
            indent = len(line) - len(line.lstrip())
            text = stripped[:-2].rstrip()
            if text:
                out.append((" " * 0) + _inline(text) + ":")
            i += 1
            block: List[str] = []
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            while block and not block[0].strip():
                block.pop(0)
            body = inspect.cleandoc("\n".join(block)) if block else ""
            out += ["", "```", *body.splitlines(), "```", ""]
            continue
        if section is not None and line.startswith(" "):
            # An entry of the section (indent 4) with its continuation lines (deeper).
            entry = [stripped]
            i += 1
            while i < len(lines) and lines[i].startswith(" " * 5) and not lines[i].strip().startswith(">>>"):
                entry.append(lines[i].strip())
                i += 1
            text = " ".join(entry)
            m = re.match(r"^([\w*., ]+?)(\s*\([^)]*\))?:\s+(.*)$", text)
            is_entry = bool(m) and len(m.group(1)) < 60
            if section not in LIST_SECTIONS:
                # Returns / Yields / Notes: prose, unless written as "name: description".
                is_entry = is_entry and re.fullmatch(r"[a-z_]\w*", m.group(1)) is not None
            if is_entry:
                names = ", ".join(f"`{n.strip()}`" for n in m.group(1).split(",") if n.strip())
                kind = f" {m.group(2).strip()}" if m.group(2) else ""
                out.append(f"- {names}{kind}: {_inline(m.group(3))}")
            elif section in LIST_SECTIONS and out and out[-1].startswith("- "):
                out[-1] += " " + _inline(text)  # a wrapped line of the previous entry
            elif section in LIST_SECTIONS:
                out.append(f"- {_inline(text)}")
            else:
                out.append(_inline(text))
            continue
        if not stripped:
            section = None if section is None else section
            out.append("")
            i += 1
            continue
        section = None
        out.append(_inline(stripped))
        i += 1
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    return sanitize(text)


# ---------------------------------------------------------------------------- signatures
def _annotation(annotation: Any) -> str:
    # Under ``from __future__ import annotations`` annotations are already source strings.
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def format_parameter(p: inspect.Parameter) -> str:
    """``name: annotation = default`` without the quotes str(Parameter) puts around strings."""
    prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}.get(p.kind, "")
    text = prefix + p.name
    if p.annotation is not inspect.Parameter.empty:
        text += ": " + _annotation(p.annotation)
    if p.default is not inspect.Parameter.empty:
        default = p.default
        shown = default.__qualname__ if inspect.isclass(default) or inspect.isfunction(default) else repr(default)
        if inspect.isclass(default):
            module = default.__module__
            if module.startswith("torch.nn.modules."):  # shown as users write it
                module = "torch.nn"
            shown = f"{module}.{default.__qualname__}"
        text += (" = " if p.annotation is not inspect.Parameter.empty else "=") + shown
    return text


def signature(obj: Any, name: str) -> str:
    """``name(arg, *, kw=default) -> ret``, one parameter per line when long."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    params = [sanitize(format_parameter(p)) for p in sig.parameters.values()]
    # Re-insert the bare '*' and '/' markers that str(Parameter) leaves out.
    rendered: List[str] = []
    kinds = [p.kind for p in sig.parameters.values()]
    saw_star = any(k == inspect.Parameter.VAR_POSITIONAL for k in kinds)
    for idx, (p, text) in enumerate(zip(sig.parameters.values(), params)):
        if p.kind == inspect.Parameter.KEYWORD_ONLY and not saw_star:
            rendered.append("*")
            saw_star = True
        rendered.append(text)
        nxt = kinds[idx + 1] if idx + 1 < len(kinds) else None
        if p.kind == inspect.Parameter.POSITIONAL_ONLY and nxt != inspect.Parameter.POSITIONAL_ONLY:
            rendered.append("/")
    ret = ""
    if sig.return_annotation is not inspect.Signature.empty and not inspect.isclass(obj):
        ann = sig.return_annotation
        ret = " -> " + sanitize(_annotation(ann))
    one_line = f"{name}({', '.join(rendered)}){ret}"
    if len(one_line) <= 88:
        return one_line
    return f"{name}(\n" + "".join(f"    {r},\n" for r in rendered) + f"){ret}"


# ---------------------------------------------------------------------------- constants
def constant_comment(module: Any, name: str) -> str:
    """The ``#:`` lines right above ``name = ...`` in the module's source (Sphinx style)."""
    try:
        source = inspect.getsource(module).splitlines()
    except (OSError, TypeError):
        return ""
    pattern = re.compile(rf"^{re.escape(name)}\s*(:[^=]+)?=")
    for index, line in enumerate(source):
        if pattern.match(line):
            comment: List[str] = []
            j = index - 1
            while j >= 0 and source[j].startswith("#:"):
                comment.insert(0, source[j][2:].strip())
                j -= 1
            return " ".join(comment)
    return ""


def value_repr(value: Any, limit: int = 300) -> str:
    if isinstance(value, dict) and value and all(callable(v) for v in value.values()):
        text = "{" + ", ".join(f"{k!r}: {getattr(v, '__name__', repr(v))}" for k, v in value.items()) + "}"
    else:
        text = repr(value)
    text = sanitize(text)
    return text if len(text) <= limit else text[: limit - 5] + " ...)"


# ---------------------------------------------------------------------------- entries
def _own_members(cls: type) -> Iterable[Tuple[str, Any]]:
    """Public methods, class/static methods and properties defined on ``cls`` itself."""
    for name, member in cls.__dict__.items():
        if name.startswith("_") and name not in ("__call__",):
            continue
        if isinstance(member, (staticmethod, classmethod)):
            yield name, member.__func__
        elif isinstance(member, property):
            yield name, member
        elif inspect.isfunction(member):
            yield name, member


def anchor(qualified: str) -> str:
    """The GitHub anchor of a heading ``### `qualified` ``."""
    return re.sub(r"[^a-z0-9_-]", "", qualified.lower().replace(" ", "-"))


def render_entry(module_name: str, name: str, obj: Any, module: Any) -> List[str]:
    qualified = f"{module_name}.{name}"
    lines = [f"### `{qualified}`", ""]
    home = getattr(obj, "__module__", None)
    if inspect.isclass(obj):
        kind = "class"
        lines += ["```python", f"class {signature(obj, name)}", "```", ""]
        if home and home != module_name and home.startswith("vlaligner"):
            lines += [f"*Defined in `{home}`.*", ""]
        lines += [docstring_to_markdown(obj.__doc__), ""]
        for member_name, member in _own_members(obj):
            if isinstance(member, property):
                lines += [f"#### property `{name}.{member_name}`", "", docstring_to_markdown(member.__doc__), ""]
                continue
            is_class_method = isinstance(obj.__dict__[member_name], classmethod)
            shown = member
            if is_class_method:
                shown = getattr(obj, member_name)  # bound: drops cls from the signature
            elif isinstance(obj.__dict__[member_name], staticmethod):
                shown = member
            else:
                shown = _drop_self(member)
            prefix = "classmethod " if is_class_method else ""
            lines += [
                f"#### {prefix}`{name}.{member_name}`", "",
                "```python", signature(shown, member_name), "```", "",
                docstring_to_markdown(member.__doc__), "",
            ]
        return lines
    if callable(obj) and (inspect.isfunction(obj) or inspect.isbuiltin(obj) or hasattr(obj, "__wrapped__")):
        lines += ["```python", signature(obj, name), "```", ""]
        if home and home != module_name and home.startswith("vlaligner"):
            lines += [f"*Defined in `{home}`.*", ""]
        lines += [docstring_to_markdown(obj.__doc__), ""]
        return lines
    # A constant (or a typing alias).
    comment = constant_comment(module, name)
    lines += ["```python", f"{name} = {value_repr(obj)}", "```", ""]
    if comment:
        lines += [_inline(sanitize(comment)), ""]
    return lines


def render_alias(module_name: str, name: str, obj: Any) -> List[str]:
    """A lazily imported name: one line pointing at its full entry."""
    home = f"{obj.__module__}.{name}"
    first = (inspect.getdoc(obj) or "").split("\n")[0]
    return [
        f"### `{module_name}.{name}`", "",
        f"The same object as [`{home}`](#{anchor(home)}), imported on first access so that "
        f"`import {module_name}` stays light. {_inline(first)}", "",
    ]


def _drop_self(func: Any) -> Any:
    """A stand-in with the signature of ``func`` minus its first parameter (``self``)."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return func
    params = list(sig.parameters.values())[1:]

    def stub(*args: Any, **kwargs: Any) -> None:  # pragma: no cover - never called
        pass

    stub.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return stub


def public_names(module_name: str) -> List[str]:
    """``__all__`` of the module plus its documented lazy names, in order."""
    module = importlib.import_module(module_name)
    names = list(getattr(module, "__all__", []))
    names += [n for n in EXTRA_NAMES.get(module_name, ()) if n not in names]
    return names


def render() -> str:
    """The whole of docs/api.md as a string."""
    out = [
        "# API reference",
        "",
        "<!-- Generated by docs/gen_api.py from the docstrings; do not edit by hand. "
        "Regenerate with `python docs/gen_api.py`. -->",
        "",
        "Every public name (each module's `__all__`) with its signature and docstring. Shapes use "
        "einops patterns: b batch, n queries, l words, c channels, d width, h w space, k kernel size. "
        "Overview: [index.md](index.md); using the three modules in your own model: "
        "[custom_model.md](custom_model.md).",
        "",
        "## Modules",
        "",
    ]
    entries: List[str] = []
    for module_name, description in MODULES:
        module = importlib.import_module(module_name)
        names = public_names(module_name)
        links = ", ".join(f"[`{n}`](#{anchor(module_name + '.' + n)})" for n in names)
        out.append(f"- [`{module_name}`](#{anchor('module ' + module_name)}): {description}. {links}")
        entries += [f"## Module `{module_name}`", "", docstring_to_markdown(module.__doc__), ""]
        for name in names:
            obj = getattr(module, name)
            if name in EXTRA_NAMES.get(module_name, ()):
                entries += render_alias(module_name, name, obj)
            else:
                entries += render_entry(module_name, name, obj, module)
    out += ["", *entries]
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"
    return text


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md differs from the output")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.is_file() else ""
        if current != text:
            print(f"{args.output} is stale: run python docs/gen_api.py", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
