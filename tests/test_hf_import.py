"""transformers directories -> nvium: a LLaMA becomes a run directory the trainer continues from; the
paper's N-vium checkpoint layout becomes an export whose heads, routers and mixture equal a plain-torch
forward of that layout."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distributed_runner import run_distributed
from trainer_fixtures import build_small_corpus, read_metrics, small_overrides

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_llama(vocab, layers, seed=0, max_positions=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=max_positions, rms_norm_eps=1e-6)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # trained-looking norms and a sharper output matrix than the 0.02 init
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
        model.lm_head.weight.mul_(20.0)
    return model


def layer_outputs(model, tokens):
    """The residual stream after every decoder layer of a transformers LLaMA (forward hooks)."""
    outputs = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for layer in model.model.layers]
    with torch.no_grad():
        logits = model(tokens).logits
    for hook in hooks:
        hook.remove()
    return outputs, logits


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "convert_from_hf.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_small_corpus(tmp_path_factory.mktemp("hf_import_corpus"))


def resume_one_step(rank, world_size, config_path):
    from nvium_dist.config import load_config
    from nvium_dist.training.trainer import Trainer

    config = load_config(config_path, ["training.train_iters=1", "training.lr=1e-4", "training.eval_interval=1",
                                       "training.save_interval=1"])
    trainer = Trainer(config)
    code = trainer.train()
    return code, read_metrics(config.training.run_dir)


def test_llama_becomes_a_run_the_trainer_continues(corpus, tmp_path):
    from safetensors.torch import load_file

    from nvium_dist.config import load_config
    from nvium_dist.inference.generator import ensure_process_group
    from nvium_dist.model import NviumModel
    from nvium_dist.tp_layout import load_full_state_dict

    llama = tiny_llama(vocab=512, layers=4)
    hf_dir = tmp_path / "llama"
    llama.save_pretrained(hf_dir)
    (hf_dir / "tokenizer.model").write_bytes(Path(corpus["tokenizer"]).read_bytes())
    run_dir = tmp_path / "run"
    overrides = [o for o in small_overrides(corpus, run_dir) if not o.startswith(("model.", "data.tokenizer_model"))]
    result = run_cli(hf_dir, run_dir, "--exits", "1,2,3", *[arg for o in overrides for arg in ("--set", o)])
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["exits"] == [1, 2, 3] and summary["fresh_parts"] == ["adapter", "router"]
    config = load_config(run_dir / "config.yaml")
    assert config.data.tokenizer_model == str(run_dir / "data" / "tokenizer.model")
    step0 = run_dir / "checkpoints" / "step_00000000"
    imported = load_file(step0 / "model.safetensors")
    exported = subprocess.run([sys.executable, str(ROOT / "tools" / "export_checkpoint.py"), "--checkpoint", str(step0),
                               "--output", str(tmp_path / "export0")], capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0 and "self-check" in exported.stdout, exported.stderr  # weights and sample agree

    # with the routers forced to continue, the converted model is the LLaMA (the final adapter starts as identity)
    ensure_process_group("cpu")
    model = NviumModel(config.model, initialise=False)
    load_full_state_dict(model, imported)
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        terms = model.eval()(tokens[:, :-1], tokens[:, 1:], force_continue=True)
        expected = torch.log_softmax(llama(tokens[:, :-1]).logits.float(), -1).gather(-1, tokens[:, 1:, None])[..., 0]
    torch.testing.assert_close(terms.log_p_mix, expected, rtol=0, atol=1e-5)
    for k in range(3):
        assert torch.equal(imported[f"heads.{k}.norm.weight"], imported["heads.3.norm.weight"])

    # the trainer resumes it at step 0 (weights only) and trains one step
    code, (train, _) = run_distributed(resume_one_step, 1, str(run_dir / "config.yaml"), timeout=600)[0]
    assert code == 0 and sorted(train) == [1]
    after = load_file(run_dir / "checkpoints" / "step_00000001" / "model.safetensors")
    moved = max((after[n] - imported[n]).abs().max().item() for n in imported if n.startswith("layers."))
    assert 0 < moved < 2e-3, f"backbone moved by {moved}: a fresh start would move it by ~0.1"
    state = json.loads((run_dir / "checkpoints" / "step_00000001" / "trainer_state.json").read_text())
    assert state["step"] == 1


def test_llama_import_refusals(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    gqa = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2))
    gqa.save_pretrained(tmp_path / "gqa")
    result = run_cli(tmp_path / "gqa", tmp_path / "out")
    assert result.returncode == 2 and "num_key_value_heads=2" in result.stderr and "Traceback" not in result.stderr
    from safetensors.torch import save_file

    llama = tiny_llama(vocab=64, layers=2)
    llama.config.save_pretrained(tmp_path / "partial")
    weights = {k: v for k, v in llama.state_dict().items() if "layers.1.mlp.up" not in k}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "partial" / "model.safetensors"))
    result = run_cli(tmp_path / "partial", tmp_path / "out", "--exits", "1")
    assert result.returncode == 2 and "model.layers.1.mlp.up_proj.weight" in result.stderr, result.stderr
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not read")
    result = run_cli(tmp_path / "pickled", tmp_path / "out")
    assert result.returncode == 2 and "pickled weights are not read" in result.stderr
    assert not (tmp_path / "out").exists()


def write_declared_safetensors(path: Path, tensors: dict, declared: dict[str, tuple[int, ...]]) -> None:
    """A safetensors file holding `tensors`, plus float32 tensors of the `declared` shapes whose bytes are a
    sparse hole at the end: the file has the full size its header describes, and no disk space behind it."""
    import struct

    header, data, offset = {}, [], 0
    for name, tensor in tensors.items():
        raw = tensor.contiguous().float().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(raw)]}
        data.append(raw)
        offset += len(raw)
    for name, shape in declared.items():
        size = 4 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded + b"".join(data))
        f.truncate(8 + len(encoded) + offset)


def test_mismatched_weights_are_refused_from_their_header_before_any_is_read(tmp_path):
    """config.json says a vocabulary of 64; model.safetensors declares an embedding of 2^34 x 64 (4 TiB, a sparse
    hole on disk, more than the process can even map). The shapes are checked from the headers first, so the
    refusal names the mismatch in one line (exit code 2) instead of failing to load the data (or, for a real
    file, reading it whole before refusing it)."""
    llama = tiny_llama(vocab=64, layers=2)
    llama.config.save_pretrained(tmp_path / "llama")
    weights = {k: v for k, v in llama.state_dict().items() if k != "model.embed_tokens.weight"}
    declared = (2**34, 64)
    write_declared_safetensors(tmp_path / "llama" / "model.safetensors", weights,
                               {"model.embed_tokens.weight": declared})
    result = run_cli(tmp_path / "llama", tmp_path / "out", "--exits", "1")
    assert result.returncode == 2, result.stderr
    assert [line for line in result.stderr.splitlines() if "error" in line.lower()] == [
        f"convert_from_hf.py: error: {tmp_path / 'llama'}/config.json does not describe its weights: "
        f"model.embed_tokens.weight is {declared}, config.json says (64, 64)"], result.stderr
    assert not (tmp_path / "out").exists()


# -- the paper's layout ---------------------------------------------------------------------------------

EXITS = [1, 2, 4]


def rms(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class ReferenceExtras(nn.Module):
    """The modules the paper's NviumModel adds to a LlamaForCausalLM, under its attribute names: a narrower
    adapter (48) than nvium's, to exercise the zero padding, and a router width (44) no ratio gives."""

    def __init__(self, d=64, adapter=48, router=44):
        super().__init__()
        def adapter_block():
            return nn.Sequential(nn.Linear(d, adapter, bias=False), nn.SiLU(), nn.Linear(adapter, d, bias=False))

        def router_block():
            block = nn.Module()
            block.fc1, block.fc2 = nn.Linear(d, router), nn.Linear(router, d)
            body = nn.Module()
            body.layers = nn.Sequential(block)
            return body

        self.early_norms = nn.ModuleList(nn.LayerNorm(d, bias=False) for _ in EXITS)  # only .weight is used
        self.early_adapters = nn.ModuleList(adapter_block() for _ in EXITS)
        self.router_layers = nn.ModuleList(router_block() for _ in EXITS)
        self.router_final_norms = nn.ModuleList(nn.LayerNorm(d, bias=False) for _ in EXITS)
        self.router_heads = nn.ModuleList(nn.Linear(d, 2) for _ in EXITS)
        self.final_adapter = adapter_block()
        with torch.no_grad():
            for name, param in self.named_parameters():
                if "norm" in name:
                    param.uniform_(0.5, 1.5)
                else:
                    param.normal_(std=0.3 if "router_heads" in name else 0.15)


