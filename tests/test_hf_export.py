"""nvium exports -> transformers directories: stock LLaMA for dense models, the mixture model for N-vium
(logits = log p_mix, sampled exactly by transformers' own generate), tokenizer files, the CLI's rules."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_fixtures import corpus, tokenizer  # noqa: F401
from test_inference import make_export

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def offline_modules(tmp_path_factory):
    """transformers copies remote code into HF_MODULES_CACHE; keep it out of the home directory."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ["HF_MODULES_CACHE"] = str(tmp_path_factory.mktemp("hf_modules"))
    yield
    torch.set_num_threads(previous)


def flattened(export_dir, factor):
    """The same export with its output matrix scaled by `factor` (flatter or peakier heads)."""
    from nvium_dist.checkpoint_io import load_export, save_export

    export = load_export(export_dir)
    state = dict(export.state, **{"output.weight": export.state["output.weight"] * factor})
    target = Path(str(export_dir) + f"-x{factor}")
    save_export(target, export.model_config, state, export.tokenizer_path or export.tokenizer_type)
    return target


@pytest.fixture(scope="module")
def nvium_pair(tmp_path_factory):
    from nvium_dist.hf.to_hf import convert_export

    root = tmp_path_factory.mktemp("hf_nvium")
    export = flattened(make_export(root / "export", vocab_size=300), 0.1)
    summary = convert_export(export, root / "hf")
    assert summary["class"] == "NviumForCausalLM" and summary["self_check_max_abs_diff"] <= 1e-5
    return export, root / "hf"


def load_generator(export_dir):
    from nvium_dist.inference import NviumGenerator

    return NviumGenerator.from_pretrained(export_dir)


def load_hf(directory, remote):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), trust_remote_code=remote, dtype=torch.float32).eval()


def test_modeling_mixture_is_nviums_mixture():
    """The modeling file's own mixture function against nvium_dist.mixture, router logits up to +-80
    (where pi falls below the 1e-8 floor): a change to either shows up here."""
    from nvium_dist.hf.modeling_nvium import log_mixture
    from nvium_dist.mixture import log_exit_weights, log_mixture_distribution, router_log_probs

    generator = torch.Generator().manual_seed(0)
    for heads in (2, 3, 4):
        head_log_probs = torch.log_softmax(torch.randn(5, 7, heads, 11, generator=generator) * 3, dim=-1)
        routers = torch.randn(5, 7, heads - 1, 2, generator=generator) * 40
        routers[0, 0] = torch.tensor([80.0, -80.0])
        routers[0, 1] = torch.tensor([-80.0, 80.0])
        log_p_mix, q, log_pi = log_mixture(head_log_probs, routers)
        torch.testing.assert_close(log_p_mix, log_mixture_distribution(head_log_probs, routers), rtol=0, atol=1e-6)
        log_q, log_continue = router_log_probs(routers)
        torch.testing.assert_close(q, log_q.exp(), rtol=0, atol=0)
        torch.testing.assert_close(log_pi, log_exit_weights(log_q, log_continue), rtol=0, atol=1e-6)
        assert bool((log_pi < np.log(1e-8)).any()), "the +-80 rows must reach the pi floor"


def test_nvium_logits_are_the_mixture(nvium_pair):
    export, hf_dir = nvium_pair
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_nvium.NviumForCausalLM"
    assert (hf_dir / "modeling_nvium.py").is_file()
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert generation["do_sample"] is True and generation["top_k"] == 0 and generation["top_p"] == 1.0
    model, generator = load_hf(hf_dir, remote=True), load_generator(export)
    assert type(model).__name__ == "NviumForCausalLM"
    tokens = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(tokens)
    torch.testing.assert_close(out.logits, generator.mixture_logprobs(tokens), rtol=0, atol=1e-5)
    head_log_probs, routers = generator.head_outputs(tokens)
    torch.testing.assert_close(out.head_log_probs, head_log_probs, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.exit_probs, torch.softmax(routers, -1)[..., 1], rtol=0, atol=1e-6)
    assert torch.allclose(out.mixture_weights.sum(-1), torch.ones(3, 40), atol=1e-5)
    labels = tokens.clone()
    loss = model(tokens, labels=labels).loss
    expected = -generator.mixture_logprobs(tokens)[:, :-1].gather(-1, tokens[:, 1:, None]).mean()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)


def test_cached_and_padded_generation_equal_full_recompute(nvium_pair):
    """Greedy decoding through transformers' KV cache, batched with left padding, picks the argmax of a
    full forward over the growing sequence at every step."""
    _, hf_dir = nvium_pair
    model = load_hf(hf_dir, remote=True)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]

    def reference(prompt, steps):
        sequence = list(prompt)
        for _ in range(steps):
            with torch.no_grad():
                logits = model(torch.tensor([sequence]), use_cache=False).logits
            sequence.append(int(logits[0, -1].argmax()))
        return sequence[len(prompt):]

    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, prompt in enumerate(prompts):
        assert out[row, width:].tolist() == reference(prompt, 6)


