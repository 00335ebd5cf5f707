"""The documentation stays true: README.md and every docs/*.md page.

Rules (kept simple so that a new page satisfies them by being correct):
- every `--flag` written after `tools/NAME.py` or `pretrain/pretrain_nvium.py` in a command (a code block line,
  or an inline code span) is an option of that tool's parser;
- every `section.key` config key (`--set section.key=...`, or an inline code span that starts with one, for the
  sections model/parallel/data/training) is a field of the config dataclasses;
- every path under runs/ or exports/ that an example reads (a tool's input flag or first positional argument, a
  `from_pretrained("...")`) is one that an earlier example writes: README.md comes first, then the docs pages in
  alphabetical order, each top to bottom;
- the README's walkthrough runs end to end at tiny size (slow).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOOL = re.compile(r"(?:^|\s)((?:tools/\w+|pretrain/pretrain_nvium)\.py)\b")
CONFIG_KEY = re.compile(r"^(model|parallel|data|training)\.([a-z_]+)(?:\.([a-z_]+))?(?![\w.])")
# inline code spans that are file names, not config keys
FILE_NAMES = {"model.safetensors"}
READ_FLAGS = {"--model", "--baseline", "--data", "--checkpoint", "--prompt-file", "--include-path", "--config"}
WRITE_FLAGS = {"--output", "--output-dir", "--work-dir", "--synthetic"}
CHECKED_ROOTS = ("runs/", "exports/")
TRAINER_DATA = ["data/tokenizer.model", "data/shakespeare_train_text_document", "data/shakespeare_valid_text_document"]


def code_blocks(text: str) -> list[tuple[str, str]]:
    """[(language, body)] of the fenced code blocks."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def prose(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def inline_spans(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", prose(text))


def shell_commands(body: str) -> list[str]:
    """One string per command: continuation lines joined, comments and heredoc bodies dropped, split at
    `&&`, `;` and `|`."""
    commands, heredoc_end = [], None
    for line in body.replace("\\\n", " ").splitlines():
        if heredoc_end is not None:
            if line.strip() == heredoc_end:
                heredoc_end = None
            continue
        marker = re.search(r"<<-?\s*'?(\w+)'?", line)
        if marker:
            heredoc_end = marker.group(1)
        line = re.sub(r"(^|\s)#.*", "", line)
        commands += [part.strip() for part in re.split(r"&&|;|\|", line) if part.strip()]
    return commands


def tool_invocations(command: str) -> list[tuple[str, list[str]]]:
    """[(tool path, the words after it)] for a command that runs a tool."""
    match = TOOL.search(command)
    if not match:
        return []
    try:
        words = shlex.split(command[match.end():])
    except ValueError:
        words = command[match.end():].split()
    return [(match.group(1), words)]


def all_invocations():
    for path in DOCS:
        text = path.read_text()
        for language, body in code_blocks(text):
            if language in ("bash", "sh", ""):
                for command in shell_commands(body):
                    yield path, command, tool_invocations(command)
        for span in inline_spans(text):
            yield path, span, tool_invocations(span)


_OPTIONS: dict[str, set[str]] = {}


def tool_options(tool: str) -> set[str]:
    """The option strings of TOOL's parser, read from its --help (in this process: --help imports no torch)."""
    if tool not in _OPTIONS:
        import importlib.util

        spec = importlib.util.spec_from_file_location(f"doc_tool_{Path(tool).stem}", ROOT / tool)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        sys.path.insert(0, str((ROOT / tool).parent))
        try:
            spec.loader.exec_module(module)
            out = io.StringIO()
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
                module.main(["--help"])
        finally:
            sys.path.remove(str((ROOT / tool).parent))
        _OPTIONS[tool] = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", out.getvalue()))
    return _OPTIONS[tool]


def test_every_documented_tool_flag_exists():
    unknown = []
    for path, command, invocations in all_invocations():
        for tool, words in invocations:
            assert (ROOT / tool).is_file(), f"{path.name}: {tool} does not exist ({command})"
            flags = {w.split("=")[0] for w in words if w.startswith("--") and len(w) > 2}
            unknown += [f"{path.name}: {tool} {flag}" for flag in sorted(flags - tool_options(tool))]
    assert not unknown, unknown


