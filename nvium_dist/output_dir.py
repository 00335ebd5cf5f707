"""Output directories the tools write (exports, Hugging Face conversions, converted run directories): built
under a temporary name, swapped in when complete, and never replacing something the tool did not write unless
the user says --force."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable


class OutputDirError(ValueError):
    """The output path holds something this tool did not write."""


def check_output_dir(out: Path, is_own_output: Callable[[Path], bool], force: bool, tool: str) -> None:
    """Raises OutputDirError unless `out` is absent, an empty directory, a previous output of `tool`, or --force."""
    if not out.exists() or force:
        return
    if not out.is_dir():
        raise OutputDirError(f"{out} is a file; {tool} writes a directory there. Choose another path or pass --force")
    if any(out.iterdir()) and not is_own_output(out):
        raise OutputDirError(
            f"{out} is not empty and is not an earlier output of {tool}; refusing to replace it. "
            "Choose another path, empty it, or pass --force to replace it")


def new_tmp_dir(out: Path) -> Path:
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def install_dir(tmp: Path, out: Path) -> None:
    """Moves the complete `tmp` to `out`, replacing what is there (already checked) only after `tmp` is whole."""
    if out.exists() or out.is_symlink():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        os.replace(tmp, out)


MARKER_FILE = "nvium_conversion.json"


def write_marker(directory: Path, tool: str, **info) -> None:
    """Marks `directory` as written by `tool` (so a re-run may replace it)."""
    (directory / MARKER_FILE).write_text(json.dumps({"tool": tool, **info}, indent=2) + "\n")


def written_by(directory: Path, tool: str) -> bool:
    try:
        return json.loads((directory / MARKER_FILE).read_text()).get("tool") == tool
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
