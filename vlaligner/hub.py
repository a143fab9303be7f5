"""Checkpoint folders on the Hugging Face Hub (optional dependency ``huggingface_hub``).

Axes: none (files only).

``resolve_checkpoint`` turns what a caller passed to ``from_pretrained`` into a local folder:
an existing path is used as it is (nothing is imported, nothing downloaded); a string that
is not an existing path and looks like a Hub repo id (``owner/name``) is fetched with
``huggingface_hub.snapshot_download``, which honours ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` /
``HF_HOME`` and reuses its cache. Only the files of a checkpoint folder are fetched
(``config.json``, ``model.safetensors``, ``tokenizer/``, ``text_config/``), never pickles. The
folder is then loaded exactly like a local one, so the SHA-256 of the weights recorded in
``config.json`` is still checked.

``push_folder`` uploads a checkpoint folder to a Hub model repo (creating it if needed).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Union

__all__ = ["looks_like_repo_id", "resolve_checkpoint", "push_folder", "CHECKPOINT_PATTERNS"]

#: The files of an EAVL checkpoint folder (``EAVL.save_pretrained``): all that is downloaded.
CHECKPOINT_PATTERNS = ("config.json", "model.safetensors", "tokenizer/*", "text_config/*")

# owner/name as the Hub spells it: letters, digits, '-', '_', '.'; neither part starts with
# '.' or '-' (so './x', '../x' and absolute paths never match).
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}$")

_INSTALL = "pip install 'vlaligner[models]' (or pip install huggingface_hub)"


def looks_like_repo_id(value: object) -> bool:
    """True for a str of the form ``owner/name`` that is not an existing local path."""
    if not isinstance(value, str) or not _REPO_ID.match(value) or ".." in value:
        return False
    return not os.path.exists(value)


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # an old huggingface_hub: fall back to the variable itself
        return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def resolve_checkpoint(
    path_or_repo_id: Union[str, "os.PathLike[str]"], *, revision: Optional[str] = None
) -> Path:
    """The local checkpoint folder for a path or a Hub repo id.

    Args:
        path_or_repo_id: a local folder (returned as a ``Path``, unchecked: the loader checks
            its files and says what is missing), or ``owner/name`` on the Hub.
        revision: branch, tag or commit of the Hub repo (default: ``main``); only for repo ids.

    Returns:
        A local folder: the path itself, or the snapshot folder in the Hub cache.

    Raises:
        FileNotFoundError: a repo id that is neither in the cache (offline) nor on the Hub,
            or a path that does not exist while the string is not a repo id.
        ImportError: a repo id while ``huggingface_hub`` is not installed.
        ValueError: ``revision`` given with a local path.
    """
    if not looks_like_repo_id(path_or_repo_id):
        if revision is not None:
            raise ValueError(
                f"revision={revision!r} applies to a Hub repo id ('owner/name'), got the local "
                f"path {str(path_or_repo_id)!r}"
            )
        return Path(path_or_repo_id)
    repo_id = str(path_or_repo_id)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as error:
        raise ImportError(
            f"{repo_id!r} is not a local folder; to load it from the Hugging Face Hub install "
            f"huggingface_hub: {_INSTALL} ({error})"
        ) from error
    try:
        folder = snapshot_download(
            repo_id, revision=revision, repo_type="model", allow_patterns=list(CHECKPOINT_PATTERNS)
        )
    except LocalEntryNotFoundError as error:
        where = (
            "HF_HUB_OFFLINE is set and the repo is not in the local Hub cache"
            if _offline()
            else "it could not be downloaded and is not in the local Hub cache"
        )
        raise FileNotFoundError(
            f"{repo_id!r} is not a local folder and is read as a Hugging Face Hub repo id, but "
            f"{where} ({type(error).__name__}: {error})"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local folder and is read as a Hugging Face Hub repo id, but "
            f"the Hub did not give it (revision {revision or 'main'!r}): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from None
    return Path(folder)


def push_folder(
    folder: Union[str, "os.PathLike[str]"],
    repo_id: str,
    *,
    private: Optional[bool] = None,
    commit_message: str = "Upload EAVL checkpoint",
    token: Optional[str] = None,
) -> str:
    """Upload a checkpoint folder to the Hub model repo ``repo_id`` (created if missing).

    Only the checkpoint's own files (:data:`CHECKPOINT_PATTERNS`) are uploaded.

    Returns:
        The URL of the commit (as ``huggingface_hub`` reports it).

    Raises:
        ImportError: ``huggingface_hub`` is not installed.
        ValueError: ``repo_id`` is not of the form ``owner/name``.
    """
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
        raise ValueError(f"push_to_hub needs a Hub repo id 'owner/name', got {repo_id!r}")
    try:
        from huggingface_hub import HfApi
    except ImportError as error:
        raise ImportError(f"pushing to the Hub needs huggingface_hub: {_INSTALL} ({error})") from error
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        allow_patterns=list(CHECKPOINT_PATTERNS),
        commit_message=commit_message,
    )
    return str(getattr(info, "commit_url", info))
