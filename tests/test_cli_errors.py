"""Every command-line tool, fed hostile input (missing paths, directories where files belong, files of the wrong
kind, a training run where an export belongs, out-of-range numbers), exits non-zero with one clear line on
stderr and no traceback; and every `--help` answers without importing torch.

The error cases run in one process (tests/cli_case_runner.py calls each tool's `main` as `python TOOL` would),
so the heavy imports happen once; the --help cases are real, separate interpreter runs.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = "pretrain/configs/tiny.yaml"
CLIS = sorted(f"tools/{p.name}" for p in (ROOT / "tools").glob("*.py")) + ["pretrain/pretrain_nvium.py"]

# (tool, arguments with {h} = the hostile-input directory, a fragment the last stderr line must hold)
CASES = [
    ("tools/ablate_routing.py", ["--only", "nosuchrun", "--work-dir", "{h}/ablations"], "unknown ablation(s)"),
    ("tools/ablate_routing.py", ["--nproc", "0"], "--nproc: must be >= 1"),
    ("tools/bench_checkpoint.py", ["--config", "{h}/missing.yaml"], "does not exist"),
    ("tools/bench_checkpoint.py", ["--saves", "0"], "--saves: must be >= 1"),
    ("tools/bench_decode.py", ["--synthetic", "--batch-sizes", "0"], "--batch-sizes: must be integers >= 1"),
    ("tools/bench_decode.py", ["--synthetic", "--batch-sizes", "1,x"], "is not a comma-separated list of integers"),
    ("tools/bench_decode.py", ["--synthetic", "--new-tokens", "0"], "--new-tokens: must be >= 1"),
    ("tools/bench_decode.py", ["--synthetic", "--repeats", "0"], "--repeats: must be >= 1"),
    ("tools/bench_decode.py", ["--model", "{h}/run"], "is a training run directory, not an export"),
    ("tools/bench_decode.py", ["--synthetic", "--cuda-graphs"], "--cuda-graphs needs --device cuda and batch 1"),
    ("tools/bench_memory.py", ["--config", TINY, "--micro-batches", "0"], "--micro-batches: must be integers >= 1"),
    ("tools/bench_memory.py", ["--config", TINY, "--seq-length", "-5"], "--seq-length: must be >= 1"),
    ("tools/bench_memory.py", ["--config", "{h}/bad.yaml"], "invalid YAML"),
    ("tools/bench_preprocess.py", ["--files", "0"], "--files: must be >= 1"),
    ("tools/bench_preprocess.py", ["--keep", "{h}/text.txt"], "is not an empty directory"),
    ("tools/bench_serve.py", ["--synthetic", "{h}/bench", "--rates", "fast"], "must be comma-separated positive"),
    ("tools/bench_serve.py", ["--model", "{h}/run", "--baseline", "{h}/run"], "is a training run directory"),
    ("tools/bench_serve.py", ["--model", "{h}/run"], "--model needs --baseline"),
    ("tools/bench_preprocess.py", ["--megatron", "{h}/emptydir"], "has no tools/preprocess_data.py"),
    ("tools/bench_train.py", ["--nproc", "0"], "--nproc: must be >= 1"),
    ("tools/bench_train.py", ["--config", "{h}/text.txt"], "must be a mapping of sections"),
    ("tools/build_default_corpus.py", ["--output-dir", "{h}/text.txt"], "is a file"),
    ("tools/build_default_corpus.py", ["--output-dir", "{h}/corpus", "--valid-fraction", "2"], "valid_fraction"),
    ("tools/convert_from_hf.py", ["{h}/missing", "{h}/out"], "is not a directory"),
    ("tools/convert_from_hf.py", ["{h}/emptydir", "{h}/out"], "no config.json"),
    ("tools/convert_from_hf.py", ["{h}/export", "{h}/out"], "is an nvium export already"),
    ("tools/convert_from_hf.py", ["{h}/list_config", "{h}/out"], "holds a JSON list, not an object"),
    ("tools/convert_from_hf.py", ["{h}/hf", "{h}/out", "--paper", "--router-temperature", "0"], "must be > 0"),
    ("tools/convert_to_hf.py", ["{h}/run", "{h}/out"], "is a training run directory, not an export"),
    ("tools/convert_to_hf.py", ["{h}/hf", "{h}/out"], "looks like a transformers directory"),
    ("tools/convert_to_hf.py", ["{h}/text.txt", "{h}/out"], "is a file, not an export directory"),
    ("tools/evaluate.py", ["--model", "{h}/run", "--data", "{h}/noidx"], "noidx.idx not found"),
    ("tools/evaluate.py", ["--model", "{h}/run", "--lm-eval", "hellaswag"], "is a training run directory"),
    ("tools/evaluate.py", ["--model", "{h}/run", "--lm-eval", "hellaswag", "--limit", "0"], "--limit: must be > 0"),
    ("tools/evaluate.py", ["--model", "{h}/run", "--lm-eval", "x", "--num-fewshot", "-1"], "must be >= 0"),
    ("tools/export_checkpoint.py", ["--checkpoint", "{h}/text.txt", "--output", "{h}/out"], "is a file"),
    ("tools/export_checkpoint.py", ["--checkpoint", "{h}/emptydir", "--output", "{h}/out"], "is not a checkpoint"),
    ("tools/export_checkpoint.py", ["--checkpoint", "{h}/export", "--output", "{h}/out"], "is an export"),
    ("tools/export_checkpoint.py", ["--checkpoint", "{h}/list_config", "--output", "{h}/out"],
     "holds a JSON list, not an object"),
    ("tools/export_checkpoint.py", ["--checkpoint", "{h}/run", "--output", "{h}/out", "--tp", "0"], "must be >= 1"),
    ("tools/generate.py", ["--model", "{h}/run", "--prompt", "x"], "is a training run directory, not an export"),
    ("tools/generate.py", ["--model", "{h}/emptydir", "--prompt", "x"], "has no config.json"),
    ("tools/generate.py", ["--model", "{h}/text_weights", "--prompt", "x"], "not a safetensors file"),
    ("tools/generate.py", ["--model", "{h}/run", "--prompt-file", "{h}/emptydir"], "Is a directory"),
    ("tools/generate.py", ["--model", "{h}/run", "--prompt-file", "{h}/junk.bin"], "is not UTF-8 text"),
    ("tools/generate.py", ["--model", "{h}/run", "--prompt", "x", "--max-batch", "0"], "--max-batch: must be >= 1"),
    ("tools/generate.py", ["--model", "{h}/run", "--prompt", "x", "--cuda-graphs"], "--cuda-graphs needs --device cuda"),
    ("tools/inspect_dataset.py", ["{h}/noidx"], "noidx.idx not found"),
    ("tools/inspect_dataset.py", ["{h}/corrupt"], "corrupt.idx"),
    ("tools/inspect_dataset.py", ["{h}/noidx", "--bins", "0"], "--bins: must be >= 1"),
    ("tools/merge_datasets.py", ["--inputs", "{h}/missing", "--output-prefix", "{h}/merged"], "not found"),
    ("tools/merge_datasets.py", ["--inputs", "{h}/corrupt", "--output-prefix", "{h}/merged"], "corrupt.idx"),
    ("tools/merge_datasets.py", ["--inputs", "{h}/noidx", "--output-prefix", "{h}/"], "ends in a directory"),
    ("tools/make_configs.py", ["--output-dir", "{h}/text.txt"], "cannot write the configs"),
    ("tools/make_configs.py", ["--output-dir", "{h}/handmade"], "was not written by this tool"),
    ("tools/model_info.py", ["--config", "{h}/junk.bin"], "cannot be read as text"),
    ("tools/model_info.py", ["--config", TINY, "--micro-batch", "0"], "--micro-batch: must be >= 1"),
    ("tools/preprocess_data.py", ["--input", "{h}/docs.jsonl", "--tokenizer-model", "{h}/text.txt",
                                  "--output-prefix", "{h}/out"], "is not a readable SentencePiece model"),
    ("tools/preprocess_data.py", ["--input", "{h}/missing.jsonl", "--tokenizer-model", "{h}/tok.model",
                                  "--output-prefix", "{h}/out"], "matches no file"),
    ("tools/preprocess_data.py", ["--input", "{h}/docs.jsonl", "--tokenizer-model", "{h}/tok.model",
                                  "--output-prefix", "{h}/text.txt/out"], "text.txt"),
    ("tools/preprocess_data.py", ["--input", "{h}/docs.jsonl", "--workers", "0", "--output-prefix", "{h}/out"],
     "--workers: must be >= 1"),
    ("tools/preprocess_data.py", ["--input", "{h}/ids.jsonl", "--input-ids-key", "input_ids", "--tokenizer-model",
                                  "{h}/tok.model", "--vocab-size", "65536", "--output-prefix", "{h}/ids"],
     "--vocab-size 65536 exceeds the 400 pieces of"),
    ("tools/merge_datasets.py", ["--inputs", "{h}/ds_text_document", "{h}/nosummary",
                                 "--output-prefix", "{h}/merged_unverified"], "no summary names the tokenizer of"),
    ("tools/evaluate.py", ["--model", "{h}/export", "--lm-eval", "x", "--include-path", "{h}/no_tasks"],
     "--include-path"),
    ("tools/generate.py", ["--model", "{h}/real_export", "--prompt-ids", "1,99999"],
     "token id 99999 is outside the vocabulary 0..299"),
    ("tools/generate.py", ["--model", "{h}/real_export", "--prompt-ids", "1", "--mode", "full", "--top-p", "1.5"],
     "--top-p: must be in (0, 1], got 1.5"),
    ("tools/generate.py", ["--model", "{h}/real_export", "--prompt-ids", "1", "--mode", "full", "--top-p", "0"],
     "--top-p: must be > 0"),
    ("tools/generate.py", ["--model", "{h}/real_export", "--prompt-ids", "1", "--mode", "full", "--temperature", "0"],
     "--temperature: must be > 0"),
    ("tools/replicate.py", ["--layers", "2", "--work-dir", "{h}/out", "--output-dir", "{h}/report"], "4 layers"),
    ("tools/replicate.py", ["--batch-sizes", "1,,0"], "--batch-sizes: must be integers >= 1"),
    ("tools/generate.py", ["--model", "{h}/missing", "--prompt-ids", "1,2;3"], "is not a comma-separated list"),
    ("tools/serve.py", ["--model", "{h}/run", "--port", "0"], "is a training run directory, not an export"),
    ("tools/serve.py", ["--model", "{h}/run", "--max-batch", "0"], "--max-batch: must be >= 1"),
    ("tools/scale_smoke.py", ["--config", "{h}/missing.yaml"], "does not exist"),
    ("tools/scale_smoke.py", ["--steps", "0"], "--steps: must be >= 1"),
    ("tools/train_tokenizer.py", ["--input", "{h}/missing.jsonl", "--output-prefix", "{h}/tok/x"], "matches no file"),
    ("tools/train_tokenizer.py", ["--input", "{h}/docs.jsonl", "--output-prefix", "{h}/tok/x", "--vocab-size", "100"],
     "too small"),
    ("tools/train_tokenizer.py", ["--input", "{h}/docs.jsonl", "--output-prefix", "{h}/tok/x",
                                  "--character-coverage", "2"], "character_coverage must be in [0.98, 1]"),
    ("tools/train_tokenizer.py", ["--input", "{h}/docs.jsonl", "--output-prefix", "{h}/tok/"], "ends in a directory"),
    ("pretrain/pretrain_nvium.py", ["--config", "{h}/emptydir"], "emptydir"),
    ("pretrain/pretrain_nvium.py", ["--config", TINY, "--set", "training.train_iters=0"], "train_iters must be > 0"),
    ("pretrain/pretrain_nvium.py", ["--config", TINY, "--set", "data.tokenizer_model={h}/tok.model",
                                    "--set", "training.run_dir={h}/run1"], "data.train_data is empty"),
    ("pretrain/pretrain_nvium.py", ["--config", TINY, "--set", "data.train_data=[{h}/ds]",
                                    "--set", "training.run_dir={h}/run2"], "data.tokenizer_model is empty"),
    ("pretrain/pretrain_nvium.py", ["--config", TINY, "--set", "data.train_data=[{h}/ds]", "--set", "model.vocab_size=256",
                                    "--set", "data.tokenizer_model={h}/tok.model", "--set", "training.run_dir={h}/run3"],
     "has 400 tokens but the model's vocabulary has only 256 rows"),
    ("pretrain/pretrain_nvium.py", ["--config", TINY, "--set", "data.train_data=[{h}/ds]",
                                    "--set", "data.tokenizer_model={h}/text.txt", "--set", "training.run_dir={h}/run4"],
     "is not a readable SentencePiece model"),
]


def _case_id(case) -> str:
    tool, args, _ = case
    return f"{Path(tool).stem}:{' '.join(args)}".replace("{h}/", "")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    """A directory of wrong inputs: text, binary junk, broken YAML, an empty directory, a .bin without .idx, a
    corrupt .idx, a training run directory, an export without weights, one whose weights are text, a
    transformers config; plus a real 400-piece tokenizer and a few JSONL documents."""
    from test_inference import make_export

    from nvium_dist.data.default_corpus import iter_documents
    from nvium_dist.data.preprocess import preprocess
    from nvium_dist.data.spm_train import train_sentencepiece

    h = tmp_path_factory.mktemp("hostile")
    (h / "text.txt").write_text("hello world\n")
    (h / "junk.bin").write_bytes(bytes(range(256)) * 4)
    (h / "bad.yaml").write_text("model: [unclosed\n")
    (h / "emptydir").mkdir()
    (h / "handmade").mkdir()
    (h / "list_config").mkdir()  # config.json (of a transformers dir or a step dir) that is JSON but not an object
    (h / "list_config" / "config.json").write_text("[]")
    (h / "list_config" / "model.safetensors").write_bytes(b"")
    (h / "handmade" / "tiny.yaml").write_text("model: {}\n")  # a user's file where make_configs would write
    (h / "noidx.bin").write_bytes(b"\0" * 64)
    (h / "corrupt.bin").write_bytes(b"\0" * 64)
    (h / "corrupt.idx").write_text("not an index\n")
    step = h / "run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    (h / "run" / "checkpoints" / "latest").write_text("step_00000001\n")
    (step / "config.json").write_text("{}")
    for export in ("export", "text_weights"):
        (h / export).mkdir()
        (h / export / "config.json").write_text(json.dumps({"format": "nvium-export", "version": 1, "model": {}}))
    (h / "text_weights" / "model.safetensors").write_text("not weights\n")
    (h / "hf").mkdir()
    (h / "hf" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    docs = [d.text for _, d in zip(range(5), iter_documents("scene"))]
    (h / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    train_sentencepiece(iter(docs), str(h / "tok"), vocab_size=400, num_threads=1)
    (h / "ids.jsonl").write_text(json.dumps({"input_ids": [1, 60000]}) + "\n")  # ids no 400-piece tokenizer makes
    preprocess([str(h / "docs.jsonl")], str(h / "ds"), str(h / "tok.model"), append_eod=True, progress=False)
    for suffix in (".bin", ".idx"):  # the same corpus without the summary that names its tokenizer
        shutil.copyfile(h / f"ds_text_document{suffix}", h / f"nosummary{suffix}")
    make_export(h / "real_export", vocab_size=300)
    return h


@pytest.fixture(scope="module")
def results(hostile, tmp_path_factory) -> dict:
    cases = [[tool, [a.replace("{h}", str(hostile)) for a in args]] for tool, args, _ in CASES]
    cases_file = tmp_path_factory.mktemp("cli_cases") / "cases.json"
    cases_file.write_text(json.dumps(cases))
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "cli_case_runner.py"), str(cases_file)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == len(CASES), done.stderr[-3000:]
    return {_case_id(case): json.loads(line) for case, line in zip(CASES, lines)}


def test_every_cli_has_error_cases():
    assert sorted({tool for tool, _, _ in CASES}) == sorted(CLIS)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_hostile_input_gives_one_error_line(case, results):
    tool, _, fragment = case
    result = results[_case_id(case)]
    stderr = result["stderr"]
    assert result["code"] not in (0, None), f"{tool} accepted it:\n{stderr[-2000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, f"{tool} exited {result['code']} without a message"
    last = lines[-1]
    assert "error" in last.lower() and fragment in last, last


def test_help_is_fast_and_imports_no_torch():
    """Every tool's --help as a real interpreter run: exit 0, usage on stdout, torch never imported."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    runs = {cli: subprocess.Popen([sys.executable, "-X", "importtime", cli, "--help"], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cli in CLIS}
    for cli, proc in runs.items():
        out, imports = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{cli}: {imports[-2000:]}"
        assert "usage:" in out, cli
        imported = {line.rsplit("|", 1)[-1].strip() for line in imports.splitlines() if line.startswith("import time")}
        assert not {"torch", "deepspeed", "megatron"} & imported, f"{cli} --help imports {sorted(imported)[:20]}"


