"""transformers directories -> nvium.

* A `LlamaForCausalLM` directory -> a training run directory to continue pretraining from: the backbone
  (embedding, layers, final norm, output matrix) is copied; exits, adapters and routers are freshly
  initialised exactly as a new run with the same seed would make them, and every exit's norm starts as a
  copy of the final norm. The trainer resumes it like a resharded checkpoint (weights, fresh optimizer).
* The paper's released N-vium checkpoints (its reference code's NviumModel state dict: a LLaMA under
  `model.*` / `lm_head`, plus `early_norms`, `early_adapters`, `final_adapter`, `router_layers`,
  `router_final_norms`, `router_heads`, and `early_lm_heads` tied to `lm_head`) -> an nvium export, so they
  decode with nvium's exact deferred decoder, or a run directory to continue pretraining them. The exit layers
  and router temperature come from the flags, config.json, or the run's Hydra config (.hydra/config.yaml or
  train_config.yaml next to the checkpoint), in that order; a missing temperature is an error, not 1.0.

Everything is read from safetensors (no unpickling); nothing is fetched from a hub.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch

from nvium_dist.checkpoint_io import EXPORT_FORMAT, CheckpointError, check_state_matches
from nvium_dist.cli import parse_int_list
from nvium_dist.config import ConfigError, ModelConfig, NviumConfig, quadrivium_exits
from nvium_dist.hf.weights import backbone_from_llama, read_hf_config, read_hf_shapes, read_hf_state, rope_theta
from nvium_dist.output_dir import building, check_output_dir, install_dir, write_marker

TOOL = "convert_from_hf.py"
SAMPLE_TOKENS = 32


def parse_exits(spec: str, num_layers: int) -> list[int]:
    """'quadrivium' (L/4, L/2, 3L/4), 'none' (dense) or a comma list of layer counts."""
    if spec == "none":
        return []
    if spec == "quadrivium":
        return quadrivium_exits(num_layers)
    try:
        return parse_int_list(spec)
    except ValueError:
        raise ConfigError(f"--exits {spec!r}: give 'quadrivium', 'none' or layer counts like 6,12,18") from None


def llama_model_config(hf_config: dict, exits: list[int], seq_length: int | None, base: ModelConfig) -> ModelConfig:
    """nvium's ModelConfig for a transformers LLaMA config; refuses what nvium's model cannot represent."""
    def field(name):
        if name not in hf_config:
            raise CheckpointError(f"the transformers config has no {name!r}; is this a LLaMA model?")
        return hf_config[name]

    heads = field("num_attention_heads")
    unsupported = {
        "num_key_value_heads": (hf_config.get("num_key_value_heads") or heads) != heads,
        "hidden_act": hf_config.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(hf_config.get("attention_bias")),
        "mlp_bias": bool(hf_config.get("mlp_bias")),
        "head_dim": (hf_config.get("head_dim") or field("hidden_size") // heads) != field("hidden_size") // heads,
    }
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise CheckpointError(f"the model uses {', '.join(f'{n}={hf_config.get(n)!r}' for n in bad)}: nvium's model "
                              "has full multi-head attention, SiLU MLPs, no biases and head_dim = hidden / heads")
    values = dict(asdict(base), vocab_size=field("vocab_size"), hidden_size=field("hidden_size"),
                  num_layers=field("num_hidden_layers"), num_heads=heads, ffn_hidden_size=field("intermediate_size"),
                  exits=exits, seq_length=seq_length or field("max_position_embeddings"),
                  rope_theta=rope_theta(hf_config), norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
                  init_std=float(hf_config.get("initializer_range", base.init_std)))
    config = ModelConfig(**values)
    config.validate()
    return config


@contextlib.contextmanager
def missing_tensors_named():
    """A KeyError while reading a state dict becomes a CheckpointError naming the tensor."""
    try:
        yield
    except KeyError as error:
        raise CheckpointError(f"the weights have no tensor {error.args[0]!r}; the directory does not hold the "
                              "model its config.json describes") from None


def llama_weights(hf_config: dict, hf_state: dict[str, torch.Tensor], model_config: ModelConfig
                  ) -> dict[str, torch.Tensor]:
    """Backbone, output matrix and final norm under nvium names (fp32)."""
    state = {k: v.float() for k, v in hf_state.items()}
    out = backbone_from_llama(state, model_config.num_layers, model_config.num_heads)
    if "lm_head.weight" in state:
        out["output.weight"] = state["lm_head.weight"]
    elif hf_config.get("tie_word_embeddings", False):
        out["output.weight"] = state["model.embed_tokens.weight"].clone()  # nvium unties them
    else:
        raise CheckpointError("the weights have no lm_head.weight and the config does not tie it to the embedding")
    out[f"heads.{model_config.num_heads_total - 1}.norm.weight"] = state["model.norm.weight"]
    return out


def sample_outputs(model) -> dict[str, torch.Tensor]:
    """The sample-check batch export_checkpoint.py verifies a checkpoint's weights against, from `model`."""
    model_config = model.config
    generator = torch.Generator().manual_seed(0)
    length = min(SAMPLE_TOKENS, model_config.seq_length)
    tokens = torch.randint(0, model_config.vocab_size, (2, length), generator=generator)
    labels = torch.randint(0, model_config.vocab_size, (2, length), generator=generator)
    with torch.no_grad():
        terms = model.eval()(tokens, labels)
    return {"tokens": tokens, "labels": labels, "log_p_heads": terms.log_p_heads, "log_p_mix": terms.log_p_mix}


