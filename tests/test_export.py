"""Checkpoint format, export and resharding: a TP=2 model gathered in 2 processes round-trips exactly."""
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from distributed_runner import run_distributed
from nvium_dist.config import ModelConfig, NviumConfig, ParallelConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=300, hidden_size=64, num_layers=6, num_heads=4, ffn_hidden_size=96, exits=[1, 2, 4],
            seq_length=32, make_vocab_size_divisible_by=64)


def _random_full_state(model_config):
    from nvium_dist.model import NviumModel
    from nvium_dist.parallel import init_distributed
    from nvium_dist.tp_layout import gather_full_state_dict

    init_distributed(ParallelConfig())
    torch.manual_seed(3)
    model = NviumModel(model_config)
    with torch.no_grad():
        for head in model.heads:
            if head.adapter is not None:
                head.adapter.w2.weight.normal_(std=0.05)
            if head.router is not None:
                head.router.logits.weight.mul_(5.0)
    return gather_full_state_dict(model)


def _tp_save_worker(rank, world_size, config_dict, full_state, ckpt_dir):
    """A TP=2 'training' model: forward on a sample batch, gather the full weights, rank 0 writes the checkpoint."""
    from megatron.core import parallel_state

    from nvium_dist.checkpoint_io import config_from_dict, step_dir_name, update_latest, write_model_files
    from nvium_dist.model import NviumModel
    from nvium_dist.parallel import init_distributed
    from nvium_dist.tp_layout import gather_full_state_dict, load_full_state_dict

    config = config_from_dict(config_dict)
    init_distributed(ParallelConfig(tensor_parallel=world_size))
    model = NviumModel(config.model, tensor_parallel=world_size, initialise=False)
    load_full_state_dict(model, full_state, parallel_state.get_tensor_model_parallel_rank(), world_size)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.model.vocab_size, (2, 16), generator=generator)
    labels = torch.randint(0, config.model.vocab_size, (2, 16), generator=generator)
    with torch.no_grad():
        terms = model(tokens, labels)
    gathered = gather_full_state_dict(model, parallel_state.get_tensor_model_parallel_group())
    if rank == 0:
        sample = dict(tokens=tokens, labels=labels, log_p_heads=terms.log_p_heads, log_p_mix=terms.log_p_mix)
        checkpoints = Path(ckpt_dir) / "checkpoints"
        step = checkpoints / step_dir_name(20)
        write_model_files(step, config, gathered, sample)
        (step / "trainer_state.json").write_text(json.dumps({"step": 20, "consumed_samples": 320, "beta": 0.15}))
        (step / "deepspeed").mkdir()
        update_latest(checkpoints, step.name)
    return {"sample_log_p_mix": terms.log_p_mix}


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    config = NviumConfig(model=ModelConfig(**TINY))
    config.parallel.tensor_parallel = 2
    config.data.tokenizer_model = ""
    full_state = _random_full_state(config.model)
    results = run_distributed(_tp_save_worker, 2, asdict(config), full_state, str(run_dir))
    return run_dir, full_state, results


def test_checkpoint_written_by_tp2_reads_back(tp2_run):
    from nvium_dist.checkpoint_io import read_checkpoint

    run_dir, full_state, _ = tp2_run
    config, state, sample, trainer_state = read_checkpoint(run_dir)
    assert config.parallel.tensor_parallel == 2 and trainer_state["step"] == 20
    assert set(state) == set(full_state)
    for name, tensor in full_state.items():
        assert torch.equal(state[name], tensor), name
    assert state["embedding.weight"].shape[0] == 300  # vocab rows unpadded
    assert sample["log_p_heads"].shape == (2, 16, 4)


