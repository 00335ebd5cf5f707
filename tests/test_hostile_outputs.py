"""Issue 22, the output side: a conversion never writes over its input, a re-run replaces only what the tool
wrote, a tampered conversion is refused before anyone loads it, a lying config.json is refused before it
allocates, and a full disk is one line that names the path and its free space (with the old output kept and the
partial one removed, also after a kill).

The tools run in this process (tests/cli_case_runner.py's run_case: `main(argv)` as `python TOOL` runs it, stderr
captured, an escaping exception printed as a traceback)."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_case_runner import run_case
from test_hf_export import offline_modules  # noqa: F401 - one thread, remote code cached in tmp
from test_inference import make_export

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tool(script: str, *args) -> dict:
    """Runs tools/SCRIPT in this process; returns {"code", "stderr", "last"} (last: the last stderr line)."""
    result = run_case(str(ROOT / "tools" / script), [str(a) for a in args])
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    return {**result, "last": lines[-1] if lines else ""}


def one_error_line(result: dict, fragment: str) -> None:
    assert result["code"] == 2, result["stderr"][-3000:]
    assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
    assert "error" in result["last"] and fragment in result["last"], result["last"]


def snapshot(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def save_llama(directory: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, rms_norm_eps=1e-6)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """exports/tiny (an N-vium export) next to a user's exports/NOTES.md."""
    root = tmp_path_factory.mktemp("hostile_outputs")
    (root / "exports").mkdir()
    (root / "exports" / "NOTES.md").write_text("my notes\n")
    return make_export(root / "exports" / "tiny", vocab_size=300)


def test_a_conversion_never_writes_over_its_input(export, tmp_path):
    """Cases 1-3: OUTPUT = INPUT, OUTPUT holding INPUT, OUTPUT inside INPUT: refused even with --force, nothing
    touched (today case 1 deletes the LLaMA weights and cases 2-3 replace the export and exports/)."""
    exports = export.parent
    before = snapshot(exports)
    one_error_line(tool("convert_to_hf.py", export, export, "--force"), "is the input")
    one_error_line(tool("convert_to_hf.py", export, exports, "--force", "--no-check"), "holds the input")
    one_error_line(tool("convert_to_hf.py", export, export / "hf", "--force", "--no-check"), "is inside the input")
    assert snapshot(exports) == before
    llama = save_llama(tmp_path / "llama")
    llama_files = snapshot(llama)
    one_error_line(tool("convert_from_hf.py", llama, llama, "--exits", "1,2", "--force"), "is the input")
    one_error_line(tool("convert_from_hf.py", llama, tmp_path, "--exits", "1", "--force"), "holds the input")
    assert snapshot(llama) == llama_files