def check_llama_shapes(hf_config: dict, shapes: dict[str, tuple[int, ...]], hf_dir: Path) -> None:
    """Compares the tensors' shapes (from the safetensors headers) with the sizes config.json states, before any
    tensor is read or anything of those sizes allocated (a config.json claiming a vocabulary of 10^12 would
    otherwise ask for terabytes; weights of another model would be read whole before being refused)."""
    d, vocab, ffn = (hf_config.get(k) for k in ("hidden_size", "vocab_size", "intermediate_size"))
    layers = {int(name.split(".")[2]) for name in shapes if name.startswith("model.layers.")
              and name.split(".")[2].isdigit()}
    if hf_config.get("num_hidden_layers") != len(layers):
        raise CheckpointError(f"{hf_dir}/config.json says num_hidden_layers={hf_config.get('num_hidden_layers')!r} but "
                              f"the weights hold {len(layers)} layers; config.json and the weights do not belong "
                              "together")
    heads = hf_config.get("num_attention_heads")
    try:  # grouped-query attention has narrower k/v; llama_model_config refuses it with its own message
        kv_width = (hf_config.get("num_key_value_heads") or heads) * (hf_config.get("head_dim") or d // heads)
    except TypeError:
        kv_width = None
    expected = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,), "lm_head.weight": (vocab, d)}
    for i in layers:
        prefix = f"model.layers.{i}."
        expected.update({prefix + "self_attn.q_proj.weight": (d, d), prefix + "self_attn.o_proj.weight": (d, d),
                         prefix + "self_attn.k_proj.weight": (kv_width, d),
                         prefix + "self_attn.v_proj.weight": (kv_width, d)})
        expected.update({prefix + "mlp.gate_proj.weight": (ffn, d), prefix + "mlp.up_proj.weight": (ffn, d),
                         prefix + "mlp.down_proj.weight": (d, ffn), prefix + "input_layernorm.weight": (d,),
                         prefix + "post_attention_layernorm.weight": (d,)})
    wrong = [f"{name} is {shapes[name]}, config.json says {shape}"
             for name, shape in expected.items() if name in shapes and shapes[name] != shape]
    if wrong:
        raise CheckpointError(f"{hf_dir}/config.json does not describe its weights: {'; '.join(wrong[:3])}")


