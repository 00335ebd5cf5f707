"""lm-evaluation-harness model type `nvium`: an offline YAML task over a local JSONL file, scored through
lm-eval (library and `lm_eval` command), against log p_mix computed directly; rolling loglikelihood and
generate_until against nvium's own generator."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_hf_export import flattened
from test_inference import make_export

ROOT = Path(__file__).resolve().parents[1]
TASK = "nvium_toy_choice"
QUESTIONS = [("The sky is", ["blue", "green", "loud"], 0), ("Two plus two is", ["four", "five", "a fish"], 0),
             ("Water is", ["wet", "dry", "square"], 0), ("Cats say", ["meow", "moo", "quack"], 0),
             ("The sun rises in the", ["east", "west", "cellar"], 0), ("Ice is", ["cold", "hot", "purple"], 0),
             ("Birds can", ["fly", "sing", "swim"], 1), ("Fire is", ["hot", "cold", "blue"], 0),
             ("Grass is", ["green", "red", "tall"], 2), ("Snow is", ["white", "black", "warm"], 0)]


@pytest.fixture(scope="module", autouse=True)
def offline():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A byte-level N-vium export (vocab 300) with flat enough heads that choices differ moderately."""
    return flattened(make_export(tmp_path_factory.mktemp("lm_eval") / "export", vocab_size=300, seq_length=64), 0.1)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tasks")
    data = directory / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (directory / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    return directory


def direct_choice_scores(export):
    """sum log p_mix(" " + choice | question) with nvium's own generator (bytes: ids are the UTF-8 bytes)."""
    from nvium_dist.inference import NviumGenerator

    generator = NviumGenerator.from_pretrained(export)
    scores = []
    for question, choices, _ in QUESTIONS:
        row = []
        for choice in choices:
            context, continuation = list(question.encode()), list((" " + choice).encode())
            tokens = context + continuation
            log_mix = generator.mixture_logprobs(tokens[:-1])
            targets = torch.tensor(continuation)
            row.append(log_mix[len(context) - 1:].gather(-1, targets[:, None]).sum().item())
        scores.append(row)
    return scores


def expected_accuracy(scores):
    right = sum(max(range(3), key=row.__getitem__) == answer for row, (_, _, answer) in zip(scores, QUESTIONS))
    return right / len(QUESTIONS)


def test_multiple_choice_task_through_lm_eval(export, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import nvium_dist.evaluation.lm_eval_model  # noqa: F401 - registers `nvium`

    results = lm_eval.simple_evaluate(model="nvium", model_args={"export": str(export)}, tasks=[TASK],
                                      task_manager=TaskManager(include_path=str(task_dir)), batch_size=4,
                                      log_samples=True)
    scores = direct_choice_scores(export)
    expected_acc = expected_accuracy(scores)
    assert results["results"][TASK]["acc,none"] == pytest.approx(expected_acc, abs=1e-9)
    assert 0 < expected_acc < 1, "the toy task must separate right from wrong for the comparison to bite"
    for sample in results["samples"][TASK]:
        got = [resp[0][0] for resp in sample["resps"]]
        assert got == pytest.approx(scores[sample["doc_id"]], abs=1e-4)


def test_lm_eval_command_finds_the_nvium_model(export, task_dir, tmp_path):
    """The plain `lm_eval` console script (the site hook that scripts/setup.sh installs registers `nvium`)."""
    import sysconfig

    from nvium_dist.evaluation.lm_eval_hook import PTH_FILE

    assert (Path(sysconfig.get_paths()["purelib"]) / PTH_FILE).is_file(), \
        "the lm_eval site hook is not installed: run scripts/setup.sh " \
        "(python -m nvium_dist.evaluation.lm_eval_hook install)"
    def lm_eval(model_args):
        command = [str(Path(sys.executable).with_name("lm_eval")), "--model", "nvium", "--model_args", model_args,
                   "--tasks", TASK, "--include_path", str(task_dir), "--batch_size", "4",
                   "--output_path", str(tmp_path / "out")]
        return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))

    # batch_size in --model_args (a documented model argument) and lm-eval's own --batch_size: the first wins
    result = lm_eval(f"export={export},batch_size=8")
    assert result.returncode == 0, result.stderr[-3000:]
    (results_file,) = list((tmp_path / "out").rglob("results_*.json"))
    expected_acc = expected_accuracy(direct_choice_scores(export))
    assert json.loads(results_file.read_text())["results"][TASK]["acc,none"] == pytest.approx(expected_acc)
    # a wrong export path is one line, no traceback (issue 22 case 12)
    result = lm_eval(f"export={tmp_path / 'nowhere'}")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: nvium: export directory {tmp_path / 'nowhere'}")