def chi_square_pvalue(counts, probs):
    from scipy.stats import chisquare

    expected = probs * counts.sum()
    order = np.argsort(-expected)
    keep = order[expected[order] >= 5]
    rest = order[expected[order] < 5]
    observed = np.append(counts[keep], counts[rest].sum())
    wanted = np.append(expected[keep], expected[rest].sum())
    return chisquare(observed, wanted * observed.sum() / wanted.sum()).pvalue


def test_transformers_generate_samples_the_mixture(nvium_pair, capfd, caplog):
    """20,000 next tokens drawn by transformers' generate(do_sample=True) with the shipped generation
    config against p_mix (chi-square); the final head alone and transformers' default top-k 50 both fail.
    generate(max_new_tokens=...) says nothing about max_length (the shipped config sets none)."""
    export, hf_dir = nvium_pair
    model, generator = load_hf(hf_dir, remote=True), load_generator(export)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    p_mix = generator.mixture_logprobs(prompt)[-1].double().exp().numpy()
    p_final = generator.head_outputs(prompt)[0][0, -1, -1].double().exp().numpy()
    assert 1 - np.sort(p_mix)[-50:].sum() > 0.05, "p_mix must put mass outside its top 50 for the test to bite"
    torch.manual_seed(0)
    draws = []
    with torch.no_grad():
        for _ in range(4):
            out = model.generate(torch.tensor([prompt] * 5000), max_new_tokens=1)
            draws.append(out[:, -1])
    assert "max_length" not in capfd.readouterr().err + caplog.text
    counts = np.bincount(torch.cat(draws).numpy(), minlength=300)
    assert chi_square_pvalue(counts, p_mix) > 1e-3
    assert chi_square_pvalue(counts, p_final) < 1e-6
    top50 = np.zeros_like(p_mix)
    top = np.argsort(-p_mix)[:50]
    top50[top] = p_mix[top] / p_mix[top].sum()
    assert chi_square_pvalue(counts, top50 + 1e-12) < 1e-6


def test_dense_export_is_a_stock_llama(tmp_path):
    from transformers import LlamaForCausalLM

    from nvium_dist.hf.to_hf import convert_export

    export = make_export(tmp_path / "dense", vocab_size=300, exits=[])
    convert_export(export, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert not (tmp_path / "hf" / "modeling_nvium.py").exists()
    model = load_hf(tmp_path / "hf", remote=False)
    assert type(model) is LlamaForCausalLM
    tokens = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        log_probs = torch.log_softmax(model(tokens).logits.float(), dim=-1)
    torch.testing.assert_close(log_probs, load_generator(export).mixture_logprobs(tokens), rtol=0, atol=1e-5)


def test_sentencepiece_tokenizer_files_give_nviums_ids(tmp_path, corpus, tokenizer):
    from transformers import AutoTokenizer

    from nvium_dist.hf.to_hf import convert_export

    export = make_export(tmp_path / "export", vocab_size=1000, exits=[], tokenizer=corpus["model"])
    summary = convert_export(export, tmp_path / "hf")
    assert {"tokenizer.json", "tokenizer.model"} <= set(summary["tokenizer"])
    hf_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    texts = corpus["texts"]["a"][:20] + ["  two spaces", "</s> literal", "ünïcödé 🙂\n\n", ""]
    for text in texts:
        ids = tokenizer.encode(text)
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ids
        assert hf_tokenizer(text).input_ids == ids, "no BOS: nvium trains without one"
        assert hf_tokenizer.decode(ids) == tokenizer.decode(ids)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["bos_token_id"], generation["pad_token_id"]) == (2, 1, 3)


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "convert_to_hf.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_cli_output_dir_rules(tmp_path, nvium_pair):
    export, _ = nvium_pair
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = run_cli(export, foreign)
    assert result.returncode == 2 and "not an earlier output" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert (foreign / "notes.txt").read_text() == "mine"
    from nvium_dist.hf.to_hf import convert_export
    from nvium_dist.output_dir import OutputDirError

    out = tmp_path / "out"
    convert_export(export, out, check=False)
    convert_export(export, out, check=False)  # re-running over its own output is allowed
    with pytest.raises(OutputDirError, match="not an earlier output"):  # --force never replaces what it did not write
        convert_export(export, foreign, check=False, force=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    missing = run_cli(tmp_path / "nope", tmp_path / "x")
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_exported_and_converted_files_follow_the_umask(tmp_path):
    """Weights are as readable as every other file (safetensors alone creates 0600): a shared file system's
    group can read an export and its transformers directory."""
    from nvium_dist.hf.to_hf import convert_export

    previous = os.umask(0o002)
    try:
        export = make_export(tmp_path / "export", vocab_size=300, exits=[])
        convert_export(export, tmp_path / "hf")
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777)
             for p in tmp_path.rglob("*") if p.is_file()}
    assert "export/model.safetensors" in modes and "hf/model.safetensors" in modes
    assert set(modes.values()) == {oct(0o664)}, modes