def config_sections() -> dict[str, type]:
    from nvium_dist.config import NviumConfig

    return {f.name: f.type for f in dataclasses.fields(NviumConfig)}


def config_key_exists(section: str, key: str, subkey: str | None) -> bool:
    from typing import get_type_hints

    from nvium_dist.config import NviumConfig

    section_type = get_type_hints(NviumConfig)[section]
    fields = get_type_hints(section_type)
    if key not in fields:
        return False
    if subkey is None:
        return True
    return dataclasses.is_dataclass(fields[key]) and subkey in get_type_hints(fields[key])


TENSOR_NAME = re.compile(r"\.(weight|bias)$")  # a weight's name (e.g. in a name mapping), not a config key


def documented_config_keys():
    for path in DOCS:
        text = path.read_text()
        candidates = [m.group(1) for m in re.finditer(r"--set\s+([\w.]+)=", text)]
        candidates += [m.group(1) for m in re.finditer(r"(?:^|\s)((?:model|parallel|data|training)\.[\w.]+)=", text)]
        candidates += [span.split()[0].rstrip(":=,") for span in inline_spans(text) if span.split()]
        for candidate in candidates:
            match = CONFIG_KEY.match(candidate)
            if match and candidate.split("=")[0] not in FILE_NAMES and not TENSOR_NAME.search(candidate):
                yield path, candidate, match.groups()


def test_every_documented_config_key_exists():
    keys = list(documented_config_keys())
    assert len(keys) > 20, "the scan found almost no config keys: the pattern is broken"
    unknown = sorted({f"{path.name}: {text}" for path, text, groups in keys if not config_key_exists(*groups)})
    assert not unknown, unknown


def trainer_run_dir(words: list[str]) -> str | None:
    """training.run_dir from --set, else from a config in the repository (None: a config an example wrote)."""
    import yaml

    sets = [w.split("=", 1) for w in words if w.startswith("training.run_dir=")]
    if sets:
        return sets[-1][1]
    config = ROOT / words[words.index("--config") + 1]
    return yaml.safe_load(config.read_text())["training"]["run_dir"] if config.is_file() else None


