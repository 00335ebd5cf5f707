"""An nvium export -> a transformers directory.

Dense exports (no exits, no final adapter) become a stock `LlamaForCausalLM` that
`AutoModelForCausalLM.from_pretrained(OUT)` loads without remote code. N-vium exports become an
`NviumForCausalLM` directory (modeling_nvium.py copied in, `auto_map` in config.json, loaded with
`trust_remote_code=True`) whose logits are log p_mix. Both get generation_config.json set for plain
ancestral sampling (do_sample, top_k=0, top_p=1, temperature=1), tokenizer files when the export has a
SentencePiece model, and `nvium_conversion.json` (nvium_dist.output_dir.MARKER_FILE), which marks the directory as
this tool's output.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from nvium_dist.hf.weights import backbone_to_llama
from nvium_dist.output_dir import building, check_output_dir, install_dir, verify_marker, write_marker

TOOL = "convert_to_hf.py"


class SelfCheckError(RuntimeError):
    """The converted directory does not reproduce nvium's log-probabilities."""


@dataclass
class Conversion:
    kind: str  # "llama" or "nvium"
    hf_state: dict[str, torch.Tensor]
    hf_config: object  # LlamaConfig or NviumConfig


def convert_state(model_config, state: dict[str, torch.Tensor], special_ids: dict[str, int | None]) -> Conversion:
    """Chooses the target class and renames the weights (full TP=1 state, unpadded vocab)."""
    from transformers import LlamaConfig

    c = model_config
    hf_state = backbone_to_llama(state, c.num_layers, c.num_heads)
    hf_state["lm_head.weight"] = state["output.weight"]
    common = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.ffn_hidden_size,
                  num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                  max_position_embeddings=c.seq_length, rms_norm_eps=c.norm_eps, initializer_range=c.init_std,
                  tie_word_embeddings=False, **special_ids)
    if not c.exits:  # a dense model is a plain LLaMA (no final adapter)
        hf_state["model.norm.weight"] = state["heads.0.norm.weight"]
        config = LlamaConfig(**common, num_key_value_heads=c.num_heads, hidden_act="silu", attention_bias=False,
                             mlp_bias=False, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta})
        config.architectures = ["LlamaForCausalLM"]
        return Conversion("llama", hf_state, config)
    from nvium_dist.hf.modeling_nvium import NviumConfig

    hf_state.update({name: tensor for name, tensor in state.items() if name.startswith("heads.")})
    config = NviumConfig(**common, exits=list(c.exits), router_hidden_size=state["heads.0.router.fc1.weight"].shape[0],
                         rope_theta=c.rope_theta)
    config.architectures = ["NviumForCausalLM"]
    return Conversion("nvium", hf_state, config)


def write_model(conversion: Conversion, generation_config, out_dir: Path) -> None:
    """config.json, model.safetensors, generation_config.json (and modeling_nvium.py with its auto_map),
    written directly: no model is instantiated, so a large model costs no random initialisation."""
    from nvium_dist.checkpoint_io import save_tensors

    config = conversion.hf_config
    if conversion.kind == "nvium":
        config.auto_map = {"AutoConfig": "modeling_nvium.NviumConfig",
                           "AutoModelForCausalLM": "modeling_nvium.NviumForCausalLM"}
        (out_dir / "modeling_nvium.py").write_bytes(Path(__file__).with_name("modeling_nvium.py").read_bytes())
    config.save_pretrained(str(out_dir))
    generation_config.save_pretrained(str(out_dir))
    save_tensors(out_dir / "model.safetensors", conversion.hf_state, metadata={"format": "pt"})


def sampling_generation_config(special_ids: dict[str, int | None]):
    """Plain ancestral sampling: transformers' defaults would apply top-k 50 to do_sample. No max_length: with
    one set, every generate(max_new_tokens=...) warns; without, transformers caps at max_position_embeddings."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, **special_ids)


def special_token_ids(export) -> dict[str, int | None]:
    if export.tokenizer_type != "sentencepiece":
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.Load(str(export.tokenizer_path))
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
    return {k: (v if v >= 0 else None) for k, v in ids.items()}


def self_check(export_dir: Path, out_dir: Path, kind: str, length: int, tolerance: float) -> float:
    """Loads OUT with transformers and compares its logits with nvium's log p_mix on random tokens."""
    from transformers import AutoModelForCausalLM

    from nvium_dist.inference import NviumGenerator

    generator = NviumGenerator.from_pretrained(export_dir)
    tokens = torch.randint(0, generator.config.vocab_size, (2, min(length, generator.config.seq_length)),
                           generator=torch.Generator().manual_seed(0))
    expected = generator.mixture_logprobs(tokens)
    verify_marker(out_dir)  # the remote code about to run is the one this tool wrote
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), trust_remote_code=kind == "nvium",
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(tokens, use_cache=False).logits.float()
    if kind == "llama":
        logits = torch.log_softmax(logits, dim=-1)
    worst = (logits - expected).abs().max().item()
    if not worst <= tolerance:
        raise SelfCheckError(f"self-check failed: transformers' log-probabilities differ from nvium's by {worst:.3e} "
                           f"(> {tolerance:g}); the converted directory was not installed")
    return worst


def convert_export(export_dir: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False,
                   check: bool = True, tolerance: float = 1e-4) -> dict:
    """Writes OUT (see the module docstring); returns a summary. Raises CheckpointError / OutputDirError."""
    from nvium_dist.checkpoint_io import load_export
    from nvium_dist.hf.tokenizer import TokenizerConversionError, write_hf_tokenizer

    export_dir, out_dir = Path(export_dir), Path(out_dir)
    check_output_dir(out_dir, TOOL, force, sources=[export_dir])
    export = load_export(export_dir)
    special_ids = special_token_ids(export)
    conversion = convert_state(export.model_config, {k: v.float() for k, v in export.state.items()}, special_ids)
    generation_config = sampling_generation_config(special_ids)
    summary = {"output": str(out_dir), "class": conversion.hf_config.architectures[0],
               "source": str(export_dir.resolve()),
               "exits": list(export.model_config.exits), "tokenizer": None, "notes": []}
    with building(out_dir) as tmp:
        write_model(conversion, generation_config, tmp)
        if export.tokenizer_type == "sentencepiece":
            try:
                summary["tokenizer"] = write_hf_tokenizer(export.tokenizer_path, tmp)
            except TokenizerConversionError as err:
                summary["notes"].append(f"no transformers tokenizer written: {err}")
        else:
            summary["notes"].append(f"the export's tokenizer is {export.tokenizer_type!r}: no tokenizer files "
                                    "written (pass token ids)")
        write_marker(tmp, TOOL, source=summary["source"], model_class=summary["class"])
        if check:
            summary["self_check_max_abs_diff"] = self_check(export_dir, tmp, conversion.kind, 32, tolerance)
    install_dir(tmp, out_dir)
    return summary
