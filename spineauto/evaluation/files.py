"""Reading and writing the evaluation commands' files, with errors a user can act on.

Every OS error (a read-only folder, a file where a folder is expected, a folder where a file is
expected, a missing or unreadable file) becomes a :class:`SpineautoError` that names the path, so
the CLI ends in one line instead of a traceback.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from spineauto.errors import SpineautoError
from spineauto.io.atomic import read_json


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


@contextmanager
def writing(path: Path, what: str, hint: str) -> Iterator[None]:
    """Turn an OS error while writing ``what`` at ``path`` into one line naming ``path`` (not a temporary name)."""
    try:
        yield
    except OSError as e:
        raise SpineautoError(f"{path}: cannot write {what} ({_reason(e)}); {hint}") from None


def check_writable(target: Path, what: str, hint: str) -> None:
    """Before any work: ``target`` (a file to write) is not a folder and its folder can be made and written."""
    target = Path(target)
    if target.is_dir():
        raise SpineautoError(f"{target}: is a folder, {what} must be a file; {hint}")
    folder = target.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SpineautoError(f"{existing}: not a folder, cannot write {what} {target} below it; {hint}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SpineautoError(f"{existing}: folder is not writable, cannot write {what} {target}; {hint}")


def read_json_file(path: Path, what: str) -> Any:
    """``path`` as JSON; a missing, unreadable or invalid file is one line naming it."""
    path = Path(path)
    if path.is_dir():
        raise SpineautoError(f"{path}: is a folder, {what} must be a JSON file")
    try:
        return read_json(path)
    except OSError as e:
        raise SpineautoError(f"{path}: cannot read {what} ({_reason(e)})") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise SpineautoError(f"{path}: {what} is not valid JSON ({e})") from None