def reference_forward(llama, extras, tokens, temperature):
    """The paper's model, written out: per-head log-softmaxes, router logits / T, and its mixture
    (pi from the unclamped router probabilities, floored at 1e-8 inside the log)."""
    hidden, _ = layer_outputs(llama, tokens)
    eps = llama.config.rms_norm_eps

    def adapt(block, n):
        return n + block[2](F.silu(block[0](n)))

    head_log_probs, routers = [], []
    with torch.no_grad():
        for k, layer in enumerate(EXITS):
            n = rms(hidden[layer - 1], extras.early_norms[k].weight, eps)
            head_log_probs.append(torch.log_softmax(llama.lm_head(adapt(extras.early_adapters[k], n)), -1))
            mlp = extras.router_layers[k].layers[0]
            r = rms(mlp.fc2(F.gelu(mlp.fc1(n))), extras.router_final_norms[k].weight, eps)
            routers.append(extras.router_heads[k](r) / temperature)
        n = rms(hidden[-1], llama.model.norm.weight, eps)
        head_log_probs.append(torch.log_softmax(llama.lm_head(adapt(extras.final_adapter, n)), -1))
        reached, pis = torch.ones(tokens.shape), []
        for logits in routers:
            probs = torch.softmax(logits, -1)
            pis.append(reached * probs[..., 1])
            reached = reached * probs[..., 0]
        pis.append(reached)
        log_mix = torch.logsumexp(torch.stack([torch.log(pi.clamp(1e-8, 1.0))[..., None] + lp
                                               for pi, lp in zip(pis, head_log_probs)]), dim=0)
    return torch.stack(head_log_probs, -2), torch.stack(routers, -2), log_mix