def read_llama(hf_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    hf_config = read_hf_config(hf_dir)
    kind = hf_config.get("model_type")
    if hf_config.get("format") == EXPORT_FORMAT:
        raise CheckpointError(f"{hf_dir} is an nvium export already: generate.py and evaluate.py read it as it is")
    if kind != "llama":
        what = f"a {kind!r} model" if kind else "no model_type in its config.json"
        raise CheckpointError(f"{hf_dir} holds {what}; convert_from_hf reads LLaMA models (model_type llama)")
    check_llama_shapes(hf_config, read_hf_shapes(hf_dir), hf_dir)
    return hf_config, read_hf_state(hf_dir)


def write_run_dir(run_dir: Path, hf_dir: Path, config: NviumConfig, state: dict[str, torch.Tensor], model) -> Path:
    """RUN_DIR/checkpoints/step_00000000 (+ latest) with `state` (the weights `model` holds), config.yaml,
    data/tokenizer.model when HF_DIR has one, and the marker; built aside and moved into place."""
    import yaml

    from nvium_dist.checkpoint_io import write_weights_only_checkpoint

    trainer_state = {"step": 0, "consumed_samples": 0, "controller": {"beta": config.training.beta, "history": []},
                     "converted_from": str(hf_dir.resolve())}
    tokenizer = hf_dir / "tokenizer.model"
    with building(run_dir) as tmp:
        step_dir = write_weights_only_checkpoint(tmp, config, state, sample_outputs(model), trainer_state)
        if tokenizer.is_file():
            (tmp / "data").mkdir()
            shutil.copyfile(tokenizer, tmp / "data" / "tokenizer.model")
        (tmp / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        write_marker(tmp, TOOL, source=str(hf_dir.resolve()))
    install_dir(tmp, run_dir)
    return run_dir / "checkpoints" / step_dir.name


def prepare_run_config(config: NviumConfig, model_config: ModelConfig, hf_dir: Path, run_dir: Path) -> None:
    config.model = model_config
    config.training.run_dir = str(run_dir)
    if (hf_dir / "tokenizer.model").is_file() and not config.data.tokenizer_model:
        config.data.tokenizer_model = str(run_dir / "data" / "tokenizer.model")
    config.validate()


def llama_to_run_dir(hf_dir: str | os.PathLike, run_dir: str | os.PathLike, config: NviumConfig, exits: str,
                     seq_length: int | None = None, force: bool = False) -> dict:
    """Writes RUN_DIR/checkpoints/step_00000000 (+ latest), RUN_DIR/config.yaml (the config to train with) and
    RUN_DIR/data/tokenizer.model when the directory has a SentencePiece model. `config` supplies the
    parallel/data/training sections and the model settings transformers does not store."""
    from nvium_dist.inference.generator import ensure_process_group
    from nvium_dist.model import NviumModel
    from nvium_dist.tp_layout import gather_full_state_dict, load_full_state_dict

    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    check_output_dir(run_dir, TOOL, force, sources=[hf_dir])
    hf_config, hf_state = read_llama(hf_dir)
    if any(name.startswith("early_norms.") for name in hf_state):
        raise CheckpointError(f"{hf_dir} is an N-vium checkpoint of the paper's code, not a plain LLaMA: convert it "
                              "with --paper")
    model_config = llama_model_config(hf_config, [], seq_length, config.model)  # refuses what nvium cannot represent
    model_config.exits = parse_exits(exits, model_config.num_layers)
    model_config.validate()
    prepare_run_config(config, model_config, hf_dir, run_dir)
    ensure_process_group("cpu")
    model = NviumModel(config.model, seed=config.training.seed)  # what a new run with this seed starts from
    state = gather_full_state_dict(model)
    with missing_tensors_named():
        copied = llama_weights(hf_config, hf_state, config.model)
    final_norm = copied[f"heads.{config.model.num_heads_total - 1}.norm.weight"]
    for k in range(config.model.num_heads_total - 1):
        copied[f"heads.{k}.norm.weight"] = final_norm.clone()
    state.update(copied)
    check_state_matches(config.model, state, f"{hf_dir} converted")
    load_full_state_dict(model, state)
    checkpoint = write_run_dir(run_dir, hf_dir, config, state, model)
    fresh = sorted({name.split(".")[2] for name in state if name.startswith("heads.") and name not in copied})
    return {"run_dir": str(run_dir), "checkpoint": str(checkpoint), "config": str(run_dir / "config.yaml"),
            "exits": config.model.exits, "copied_parameters": len(copied), "fresh_parts": fresh,
            "tokenizer": config.data.tokenizer_model or None}


# -- the paper's released checkpoints --------------------------------------------------------------------

def _pad(tensor: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """Zero-pads a matrix/vector up to `shape`: extra hidden units whose weights are zero contribute
    nothing (SiLU(0) = GELU(0) = 0), so a narrower adapter or router becomes an exact wider one."""
    if any(have > want for have, want in zip(tensor.shape, shape)):
        raise CheckpointError(f"{what} has shape {tuple(tensor.shape)}, wider than nvium's {shape}")
    out = tensor.new_zeros(shape)
    out[tuple(slice(0, n) for n in tensor.shape)] = tensor
    return out


def reference_weights(hf_config: dict, state: dict[str, torch.Tensor], model_config: ModelConfig,
                      router_temperature: float) -> dict[str, torch.Tensor]:
    """The reference NviumModel state dict under nvium names (fp32), narrower adapters zero-padded."""
    d, num_exits = model_config.hidden_size, len(model_config.exits)
    out = llama_weights(hf_config, state, model_config)
    lm_head = out["output.weight"]
    for k in range(num_exits):
        early_head = state.get(f"early_lm_heads.{k}.weight")
        if early_head is not None and not torch.equal(early_head.float(), lm_head):
            raise CheckpointError(f"early_lm_heads.{k} is not tied to lm_head; nvium's heads share one output matrix")
    width = model_config.router_hidden_size

    def adapter(prefix: str, target: str):
        if f"{prefix}.0.weight" in state:  # Linear(d, a) -> SiLU -> Linear(a, d)
            out[f"{target}.w1.weight"] = _pad(state[f"{prefix}.0.weight"].float(), (d, d), f"{prefix}.0")
            out[f"{target}.w2.weight"] = _pad(state[f"{prefix}.2.weight"].float(), (d, d), f"{prefix}.2")
        else:  # the adapter was disabled: a zero adapter is the identity
            out[f"{target}.w1.weight"], out[f"{target}.w2.weight"] = torch.zeros(d, d), torch.zeros(d, d)

    for k in range(num_exits):
        head = f"heads.{k}"
        out[f"{head}.norm.weight"] = state[f"early_norms.{k}.weight"].float()
        adapter(f"early_adapters.{k}", f"{head}.adapter")
        mlp = f"router_layers.{k}.layers.0"
        if f"router_layers.{k}.layers.1.fc1.weight" in state:
            raise CheckpointError(f"router {k} has more than one MLP block (simple_deep_mlp); nvium's router has one")
        if state[f"{mlp}.fc2.weight"].shape[0] != d:
            raise CheckpointError(f"router {k} outputs {state[f'{mlp}.fc2.weight'].shape[0]} features; nvium's router "
                                  f"maps back to the hidden size {d}")
        out[f"{head}.router.fc1.weight"] = _pad(state[f"{mlp}.fc1.weight"].float(), (width, d), f"{mlp}.fc1")
        out[f"{head}.router.fc1.bias"] = _pad(state[f"{mlp}.fc1.bias"].float(), (width,), f"{mlp}.fc1")
        out[f"{head}.router.fc2.weight"] = _pad(state[f"{mlp}.fc2.weight"].float(), (d, width), f"{mlp}.fc2")
        out[f"{head}.router.fc2.bias"] = state[f"{mlp}.fc2.bias"].float()
        out[f"{head}.router.norm.weight"] = state[f"router_final_norms.{k}.weight"].float()
        # softmax(logits / T): dividing the last layer by T is the same
        out[f"{head}.router.logits.weight"] = state[f"router_heads.{k}.weight"].float() / router_temperature
        out[f"{head}.router.logits.bias"] = state[f"router_heads.{k}.bias"].float() / router_temperature
    adapter("final_adapter", f"heads.{num_exits}.adapter")
    return out


RUN_CONFIGS = (".hydra/config.yaml", "train_config.yaml", "../train_config.yaml", "../.hydra/config.yaml",
               "../../.hydra/config.yaml")  # the paper's code saves checkpoints in RUN/checkpoints/checkpoint-N


def read_run_config(hf_dir: Path) -> tuple[Path | None, dict]:
    """The paper's run config (Hydra) next to or above the checkpoint directory, if there is one."""
    import yaml

    for relative in RUN_CONFIGS:
        path = hf_dir / relative
        if path.is_file():
            try:
                values = yaml.safe_load(path.read_text())
            except (yaml.YAMLError, UnicodeDecodeError) as err:
                raise CheckpointError(f"{path} is not a readable YAML run config ({type(err).__name__}); fix or move "
                                      "it, or pass --exits and --router-temperature") from None
            if isinstance(values, dict):
                return path, values
    return None, {}


def reference_settings(hf_dir: Path, hf_config: dict, num_exits: int, exits: str | None,
                       router_temperature: float | None) -> tuple[list[int], float, dict]:
    """The exit layers and router temperature of the run: the flags, else config.json (exits), else the run's
    Hydra config (early_layer_idx, router.router_temp). Returns them and where each came from."""
    run_config_path, run_config = read_run_config(hf_dir)
    router = run_config.get("router") if isinstance(run_config.get("router"), dict) else {}
    sources = {}
    if exits is not None:
        layer_exits, sources["exits"] = parse_exits(exits, hf_config["num_hidden_layers"]), "--exits"
    elif hf_config.get("early_layer_idx") is not None:
        given, sources["exits"] = hf_config["early_layer_idx"], str(hf_dir / "config.json")
        layer_exits = sorted(given if isinstance(given, list) else [given])
    elif run_config.get("early_layer_idx") is not None:
        given, sources["exits"] = run_config["early_layer_idx"], str(run_config_path)
        layer_exits = sorted(given if isinstance(given, list) else [given])
    else:
        raise CheckpointError(f"{hf_dir}/config.json does not record the exit layers (early_layer_idx) and no run "
                              f"config ({', '.join(RUN_CONFIGS[:2])}) was found; pass --exits with the {num_exits} "
                              "layer counts of the run's config, e.g. 6,12,18")
    if not all(isinstance(layer, int) and not isinstance(layer, bool) for layer in layer_exits):
        raise CheckpointError(f"early_layer_idx in {sources['exits']} must be layer counts, got {layer_exits!r}")
    if len(layer_exits) != num_exits:
        raise CheckpointError(f"the exits {layer_exits} (from {sources['exits']}) are {len(layer_exits)} but the "
                              f"weights have {num_exits}")
    if router_temperature is not None:
        sources["router_temperature"] = "--router-temperature"
    elif router.get("router_temp") is not None:
        router_temperature, sources["router_temperature"] = router["router_temp"], str(run_config_path)
    else:
        raise CheckpointError(f"the router temperature of {hf_dir} is not recorded (no router.router_temp in a run "
                              "config next to it): pass --router-temperature with the run's router_temp (the paper's "
                              "default config uses 1.0)")
    if isinstance(router_temperature, bool) or not isinstance(router_temperature, (int, float)) \
            or not 0 < router_temperature < float("inf"):
        raise ConfigError(f"the router temperature must be a positive number, got {router_temperature!r} "
                          f"(from {sources['router_temperature']})")
    return layer_exits, float(router_temperature), sources


def read_reference(hf_dir: Path, exits: str | None, router_temperature: float | None, seq_length: int | None,
                   base: ModelConfig) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """The paper's checkpoint as nvium's model config and full state (router temperature folded into the router's
    last layer), and a summary of where its settings came from."""
    hf_config, state = read_llama(hf_dir)
    num_exits = len({name.split(".")[1] for name in state if name.startswith("early_norms.")})
    if num_exits == 0:
        raise CheckpointError(f"{hf_dir} has no early_norms.*: it is not an N-vium checkpoint of the paper's code "
                              "(a plain LLaMA converts to a run directory without --paper)")
    layer_exits, temperature, sources = reference_settings(hf_dir, hf_config, num_exits, exits, router_temperature)
    model_config = llama_model_config(hf_config, layer_exits, seq_length, base)
    with missing_tensors_named():
        model_config = replace(model_config, router_hidden_width=state["router_layers.0.layers.0.fc1.weight"].shape[0])
        full_state = reference_weights(hf_config, state, model_config, temperature)
    return model_config, full_state, {"exits": layer_exits, "router_temperature": temperature, "settings_from": sources}


def reference_to_export(hf_dir: str | os.PathLike, export_dir: str | os.PathLike, exits: str | None = None,
                        router_temperature: float | None = None, seq_length: int | None = None,
                        force: bool = False) -> dict:
    """The paper's N-vium checkpoint directory -> an nvium export (config.json, model.safetensors, tokenizer)."""
    from nvium_dist.checkpoint_io import check_export_target, save_export

    hf_dir, export_dir = Path(hf_dir), Path(export_dir)
    check_export_target(export_dir, force, tool=TOOL, sources=(hf_dir,))
    model_config, full_state, settings = read_reference(hf_dir, exits, router_temperature, seq_length, ModelConfig())
    tokenizer = hf_dir / "tokenizer.model"
    metadata = {"converted_by": TOOL, "source": str(hf_dir.resolve()), **settings}
    save_export(export_dir, model_config, full_state, str(tokenizer) if tokenizer.is_file() else None, metadata,
                force=force, tool=TOOL, sources=(hf_dir,))
    return {"export": str(export_dir), **settings, "router_hidden_size": model_config.router_hidden_size,
            "parameters": sum(t.numel() for t in full_state.values()),
            "tokenizer": str(tokenizer) if tokenizer.is_file() else None}


def reference_to_run_dir(hf_dir: str | os.PathLike, run_dir: str | os.PathLike, config: NviumConfig,
                         exits: str | None = None, router_temperature: float | None = None,
                         seq_length: int | None = None, force: bool = False) -> dict:
    """The paper's N-vium checkpoint -> a run directory the trainer continues from (step 0, fresh optimizer), as
    llama_to_run_dir does for a LLaMA; every part, exits and routers included, keeps the paper's weights."""
    from nvium_dist.inference.generator import ensure_process_group
    from nvium_dist.model import NviumModel
    from nvium_dist.tp_layout import load_full_state_dict

    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    check_output_dir(run_dir, TOOL, force, sources=[hf_dir])
    model_config, full_state, settings = read_reference(hf_dir, exits, router_temperature, seq_length, config.model)
    prepare_run_config(config, model_config, hf_dir, run_dir)
    ensure_process_group("cpu")
    model = NviumModel(config.model, initialise=False)
    load_full_state_dict(model, full_state)
    checkpoint = write_run_dir(run_dir, hf_dir, config, full_state, model)
    return {"run_dir": str(run_dir), "checkpoint": str(checkpoint), "config": str(run_dir / "config.yaml"),
            **settings, "router_hidden_size": config.model.router_hidden_size,
            "tokenizer": config.data.tokenizer_model or None}