def test_export_round_trip_logits_equal(tp2_run, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    import export_checkpoint

    from nvium_dist.checkpoint_io import read_checkpoint
    from nvium_dist.inference import NviumGenerator

    run_dir, _, _ = tp2_run
    assert export_checkpoint.main(["--checkpoint", str(run_dir), "--output", str(tmp_path / "exp"),
                                   "--tokenizer", "none"]) == 0
    printed = capsys.readouterr().out
    assert "self-check (export): max |diff|" in printed
    assert sorted(os.listdir(tmp_path / "exp")) == ["config.json", "model.safetensors", "nvium_conversion.json"]
    _, _, sample, _ = read_checkpoint(run_dir)
    generator = NviumGenerator.from_pretrained(tmp_path / "exp")
    log_heads, _ = generator.head_outputs(sample["tokens"])
    per_head = log_heads.gather(-1, sample["labels"][:, :, None, None].expand(-1, -1, 4, 1))[..., 0]
    torch.testing.assert_close(per_head, sample["log_p_heads"], atol=1e-5, rtol=0)
    log_mix = generator.mixture_logprobs(sample["tokens"]).gather(-1, sample["labels"][..., None])[..., 0]
    torch.testing.assert_close(log_mix, sample["log_p_mix"], atol=1e-5, rtol=0)


def test_reshard_writes_valid_checkpoint_in_new_layout(tp2_run, tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import export_checkpoint

    from nvium_dist.checkpoint_io import read_checkpoint

    run_dir, full_state, _ = tp2_run
    out = tmp_path / "resharded"
    assert export_checkpoint.main(["--checkpoint", str(run_dir), "--output", str(out), "--tp", "1", "--pp", "2"]) == 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000020"
    step = out / "checkpoints" / "step_00000020"
    assert not (step / "deepspeed").exists()
    config, state, sample, trainer_state = read_checkpoint(out)
    assert (config.parallel.tensor_parallel, config.parallel.pipeline_parallel) == (1, 2)
    assert config.parallel.zero_stage <= 1
    assert trainer_state["step"] == 20 and trainer_state["resharded_from"]["tensor_parallel"] == 2
    assert all(torch.equal(state[n], t) for n, t in full_state.items())
    # a layout the model cannot take fails clearly
    assert export_checkpoint.main(["--checkpoint", str(run_dir), "--output", str(tmp_path / "bad"), "--tp", "3"]) == 2


def test_dense_model_exports(tmp_path):
    from nvium_dist.checkpoint_io import load_export, save_export

    model_config = ModelConfig(**{**TINY, "exits": []})
    state = _random_full_state(model_config)
    save_export(tmp_path / "dense", model_config, state, None)
    export = load_export(tmp_path / "dense")
    assert export.model_config.exits == [] and set(export.state) == set(state)


def test_truncated_and_mismatched_files_fail_clearly(tp2_run, tmp_path):
    import shutil

    from nvium_dist.checkpoint_io import CheckpointError, load_export, read_checkpoint, save_export

    run_dir, full_state, _ = tp2_run
    broken = tmp_path / "broken"
    shutil.copytree(run_dir / "checkpoints" / "step_00000020", broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_checkpoint(broken)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        read_checkpoint(tmp_path)
    # an export whose config describes another model
    save_export(tmp_path / "exp", ModelConfig(**TINY), full_state, None)
    config = json.loads((tmp_path / "exp" / "config.json").read_text())
    config["model"]["exits"] = [2, 4]
    (tmp_path / "exp" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="different models"):
        load_export(tmp_path / "exp")
    with pytest.raises(CheckpointError, match="training checkpoint"):
        load_export(run_dir / "checkpoints" / "step_00000020")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_export(tmp_path / "nowhere")


def test_export_output_never_replaces_what_is_not_an_export(tp2_run, tmp_path, capsys):
    """--output naming a run directory, an unrelated folder or a file is refused (exit 2, untouched), with --force
    too (it only replaces the tool's own exports); an earlier export is replaced."""
    sys.path.insert(0, str(ROOT / "tools"))
    import export_checkpoint

    run_dir, _, _ = tp2_run
    step = run_dir / "checkpoints" / "step_00000020"
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))

    def export(output, *extra):
        return export_checkpoint.main(["--checkpoint", str(step), "--output", str(output), "--tokenizer", "none",
                                       *extra])

    for output in (run_dir, run_dir / "checkpoints", step, run_dir.parent):
        assert export(output, "--force") == 2
        assert "checkpoint's run directory" in capsys.readouterr().err
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "todo.txt").write_text("keep me")
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me too")
    for output in (unrelated, a_file):
        for extra in ([], ["--force"]):
            assert export(output, *extra) == 2
            assert "choose another path" in capsys.readouterr().err.lower()
    assert (unrelated / "todo.txt").read_text() == "keep me" and a_file.read_text() == "keep me too"
    assert export(tmp_path / "exp") == 0 and (tmp_path / "exp" / "model.safetensors").is_file()
    assert export(tmp_path / "exp") == 0  # an earlier export: replaced without --force
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "file.txt", "notes"]  # no temporaries left


def test_failed_self_check_keeps_the_previous_export(tp2_run, tmp_path, capsys):
    import shutil

    sys.path.insert(0, str(ROOT / "tools"))
    import export_checkpoint

    from nvium_dist.checkpoint_io import load_tensors, save_tensors

    run_dir, _, _ = tp2_run
    output = tmp_path / "export"
    assert export_checkpoint.main(["--checkpoint", str(run_dir), "--output", str(output), "--tokenizer", "none"]) == 0
    previous = {p.name: p.read_bytes() for p in output.iterdir()}
    wrong = tmp_path / "wrong_sample"
    shutil.copytree(run_dir / "checkpoints" / "step_00000020", wrong)
    sample = load_tensors(wrong / "sample_check.safetensors")
    save_tensors(wrong / "sample_check.safetensors", dict(sample, log_p_mix=sample["log_p_mix"] + 0.5))
    capsys.readouterr()
    for args in ([], ["--tp", "1"]):
        target = output if not args else tmp_path / "resharded"
        assert export_checkpoint.main(["--checkpoint", str(wrong), "--output", str(target), "--tokenizer", "none",
                                       *args]) == 2
        assert "does not reproduce the training model's log-probabilities" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in output.iterdir()} == previous
    assert not (tmp_path / "resharded" / "checkpoints").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "resharded", "wrong_sample"]


@pytest.mark.parametrize("damage", ["nan", "int-dtype"])
def test_export_with_unusable_weights_is_refused_at_load(damage, tmp_path):
    from nvium_dist.checkpoint_io import CheckpointError, load_export, load_tensors, save_export, save_tensors

    model_config = ModelConfig(**TINY)
    save_export(tmp_path / "exp", model_config, _random_full_state(model_config), None)
    state = load_tensors(tmp_path / "exp" / "model.safetensors")
    name = "layers.0.attn.qkv.weight"
    if damage == "nan":
        state[name][0, 0] = float("nan")
    else:
        state[name] = state[name].to(torch.int32)
    save_tensors(tmp_path / "exp" / "model.safetensors", state)
    with pytest.raises(CheckpointError, match=f"{name} (holds NaN|has dtype torch.int32)"):
        load_export(tmp_path / "exp")
