"""Run folders: written whole or not at all, and checked before they are read.

Every subcommand writes into a *staging* folder next to its target (``.<name>.partial``)
and renames it into place only once every file is complete, so a failure never leaves a
half-written result where a result is expected. The staging folder of a failed ``analyze``
is kept, so that a rerun with the same options resumes from the finished batches.

A run folder is recognised by its ``summary.json`` (``"tool": "topk-saturation"``); an
existing folder that is not one is never replaced.

Example:
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> with staged_folder(root / "demo") as stage:
    ...     write_json(stage / "summary.json", {"tool": TOOL})
    >>> is_run_folder(root / "demo")
    True
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from probes.errors import RunFolderError

TOOL = "topk-saturation"
FORMAT_VERSION = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; finished files get the usual mode.
FILE_MODE = 0o666 & ~_umask()


def write_text(path: Path, text: str) -> None:
    """Write a file under a temporary name, then rename it: readers never see half of it.

    Args:
        path: The file to write; its folder must exist.
        text: The whole content, written as UTF-8.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (see :func:`write_text`).

    Args:
        path: The file to write; its folder must exist.
        data: A JSON-serialisable value, written with 2-space indents; NaN and infinities
            are refused (``ValueError``) rather than written as invalid JSON.
    """
    write_text(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    """Read a JSON file, with a clear error where it is missing or broken.

    Args:
        path: The JSON file.

    Returns:
        The decoded value.

    Raises:
        RunFolderError: The file does not exist or is not valid JSON.
    """
    path = Path(path)
    if not path.exists():
        raise RunFolderError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RunFolderError(f"{path} is not valid JSON ({err.msg})") from err


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` is a finished topk-saturation run folder.

    Args:
        path: A folder (it need not exist).

    Returns:
        True when ``path/summary.json`` exists and says ``"tool": "topk-saturation"``.
    """
    summary = Path(path) / "summary.json"
    if not summary.is_file():
        return False
    try:
        return json.loads(summary.read_text(encoding="utf-8")).get("tool") == TOOL
    except (json.JSONDecodeError, OSError, AttributeError):
        return False


def check_output_target(path: Path) -> None:
    """Refuse an output folder that cannot be written or that holds something else.

    An existing run folder may be replaced; an empty folder may be filled; anything else is
    refused, so that a mistyped ``--out`` can never delete a user's files.

    Args:
        path: The intended output folder (it need not exist yet).

    Raises:
        RunFolderError: ``path`` is a file, a non-empty folder that is not a run folder, or
            its nearest existing parent is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"the output path {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not is_run_folder(path):
        raise RunFolderError(
            f"the output folder {path} is not empty and is not a topk-saturation run; "
            "choose another --out"
        )
    parent = path.parent if str(path.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise RunFolderError(f"cannot write the output folder {path}: {probe} is not writable")


def staging_path(final: Path) -> Path:
    """The staging folder of ``final``.

    Args:
        final: The finished folder.

    Returns:
        ``<parent>/.<name>.partial``, next to ``final``.
    """
    final = Path(final)
    return final.parent / f".{final.name}.partial"


def _swap_into_place(stage: Path, final: Path) -> None:
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(stage, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, final)


@contextlib.contextmanager
def staged_folder(final: Path, keep_on_error: bool = False, fresh: bool = True
                  ) -> Iterator[Path]:
    """Write a folder through its staging copy; rename it into place on success.

    Args:
        final: Where the finished folder goes (replaced if it exists).
        keep_on_error: Keep the staging folder after an exception (for resuming).
        fresh: Start from an empty staging folder (False: reuse what is there).

    Yields:
        The staging folder to write into.

    Raises:
        RunFolderError: The staging folder cannot be created.
    """
    final = Path(final)
    stage = staging_path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if fresh and stage.exists():
            shutil.rmtree(stage)
        stage.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(f"cannot write the output folder {final}: {err.strerror}") from err
    try:
        yield stage
    except BaseException:
        if not keep_on_error:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    _swap_into_place(stage, final)


def require_run(run_dir: Path, needs: tuple[str, ...] = ("summary.json", "saturation.csv",
                                                         "windows.json")) -> dict[str, Any]:
    """Check that ``run_dir`` is a complete analysis run and return its summary.

    Args:
        run_dir: The run folder.
        needs: Files that must exist in it.

    Returns:
        The decoded ``summary.json``.

    Raises:
        RunFolderError: The folder does not exist, is not a run folder, or lacks one of
            ``needs``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(
            f"the run folder {run_dir} does not exist; create it with "
            "`topk-saturation analyze --out ...`"
        )
    if not is_run_folder(run_dir):
        raise RunFolderError(f"{run_dir} is not a topk-saturation run folder (no summary.json)")
    missing = [name for name in needs if not (run_dir / name).exists()]
    if missing:
        raise RunFolderError(
            f"the run folder {run_dir} is incomplete: missing {', '.join(missing)}")
    return read_json(run_dir / "summary.json")
