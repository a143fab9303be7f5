"""The builders by name, as recorded in a checkpoint's ``config.json``.

``EAVL.from_pretrained`` looks the recorded builder up here; the builders register themselves
with :func:`register_builder` when ``vlaligner.models`` is imported. Its own module, so that
``eavl.py`` (the model) and ``builders.py`` (which builds it) do not import each other.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, TypeVar

__all__ = ["BUILDERS", "ADDED_ARGUMENTS", "register_builder", "recorded_kwargs"]

F = TypeVar("F", bound=Callable[..., Any])

#: Builder name (as recorded in ``config.json``) -> builder function.
BUILDERS: Dict[str, Callable[..., Any]] = {}


#: Builder name -> arguments added after checkpoints were first written, with the value every
#: checkpoint saved without them was built with (so that a new default never changes an old
#: checkpoint's architecture).
ADDED_ARGUMENTS: Dict[str, Dict[str, Any]] = {
    "eavl_tiny": {"mask_coords": False},
    "eavl_swin_b": {"mask_coords": False},
}


def recorded_kwargs(builder: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """A checkpoint's recorded builder arguments, completed with :data:`ADDED_ARGUMENTS`."""
    return {**ADDED_ARGUMENTS.get(builder, {}), **kwargs}


def register_builder(name: str) -> Callable[[F], F]:
    """Decorator: record a builder under ``name`` (the name its checkpoints record)."""

    def register(builder: F) -> F:
        if name in BUILDERS and BUILDERS[name] is not builder:
            raise ValueError(f"a builder named {name!r} is already registered")
        BUILDERS[name] = builder
        return builder

    return register
