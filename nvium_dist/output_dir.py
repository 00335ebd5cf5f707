"""Output directories the tools write (exports, Hugging Face conversions, converted run directories).

The rules, for every tool that writes one:
* the output is never the input, never holds it and never sits inside it (not even with --force);
* it is built under `<out>.tmp-<pid>` and swapped in only when complete; a temporary directory left by a
  writer that died is removed by the next run, and so is the replaced output a writer killed mid-swap left
  as `<out>.old-<pid>` (put back in place when the new output never arrived);
* the tool marks its output with `nvium_conversion.json` (MARKER_FILE): the tool's name and the sha256 of
  every file it wrote, so a re-run replaces only what the tool wrote, and a reader can tell a tampered file
  (a modeling_nvium.py loaded with trust_remote_code, say) before it runs it;
* an existing output is replaced only when it is an earlier output of the same tool: files the tool did not
  write are never deleted (the tool names them and stops); --force only lets it replace its own files that
  were changed since, or an output of an older version that kept no file list.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

from nvium_dist.data.tokenizer import file_sha256

MARKER_FILE = "nvium_conversion.json"
PARTIAL_FILE = ".nvium-partial"  # inside a temporary output while it is written: which process writes it


class OutputDirError(ValueError):
    """The output path may not be written (it holds the input, or something this tool did not write)."""


def same_or_inside(path: Path, other: Path) -> bool:
    path, other = path.resolve(), other.resolve()
    return path == other or other in path.parents


def check_apart(out: Path, source: Path, tool: str) -> None:
    """Raises unless writing `out` leaves `source` alone: `out` is not `source`, does not hold it and is not
    inside it."""
    if same_or_inside(out, source) or same_or_inside(source, out):
        relation = ("is" if out.resolve() == source.resolve() else
                    "holds" if same_or_inside(source, out) else "is inside")
        raise OutputDirError(f"the output {out} {relation} the input {source}; {tool} never writes over what it "
                             "reads (not even with --force): choose an output path outside it")


def _files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.name != MARKER_FILE)


def read_marker(directory: Path) -> dict | None:
    try:
        marker = json.loads((directory / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def changed_files(directory: Path, recorded: dict) -> list[str]:
    """The files the marker lists whose sha256 differs now, or which are gone."""
    changed = []
    for name, digest in sorted(recorded.items()):
        path = directory / name
        if path.is_symlink() or not path.is_file() or file_sha256(str(path)) != digest:
            changed.append(name)
    return changed


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_output_dir(out: Path, tool: str, force: bool, sources: Iterable[Path] = (),
                     older_output: Callable[[Path], bool] | None = None) -> None:
    """Raises OutputDirError unless `tool` may write `out` (see the module docstring): `out` is apart from every
    path in `sources`, and absent, an empty directory or an earlier output of `tool`. `older_output(out)`
    recognises an output of an older version that has no file list (replaced only with --force)."""
    for source in sources:
        check_apart(out, Path(source), tool)
    recover_interrupted_swap(out)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise OutputDirError(f"{out} is a file; {tool} writes a directory there and never replaces a file it did not "
                             "write: choose another path")
    if not any(out.iterdir()):
        return
    marker = read_marker(out)
    own = marker is not None and marker.get("tool") == tool
    if not own and not (older_output is not None and older_output(out)):
        raise OutputDirError(f"{out} is not empty and is not an earlier output of {tool}; refusing to replace it "
                             "(--force only replaces the tool's own outputs). Choose another path or empty it")
    recorded = marker.get("files") if own else None
    if not isinstance(recorded, dict):
        if force:
            return
        raise OutputDirError(f"{out} was written by an older version of {tool} that kept no list of its files; "
                             "pass --force to replace it, or choose another path")
    foreign = sorted(set(_files(out)) - set(recorded))
    if foreign:
        raise OutputDirError(f"{out} holds files {tool} did not write ({_names(foreign)}); move them out of it "
                             "first: a re-run replaces only what the tool wrote (--force too)")
    changed = changed_files(out, recorded)
    if changed and not force:
        raise OutputDirError(f"{out}: {_names(changed)} changed since {tool} wrote it; pass --force to replace "
                             "them, or choose another path")


def verify_marker(directory: Path) -> dict | None:
    """The marker of `directory` (None if it has none) after checking that every file it lists still has the
    recorded sha256: raises OutputDirError naming a tampered or missing file."""
    marker = read_marker(directory)
    if marker is None or not isinstance(marker.get("files"), dict):
        return marker
    changed = changed_files(directory, marker["files"])
    if changed:
        raise OutputDirError(f"{directory}: {_names(changed)} differ from what {marker.get('tool', 'nvium')} wrote "
                             f"(sha256 in {MARKER_FILE}); the directory was changed since: do not load it (least of "
                             "all with trust_remote_code=True), convert again")
    return marker


def process_exists(pid: int) -> bool:
    """Whether process `pid` is running on this host (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # a live process of another user
        return True
    return True


def _writer_is_gone(tmp: Path) -> bool:
    try:
        pid = int(json.loads((tmp / PARTIAL_FILE).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):  # not ours, or unreadable
        return False
    return not process_exists(pid)


def recover_interrupted_swap(out: Path) -> None:
    """Finishes what a writer killed inside install_dir left: `<out>.old-<pid>` of a process that no longer
    exists is the marked output it was replacing. With `out` missing (killed between the two renames) it is
    put back; with the writer's new marked output in place it is removed. Anything else is left alone."""
    for old in out.parent.glob(f"{out.name}.old-*"):
        pid = old.name.rsplit("-", 1)[1]
        if (not pid.isdigit() or old.is_symlink() or not old.is_dir() or read_marker(old) is None
                or process_exists(int(pid))):
            continue
        if not out.exists() and not out.is_symlink():
            os.replace(old, out)
        elif out.is_dir() and not out.is_symlink() and read_marker(out) is not None:
            shutil.rmtree(old, ignore_errors=True)


def remove_stale_tmp_dirs(out: Path) -> None:
    """Removes `<out>.tmp-<pid>` directories that a writer of this module left behind when it was killed (they
    hold PARTIAL_FILE naming a process that no longer exists)."""
    for tmp in out.parent.glob(f"{out.name}.tmp-*"):
        if tmp.is_dir() and not tmp.is_symlink() and _writer_is_gone(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def new_tmp_dir(out: Path) -> Path:
    remove_stale_tmp_dirs(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / PARTIAL_FILE).write_text(json.dumps({"pid": os.getpid()}))
    return tmp


def install_dir(tmp: Path, out: Path) -> None:
    """Moves the complete `tmp` to `out`, replacing what is there (already checked) only after `tmp` is whole."""
    (tmp / PARTIAL_FILE).unlink(missing_ok=True)
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


@contextlib.contextmanager
def building(out: Path):
    """Yields a new temporary directory for `out` and removes it if the body fails; a full disk becomes one
    OutputDirError line naming the path and the free space. The caller installs it (install_dir) at the end."""
    tmp = new_tmp_dir(out)
    try:
        yield tmp
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err):
            raise OutputDirError(disk_full_message(out, err)) from None
        raise


def is_disk_full(err: BaseException) -> bool:
    """An OSError ENOSPC/EDQUOT, or a library's wrapped one: safetensors says so, torch.save's zip writer reports
    the short write as "unexpected pos"."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return any(sign in text for sign in ("No space left on device", "Disk quota exceeded", "unexpected pos"))


def disk_full_message(path: Path, err: BaseException) -> str:
    try:
        free = shutil.disk_usage(next(p for p in [path, *path.parents] if p.exists())).free
        space = f"{free / 2**20:.1f} MiB free"
    except (OSError, StopIteration):
        space = "free space unknown"
    return (f"no space left on the device writing {path} ({space} there; {type(err).__name__}); nothing was "
            "replaced and the partial output was removed: free space or choose another path")


def write_marker(directory: Path, tool: str, **info) -> None:
    """Marks `directory` as written by `tool`, with the sha256 of every file in it (call it last)."""
    files = {name: file_sha256(str(directory / name)) for name in _files(directory) if name != PARTIAL_FILE}
    (directory / MARKER_FILE).write_text(json.dumps({"tool": tool, **info, "files": files}, indent=2) + "\n")