@pytest.fixture(scope="module")
def paper_checkpoint(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("paper")
    llama = tiny_llama(vocab=512, layers=6, seed=1)  # the small corpus tokenizer's size
    torch.manual_seed(2)
    extras = ReferenceExtras()
    state = {**llama.state_dict(), **extras.state_dict()}
    state["early_lm_heads.0.weight"] = state["lm_head.weight"]  # tied: present in some saves, dropped in others
    hf_dir = root / "hf"
    llama.config.save_pretrained(hf_dir)
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(hf_dir / "model.safetensors"))
    return llama, extras, hf_dir


def test_paper_checkpoint_matches_its_plain_forward(paper_checkpoint, tmp_path):
    from nvium_dist.inference import NviumGenerator

    llama, extras, hf_dir = paper_checkpoint
    result = run_cli(hf_dir, tmp_path / "export", "--paper", "--exits", ",".join(map(str, EXITS)),
                     "--router-temperature", "2.0")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["router_hidden_size"] == 44  # the checkpoint's router width, kept
    generator = NviumGenerator.from_pretrained(tmp_path / "export")
    assert generator.config.norm_eps == 1e-6 and generator.config.exits == EXITS
    tokens = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(3))
    expected_heads, expected_routers, expected_mix = reference_forward(llama, extras, tokens, 2.0)
    head_log_probs, routers = generator.head_outputs(tokens)
    torch.testing.assert_close(head_log_probs, expected_heads, rtol=0, atol=1e-5)
    torch.testing.assert_close(routers, expected_routers, rtol=0, atol=1e-5)
    torch.testing.assert_close(generator.mixture_logprobs(tokens), expected_mix, rtol=0, atol=1e-5)
    pi_spread = torch.softmax(expected_routers, -1)[..., 1]
    assert 0.05 < pi_spread.mean() < 0.95, "routers must mix the heads for the comparison to mean something"
    out = generator.generate([[5, 6, 7]], max_new_tokens=8, seed=0)
    assert len(out.tokens[0]) == 8