@pytest.fixture(scope="module")
def lm(export):
    from nvium_dist.evaluation.lm_eval_model import NviumLM

    return NviumLM(export=str(export), batch_size=3)


def instance(kind, *args):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_rolling_loglikelihood(lm):
    """A short text: every byte scored after the prefix token, exactly; a text longer than the context: each
    token scored once, in lm-eval's windows."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    short = "To be, or not to be"
    long = "All the world's a stage, and all the men and women merely players. " * 3
    got = lm.loglikelihood_rolling([instance("loglikelihood_rolling", short), instance("loglikelihood_rolling", long)])
    tokens = [lm.prefix_token_id] + list(short.encode())
    log_mix = lm.generator.mixture_logprobs(tokens[:-1])
    assert got[0] == pytest.approx(log_mix.gather(-1, torch.tensor(tokens[1:])[:, None]).sum().item(), abs=1e-4)
    total, scored = 0.0, 0
    for context, target in map(make_disjoint_window, get_rolling_token_windows(list(long.encode()), lm.prefix_token_id,
                                                                               lm.max_length, 1)):
        whole = context + target
        log_mix = lm.generator.mixture_logprobs(whole[:-1])
        total += log_mix[len(context) - 1:].gather(-1, torch.tensor(target)[:, None]).sum().item()
        scored += len(target)
    assert scored == len(long.encode()) and len(long.encode()) > lm.max_length
    assert got[1] == pytest.approx(total, abs=1e-3)


def test_generate_until_uses_the_exact_sampler_and_greedy(lm):
    prompts = ["Once upon", "The quick brown", "Hello"]
    sampled = lm.generate_until([instance("generate_until", p, {"until": [], "max_gen_toks": 12, "do_sample": True,
                                                                "temperature": 1.0}) for p in prompts])
    reference = lm.generator.generate([list(p.encode()) for p in prompts], 12, seed=lm.seed, mode="deferred",
                                      sequence_ids=[0, 1, 2])
    assert sampled == [lm.tok_decode(t) for t in reference.tokens]
    greedy = lm.generate_until([instance("generate_until", p, {"until": ["e"], "max_gen_toks": 10}) for p in prompts])
    full = lm.generator.generate([list(p.encode()) for p in prompts], 10, mode="full", greedy=True)
    for text, tokens in zip(greedy, full.tokens):
        whole = lm.tok_decode(tokens)
        assert text == whole.split("e")[0] and "e" not in text


def test_evaluate_tool_runs_lm_eval_tasks(export, task_dir):
    def evaluate(*args):
        return subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), "--model", str(export), *args],
                              capture_output=True, text=True, timeout=600, cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))

    result = evaluate("--lm-eval", TASK, "--include-path", str(task_dir), "--batch-size", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    expected_acc = expected_accuracy(direct_choice_scores(export))
    assert json.loads(result.stdout)["results"][TASK]["acc,none"] == pytest.approx(expected_acc)
    unknown = evaluate("--lm-eval", "no_such_task_anywhere")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert unknown.stderr.strip().splitlines()[-1].startswith("error: lm-eval:")
    hub_task = evaluate("--lm-eval", "hellaswag", "--limit", "1")  # its data lives on the Hub; offline here
    assert hub_task.returncode == 2 and "Traceback" not in hub_task.stderr, hub_task.stderr[-3000:]
    last = hub_task.stderr.strip().splitlines()[-1]
    assert last.startswith("error: lm-eval could not fetch") and "--include-path" in last