def reads_and_writes(tool: str, words: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(paths the command reads, [(path, how)] it writes); how: "exact", "dir" (anything inside) or "prefix"."""
    reads, writes = [], []
    positional = [w for i, w in enumerate(words) if not w.startswith("-") and (i == 0 or not words[i - 1].startswith("--"))]
    for flag, value in zip(words, words[1:]):
        if flag in READ_FLAGS:
            reads.append(value)
        elif flag in WRITE_FLAGS:
            writes.append((value, "dir"))
        elif flag == "--output-prefix":
            writes.append((value, "prefix"))
        elif flag == "--model_args":
            reads += re.findall(r"export=([^,\s]+)", value)
    if tool in ("tools/convert_to_hf.py", "tools/convert_from_hf.py") and len(positional) >= 2:
        reads.append(positional[0])
        writes.append((positional[1], "dir"))
    run_dir = trainer_run_dir(words) if tool == "pretrain/pretrain_nvium.py" else None
    if run_dir:
        writes += [(run_dir, "exact"), (f"{run_dir}/checkpoints", "dir"), (f"{run_dir}/metrics.jsonl", "exact")]
        if not any(w.startswith("data.train_data=") for w in words):  # the bundled corpus, built in RUN_DIR/data
            writes += [(f"{run_dir}/{name}", "prefix") for name in TRAINER_DATA]
    return reads, writes


def covered(path: str, writes: list[tuple[str, str]]) -> bool:
    path = path.rstrip("/")
    return any(path == w.rstrip("/") or (how == "dir" and path.startswith(w.rstrip("/") + "/"))
               or (how == "prefix" and path.startswith(w)) for w, how in writes)


def example_steps(path: Path):
    """(reads, writes) per example command or Python line of PATH, in order."""
    quickstart = "runs/quickstart"
    for language, body in code_blocks(path.read_text()):
        if language == "python":
            yield re.findall(r"from_pretrained\(\"([^\"]+)\"", body), []
            continue
        for command in shell_commands(body):
            if re.search(r"\bscripts/quickstart\.sh\b", command):
                yield [], [(quickstart, "exact"), (f"{quickstart}/checkpoints", "dir"),
                           (f"{quickstart}/metrics.jsonl", "exact"), (f"{quickstart}/export", "dir"),
                           (f"{quickstart}/eval.json", "exact")] + [(f"{quickstart}/{n}", "prefix") for n in TRAINER_DATA]
            for tool, words in tool_invocations(command):
                yield reads_and_writes(tool, words)
        for python in re.findall(r"<<'?EOF'?\n(.*?)\nEOF", body, flags=re.S):
            yield re.findall(r"from_pretrained\(\"([^\"]+)\"", python), []


def test_every_path_an_example_reads_was_written_before():
    writes, missing, checked = [], [], 0
    for path in DOCS:
        for reads, step_writes in example_steps(path):
            for read in reads:
                if read.startswith(CHECKED_ROOTS):
                    checked += 1
                    if not covered(read, writes):
                        missing.append(f"{path.relative_to(ROOT)}: {read}")
            writes += step_writes
    assert checked > 10, "the scan found almost no example paths: the pattern is broken"
    assert not missing, f"read by an example but written by no earlier one: {missing}"


def test_the_rules_catch_what_they_are_for():
    """The scans see a wrong flag, a wrong key and a path nothing writes (the README's old evaluate example)."""
    assert "--max-new-tokens" in tool_options("tools/generate.py")
    assert "--max-new-token" not in tool_options("tools/generate.py")
    assert config_key_exists("training", "train_iters", None) and not config_key_exists("training", "train_iter", None)
    assert config_key_exists("training", "beta_controller", "k_up")
    quickstart = list(example_steps(ROOT / "README.md"))
    writes = [w for _, step_writes in quickstart for w in step_writes]
    assert covered("runs/quickstart/data/shakespeare_valid_text_document", writes)
    assert not covered("runs/quickstart/data/shakespeare_text_document", writes)
    assert not covered("runs/tiny/data/shakespeare_text_document", writes)


def walkthrough_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Train on your own text", 1)[1].split("\n## ", 1)[0]
    return [body for language, body in code_blocks(section) if language == "bash"]


@pytest.mark.slow  # tokenizer, preprocessing, 2-process training, export, evaluation, generation, HF (~3 minutes)
def test_walkthrough_runs_as_written(tmp_path):
    """README's "Train on your own text", every command as written, at tiny size (training.train_iters=4)."""
    for name in ("tools", "pretrain", "nvium_dist", "scripts"):
        (tmp_path / name).symlink_to(ROOT / name)
    tiny = ("--set training.train_iters=4 --set training.eval_interval=4 --set training.eval_iters=1 "
            "--set training.log_interval=1")
    blocks = walkthrough_blocks()
    assert len(blocks) == 5 and sum("pretrain/pretrain_nvium.py" in b for b in blocks) == 1
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    outputs = []
    for body in blocks:
        script = body.replace("--set training.run_dir=runs/mytext", f"--set training.run_dir=runs/mytext {tiny}")
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, text=True,
                              capture_output=True, stdin=subprocess.DEVNULL, timeout=900)
        assert done.returncode == 0, (script, done.stdout[-2000:], done.stderr[-3000:])
        outputs.append(done.stdout)
    for written in ("data/mytok.model", "data/mytext_valid_text_document.idx", "runs/mytext/checkpoints/latest",
                    "runs/mytext/export/model.safetensors", "runs/mytext/hf/config.json"):
        assert (tmp_path / written).exists(), written
    assert '"mixture_perplexity"' in outputs[3] and "\nThe with statement" in outputs[3]
    assert "\nThe with statement" in outputs[4]  # transformers' generate, after convert_to_hf's summary