def test_a_rerun_replaces_only_what_the_tool_wrote(export, tmp_path):
    """Case 4: a user's MY_NOTES.md inside an earlier conversion is named and kept (today it is deleted
    silently); a file the tool wrote and the user changed needs --force; an untouched output is replaced."""
    out = tmp_path / "hf"
    assert tool("convert_to_hf.py", export, out, "--no-check")["code"] == 0
    marker = json.loads((out / "nvium_conversion.json").read_text())
    assert set(marker["files"]) == set(snapshot(out)) - {"nvium_conversion.json"}
    assert "modeling_nvium.py" in marker["files"]
    assert tool("convert_to_hf.py", export, out, "--no-check")["code"] == 0
    (out / "MY_NOTES.md").write_text("mine\n")
    for extra in ([], ["--force"]):
        one_error_line(tool("convert_to_hf.py", export, out, "--no-check", *extra), "did not write (MY_NOTES.md)")
    assert (out / "MY_NOTES.md").read_text() == "mine\n"
    (out / "MY_NOTES.md").unlink()
    (out / "generation_config.json").write_text("{}")
    one_error_line(tool("convert_to_hf.py", export, out, "--no-check"), "generation_config.json changed since")
    assert tool("convert_to_hf.py", export, out, "--no-check", "--force")["code"] == 0
    assert json.loads((out / "generation_config.json").read_text())["top_k"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporaries left


def test_export_force_replaces_only_its_own_exports(export, tmp_path):
    """save_export (export_checkpoint.py, convert_from_hf.py --paper): --force no longer replaces a foreign
    directory or a file; an earlier export of the tool, or one of an older version (no file list) with --force,
    is replaced."""
    from nvium_dist.checkpoint_io import load_export, save_export
    from nvium_dist.output_dir import OutputDirError

    exported = load_export(export)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    (tmp_path / "file.txt").write_text("keep me too")
    for target in ("notes", "file.txt"):
        with pytest.raises(OutputDirError):
            save_export(tmp_path / target, exported.model_config, exported.state, None, force=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert (tmp_path / "file.txt").read_text() == "keep me too"
    save_export(tmp_path / "exp", exported.model_config, exported.state, None)
    save_export(tmp_path / "exp", exported.model_config, exported.state, None)
    (tmp_path / "exp" / "nvium_conversion.json").unlink()  # as exports were written before the file list
    with pytest.raises(OutputDirError, match="pass --force"):
        save_export(tmp_path / "exp", exported.model_config, exported.state, None)
    save_export(tmp_path / "exp", exported.model_config, exported.state, None, force=True)
    with pytest.raises(OutputDirError, match="not an earlier output of convert_from_hf.py"):
        save_export(tmp_path / "exp", exported.model_config, exported.state, None, force=True,
                    tool="convert_from_hf.py")


def test_tampered_conversion_is_refused_before_it_is_loaded(tmp_path):
    """Case 8: nvium_conversion.json holds the sha256 of every file written; reading the directory back
    (convert_from_hf.py) refuses one whose files changed, naming them."""
    dense = make_export(tmp_path / "dense", vocab_size=300, exits=[])
    nvium = make_export(tmp_path / "nvium", vocab_size=300)
    assert tool("convert_to_hf.py", dense, tmp_path / "hf_dense", "--no-check")["code"] == 0
    assert tool("convert_to_hf.py", nvium, tmp_path / "hf_nvium", "--no-check")["code"] == 0
    assert tool("convert_from_hf.py", tmp_path / "hf_dense", tmp_path / "run_ok", "--exits", "none")["code"] == 0
    with open(tmp_path / "hf_nvium" / "modeling_nvium.py", "a") as f:
        f.write("\nimport os  # planted\n")
    one_error_line(tool("convert_from_hf.py", tmp_path / "hf_nvium", tmp_path / "run1"),
                   "modeling_nvium.py differ from what convert_to_hf.py wrote")
    (tmp_path / "hf_dense" / "config.json").write_text(
        (tmp_path / "hf_dense" / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 0.1'))
    one_error_line(tool("convert_from_hf.py", tmp_path / "hf_dense", tmp_path / "run2", "--exits", "none"),
                   "config.json differ from what convert_to_hf.py wrote")
    assert not (tmp_path / "run1").exists() and not (tmp_path / "run2").exists()


def test_sizes_are_checked_against_the_weights_before_allocation(tmp_path):
    """Case 9: config.json claiming a vocabulary of 10^12 is one line (today a 256 TB allocation error)."""
    llama = save_llama(tmp_path / "llama")
    config = json.loads((llama / "config.json").read_text())
    for key, value, fragment in (("vocab_size", 10 ** 12, "model.embed_tokens.weight is (64, 32), config.json says "
                                                           "(1000000000000, 32)"),
                                 ("num_hidden_layers", 10 ** 12, "the weights hold 2 layers"),
                                 ("intermediate_size", 10 ** 9, "mlp.gate_proj.weight is (64, 32)")):
        (llama / "config.json").write_text(json.dumps({**config, key: value}))
        one_error_line(tool("convert_from_hf.py", llama, tmp_path / "run", "--exits", "1"), fragment)
    assert not (tmp_path / "run").exists()


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root only; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def fill(disk: Path, leave: int) -> None:
    """Fills `disk` up to `leave` free bytes."""
    import shutil

    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_full_disk_is_one_line_and_keeps_the_old_output(export, small_disk):
    """Case 10 on a real full tmpfs: convert_to_hf (today a raw SafetensorError traceback) and save_export
    (export_checkpoint.py) say "no space left" with the path and the free space, keep the earlier output and
    remove their partial one; a temporary directory of a killed writer is removed by the next run, a
    look-alike directory that this code did not make is not."""
    from nvium_dist.checkpoint_io import load_export, save_export
    from nvium_dist.output_dir import PARTIAL_FILE, OutputDirError

    exported = load_export(export)
    save_export(small_disk / "exp", exported.model_config, exported.state, None)
    assert tool("convert_to_hf.py", export, small_disk / "hf", "--no-check")["code"] == 0
    old_export, old_hf = snapshot(small_disk / "exp"), snapshot(small_disk / "hf")
    stale = small_disk / f"hf.tmp-{_dead_pid()}"
    stale.mkdir()
    (stale / PARTIAL_FILE).write_text(json.dumps({"pid": int(stale.name.rsplit("-", 1)[1])}))
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    lookalike = small_disk / "hf.tmp-1"  # pid 1 is alive, and it has no PARTIAL_FILE anyway
    lookalike.mkdir()
    fill(small_disk, 64 * 1024)
    result = tool("convert_to_hf.py", export, small_disk / "hf", "--no-check")
    one_error_line(result, f"no space left on the device writing {small_disk / 'hf'} (")
    assert "MiB free there" in result["last"]
    with pytest.raises(OutputDirError, match="no space left on the device writing .*MiB free"):
        save_export(small_disk / "exp", exported.model_config, exported.state, None)
    assert snapshot(small_disk / "exp") == old_export and snapshot(small_disk / "hf") == old_hf
    assert sorted(p.name for p in small_disk.iterdir()) == ["exp", "filler", "hf", "hf.tmp-1"]


def test_a_writer_killed_mid_swap_loses_nothing(export, tmp_path):
    """install_dir renames the old output to `<out>.old-<pid>` and then the new one into place. A writer killed
    between the two renames left no `out` at all; killed after them, a stale `.old-<pid>`. The next run puts the
    old output back, or removes the superseded one; directories it did not make are left alone."""
    hf = tmp_path / "hf"
    assert tool("convert_to_hf.py", export, hf, "--no-check")["code"] == 0
    before = snapshot(hf)
    dead = _dead_pid()
    os.replace(hf, tmp_path / f"hf.old-{dead}")  # killed between the renames
    unmarked = tmp_path / f"hf.old-{dead + 1 if dead + 1 != os.getpid() else dead + 2}"
    unmarked.mkdir()
    (unmarked / "mine.txt").write_text("not the tool's\n")
    alive = tmp_path / "hf.old-1"  # pid 1 is alive
    alive.mkdir()
    (alive / "nvium_conversion.json").write_text("{}")
    result = tool("convert_to_hf.py", export, hf, "--no-check")  # a re-run over the restored, unchanged output
    assert result["code"] == 0, result["stderr"][-2000:]
    assert snapshot(hf) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["hf", unmarked.name, alive.name])

    superseded = tmp_path / f"hf.old-{dead}"  # killed after the renames: the new output is in place
    superseded.mkdir()
    (superseded / "nvium_conversion.json").write_text("{}")
    assert tool("convert_to_hf.py", export, hf, "--no-check")["code"] == 0
    assert not superseded.exists() and unmarked.exists() and alive.exists() and snapshot(hf) == before