@pytest.mark.slow  # starts the trainer's process group (~10 s)
def test_pretrain_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "run").write_text("mine\n")
    done = subprocess.run([sys.executable, "pretrain/pretrain_nvium.py", "--config", TINY,
                           "--set", f"training.run_dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"error: training.run_dir {tmp_path / 'run'} is a file; choose a directory"
    assert (tmp_path / "run").read_text() == "mine\n"


def test_config_error_under_torchrun_is_said_once():
    """Every rank finds the same typo; one line says so (torchrun then adds its own failure summary, exit 1)."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "pretrain/pretrain_nvium.py", "--config", TINY, "--set", "training.train_iter=10"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert done.returncode != 0
    assert done.stderr.count("config error:") == 1, done.stderr[-3000:]
    assert "exitcode  : 2" in done.stderr or "exitcode: 2" in done.stderr, done.stderr[-3000:]


def test_merged_summary_records_the_tokenizer(hostile, tmp_path):
    """Issue 22 case 7: a merge of inputs made with one tokenizer records it (so training's tokenizer check covers
    the result); with --allow-unverified an input without a summary is merged and the result vouches for none."""
    from nvium_dist.data.gpt_data import recorded_tokenizer
    from nvium_dist.data.merge import merge_datasets

    made_with = recorded_tokenizer(str(hostile / "ds_text_document"))
    assert made_with["sha256"]
    merged = merge_datasets([str(hostile / "ds_text_document")] * 2, str(tmp_path / "both"))
    assert merged["tokenizer"] == made_with and recorded_tokenizer(str(tmp_path / "both")) == made_with
    unverified = merge_datasets([str(hostile / "ds_text_document"), str(hostile / "nosummary")],
                                str(tmp_path / "mixed"), allow_unverified=True)
    assert "tokenizer" not in unverified and unverified["unverified_inputs"] == [str(hostile / "nosummary")]
    assert recorded_tokenizer(str(tmp_path / "mixed")) == {}