def test_paper_checkpoint_refusals(paper_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, hf_dir = paper_checkpoint
    result = run_cli(hf_dir, tmp_path / "export", "--paper")
    assert result.returncode == 2 and "early_layer_idx" in result.stderr and "Traceback" not in result.stderr
    result = run_cli(hf_dir, tmp_path / "run")
    assert result.returncode == 2 and "--paper" in result.stderr
    untied = tmp_path / "untied"
    untied.mkdir()
    (untied / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    state = load_file(hf_dir / "model.safetensors")
    state["early_lm_heads.1.weight"] = state["lm_head.weight"] + 1.0
    save_file(state, str(untied / "model.safetensors"))
    result = run_cli(untied, tmp_path / "export", "--paper", "--exits", "1,2,4", "--router-temperature", "1")
    assert result.returncode == 2 and "not tied" in result.stderr
    # the router temperature never defaults silently (the paper's config.json does not record it)
    result = run_cli(hf_dir, tmp_path / "export", "--paper", "--exits", "1,2,4")
    assert result.returncode == 2 and "pass --router-temperature" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "export").exists()


def paper_run_layout(paper_checkpoint, root: Path, run_config: str) -> Path:
    """The paper's run directory: RUN/.hydra/config.yaml and RUN/checkpoints/checkpoint-10/ (the HF checkpoint)."""
    _, _, hf_dir = paper_checkpoint
    checkpoint = root / "run" / "checkpoints" / "checkpoint-10"
    checkpoint.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (checkpoint / name).write_bytes((hf_dir / name).read_bytes())
    (root / "run" / ".hydra").mkdir()
    (root / "run" / ".hydra" / "config.yaml").write_text(run_config)
    return checkpoint


def test_paper_settings_come_from_the_hydra_config(paper_checkpoint, tmp_path):
    """Case 14: early_layer_idx and router.router_temp are read from the run's .hydra/config.yaml (two levels
    above checkpoints/checkpoint-N); the flags still override them."""
    from nvium_dist.inference import NviumGenerator

    llama, extras, _ = paper_checkpoint
    checkpoint = paper_run_layout(paper_checkpoint, tmp_path, "early_layer_idx: [1, 2, 4]\nrouter:\n  router_temp: 2.0\n")
    result = run_cli(checkpoint, tmp_path / "export", "--paper")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    hydra = str(tmp_path / "run" / "checkpoints" / "checkpoint-10" / "../../.hydra/config.yaml")
    assert summary["exits"] == EXITS and summary["router_temperature"] == 2.0
    assert summary["settings_from"] == {"exits": hydra, "router_temperature": hydra}
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    _, expected_routers, expected_mix = reference_forward(llama, extras, tokens, 2.0)
    generator = NviumGenerator.from_pretrained(tmp_path / "export")
    torch.testing.assert_close(generator.head_outputs(tokens)[1], expected_routers, rtol=0, atol=1e-5)
    torch.testing.assert_close(generator.mixture_logprobs(tokens), expected_mix, rtol=0, atol=1e-5)
    result = run_cli(checkpoint, tmp_path / "export1", "--paper", "--router-temperature", "1.5")
    assert result.returncode == 0 and json.loads(result.stdout)["settings_from"]["router_temperature"] == \
        "--router-temperature"
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text("early_layer_idx: [1, 2, 4]\nrouter: {}\n")
    result = run_cli(checkpoint, tmp_path / "export2", "--paper")
    assert result.returncode == 2 and "pass --router-temperature" in result.stderr


@pytest.mark.slow  # builds the small corpus and trains a step (~60 s)
def test_paper_checkpoint_becomes_a_run_the_trainer_continues(paper_checkpoint, corpus, tmp_path):
    """Case 13: --paper --to run writes a run directory whose step 0 holds the paper's weights (every part,
    the routers' temperature folded in) and which the trainer continues."""
    from nvium_dist.inference import NviumGenerator

    llama, extras, _ = paper_checkpoint
    checkpoint = paper_run_layout(paper_checkpoint, tmp_path, "early_layer_idx: [1, 2, 4]\nrouter:\n  router_temp: 2.0\n")
    run_dir = tmp_path / "nvium_run"
    overrides = [o for o in small_overrides(corpus, run_dir) if not o.startswith(("model.", "data.tokenizer_model"))]
    overrides.append(f"data.tokenizer_model={corpus['tokenizer']}")
    result = run_cli(checkpoint, run_dir, "--paper", "--to", "run", *[arg for o in overrides for arg in ("--set", o)])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["router_temperature"] == 2.0
    step0 = run_dir / "checkpoints" / "step_00000000"
    exported = subprocess.run([sys.executable, str(ROOT / "tools" / "export_checkpoint.py"), "--checkpoint", str(step0),
                               "--output", str(tmp_path / "export0"), "--tokenizer", "none"],
                              capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert exported.returncode == 0 and "self-check" in exported.stdout, exported.stderr
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(4))
    _, _, expected_mix = reference_forward(llama, extras, tokens, 2.0)
    generator = NviumGenerator.from_pretrained(tmp_path / "export0")
    torch.testing.assert_close(generator.mixture_logprobs(tokens), expected_mix, rtol=0, atol=1e-5)
    code, (train, _) = run_distributed(resume_one_step, 1, str(run_dir / "config.yaml"), timeout=600)[0]
    assert code == 0 and sorted(train) == [1]


def documented_paper_names(num_exits: int) -> dict[str, str]:
    """nvium HF name -> the paper's name, from the table in docs/hostile-input.md ({k}, {K-1}, {weight,bias})."""
    import re

    text = (ROOT / "docs" / "hostile-input.md").read_text()
    rows = re.findall(r"^\| `(heads\.[^`]+)` \| `([^`]+)`", text, flags=re.M)
    assert len(rows) == 10, rows
    mapping = {}
    for ours, theirs in rows:
        for suffix in (["weight", "bias"] if "{weight,bias}" in ours else [None]):
            a, b = (ours, theirs) if suffix is None else (ours.replace("{weight,bias}", suffix),
                                                          theirs.replace("{weight,bias}", suffix))
            if "{K-1}" in a:
                mapping[a.replace("{K-1}", str(num_exits))] = b
            else:
                mapping.update({a.replace("{k}", str(k)): b.replace("{k}", str(k)) for k in range(num_exits)})
    return mapping


def test_documented_paper_name_mapping(paper_checkpoint, tmp_path):
    """Issue 22 case 17: the documented renaming turns convert_to_hf's N-vium names back into the paper's
    NviumModel state dict (router logits times router_temp; adapters narrower than nvium's zero-padded)."""
    from safetensors.torch import load_file

    from nvium_dist.checkpoint_io import load_export
    from nvium_dist.hf.to_hf import convert_state

    _, _, hf_dir = paper_checkpoint
    result = run_cli(hf_dir, tmp_path / "export", "--paper", "--exits", "1,2,4", "--router-temperature", "2.0")
    assert result.returncode == 0, result.stderr
    export = load_export(tmp_path / "export")
    ours = convert_state(export.model_config, export.state, {}).hf_state
    mapping = documented_paper_names(len(EXITS))
    assert {name for name in ours if name.startswith("heads.")} == set(mapping)
    paper = {k: v for k, v in load_file(hf_dir / "model.safetensors").items() if not k.startswith("early_lm_heads")}
    renamed = {mapping.get(name, name): tensor for name, tensor in ours.items()}
    assert set(renamed) == set(paper)
    for name, tensor in paper.items():
        got = renamed[name] * (2.0 if name.startswith("router_heads") else 1.0)
        torch.testing.assert_close(got[tuple(slice(0, n) for n in tensor.shape)], tensor.float(), rtol=1e-6, atol=0)
