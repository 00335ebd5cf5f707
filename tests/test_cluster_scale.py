"""Cluster-scale settings, shown on CPU with real gloo ranks: the dtype of DeepSpeed's gradient reduction,
overlapped ZeRO buckets, the optimizer choice, run-directory locks without flock, start-up data checks."""
import pytest
import torch

from distributed_runner import run_distributed
from trainer_fixtures import corpus  # noqa: F401  (a pytest fixture)


def _reduction_dtype_worker(rank, world_size, grad_reduce_dtype, zero_stage):
    """A bf16 ZeRO engine built from the trainer's DeepSpeed config: its communication dtype, and the dtypes
    of the floating-point reductions one training step really runs."""
    import sys

    import deepspeed
    import torch.distributed as dist

    from nvium_dist.config import ModelConfig, NviumConfig, ParallelConfig
    from nvium_dist.model import NviumModel
    from nvium_dist.parallel import DeepSpeedMPU, init_distributed
    from nvium_dist.training.engine_config import deepspeed_config

    parallel = ParallelConfig(dtype="bf16", zero_stage=zero_stage, grad_reduce_dtype=grad_reduce_dtype)
    config = NviumConfig(model=ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                                           ffn_hidden_size=96, exits=[1], seq_length=16,
                                           make_vocab_size_divisible_by=64), parallel=parallel)
    config.training.micro_batch_size = 2
    init_distributed(parallel)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    model = NviumModel(config.model, seed=1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                      mpu=DeepSpeedMPU(), config=deepspeed_config(config, grad_accumulation=1,
                                                                             world_size=dist.get_world_size()))
    reduced = set()
    for name in ("all_reduce", "reduce", "reduce_scatter_tensor"):
        original = getattr(dist, name)

        def spy(tensor, *args, _original=original, **kwargs):
            if tensor.is_floating_point() and tensor.numel() > 1:
                reduced.add(str(tensor.dtype))
            return _original(tensor, *args, **kwargs)

        setattr(dist, name, spy)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(rank))
    terms = engine(tokens, tokens)
    engine.backward(-terms.log_p_mix.float().mean())
    engine.step()
    return {"engine": str(engine.communication_data_type), "zero": str(getattr(engine.optimizer, "communication_data_type", engine.communication_data_type)),
            "reduced": sorted(reduced)}


@pytest.mark.parametrize("zero_stage", [1, 2])
@pytest.mark.parametrize("grad_reduce_dtype", ["fp32", "bf16"])
def test_gradient_reduction_runs_in_the_configured_dtype(grad_reduce_dtype, zero_stage):
    """bf16 training reduces gradients in fp32 by default (DeepSpeed's own default is the model dtype);
    parallel.grad_reduce_dtype=bf16 asks for bf16 reductions and gets them."""
    expected = {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[grad_reduce_dtype]
    for result in run_distributed(_reduction_dtype_worker, 2, grad_reduce_dtype, zero_stage):
        assert result["engine"] == expected
        assert result["zero"] == expected
        assert expected in result["reduced"], result
        if grad_reduce_dtype == "fp32":
            assert "torch.bfloat16" not in result["reduced"], result


# -- run-directory lock where flock does not exist (Lustre mounted noflock) -------------------------------------

@pytest.fixture
def no_flock(monkeypatch):
    import errno

    from nvium_dist.training import run_lock

    def flock(*_args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(run_lock.fcntl, "flock", flock)
    return run_lock


def test_run_lock_without_flock_uses_an_exclusive_lock_file(no_flock, tmp_path):
    import os
    import socket

    holder = no_flock.RunDirLock(tmp_path)
    holder.acquire()
    assert (tmp_path / ".lock.excl").read_text().startswith(f"{socket.gethostname()} {os.getpid()}\n")
    with pytest.raises(no_flock.RunDirInUseError, match=f"in use by trainer pid {os.getpid()} .*delete .*lock.excl"):
        no_flock.RunDirLock(tmp_path).acquire()
    holder.release()
    assert not (tmp_path / ".lock.excl").exists()
    second = no_flock.RunDirLock(tmp_path)
    second.acquire()
    second.release()


def test_run_lock_without_flock_replaces_a_dead_holders_file(no_flock, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_file = tmp_path / ".lock.excl"
    lock_file.write_text(f"{socket.gethostname()} {int(dead.stdout)}\ntrainer pid {int(dead.stdout)} on here\n")
    no_flock.RunDirLock(tmp_path).acquire()  # that pid has exited on this host
    assert lock_file.read_text().startswith(f"{socket.gethostname()} {os.getpid()}\n")
    # a holder on another host: live while its heartbeat is recent, stale after STALE_SECONDS
    lock_file.write_text("other-node 1\ntrainer pid 1 on other-node\n")
    with pytest.raises(no_flock.RunDirInUseError, match="trainer pid 1 on other-node"):
        no_flock.RunDirLock(tmp_path).acquire()
    old = lock_file.stat().st_mtime - no_flock.STALE_SECONDS - 1
    os.utime(lock_file, (old, old))
    no_flock.RunDirLock(tmp_path).acquire()
    assert lock_file.read_text().startswith(f"{socket.gethostname()} {os.getpid()}\n")


def test_run_lock_says_so_when_no_lock_works(no_flock, tmp_path, monkeypatch):
    import errno
    import os

    real_open = os.open

    def no_exclusive_create(path, flags, *args):
        if flags & os.O_EXCL:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_open(path, flags, *args)

    monkeypatch.setattr(no_flock.os, "open", no_exclusive_create)
    with pytest.raises(OSError, match="flock is not supported there .* put training.run_dir on a filesystem"):
        no_flock.RunDirLock(tmp_path).acquire()


# -- optimizer choice ------------------------------------------------------------------------------------------

def test_cuda_runs_default_to_torch_fused_adamw_without_compiling(recwarn):
    """training.optimizer=auto on CUDA is torch's fused AdamW: no DeepSpeed op is JIT-built (a build killed
    mid-way leaves a lock that hangs the next job). torch's fused AdamW also runs on CPU tensors, which is
    what this builds; the choice itself is what the trainer makes for a CUDA run."""
    import warnings

    from nvium_dist.config import TrainingConfig
    from nvium_dist.training.schedule import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the old default tried DeepSpeed's FusedAdam and warned when it failed
        optimizer = build_optimizer(model, TrainingConfig(), "cuda", offload=False)
    assert type(optimizer) is torch.optim.AdamW and all(g["fused"] for g in optimizer.param_groups)
    plain = build_optimizer(model, TrainingConfig(), "cpu", offload=False)
    assert type(plain) is torch.optim.AdamW and not any(g["fused"] for g in plain.param_groups)
    torch_offloaded = build_optimizer(model, TrainingConfig(optimizer="torch"), "cuda", offload=True)
    assert not any(g["fused"] for g in torch_offloaded.param_groups)  # its states live on the CPU


# -- start-up data checks: once, on rank 0 ------------------------------------------------------------------

def _counting_scans(rank, world_size, overrides):
    """Trains, counting the full id scans of a .bin this rank runs."""
    from nvium_dist.data import gpt_data
    from trainer_fixtures import train_in_process

    scans, check = [], gpt_data.check_dataset_usable

    def counting(prefix, vocab_size, scan_ids=True, known_max_id=None):
        if scan_ids and known_max_id is None:
            scans.append(prefix)
        return check(prefix, vocab_size, scan_ids, known_max_id)

    gpt_data.check_dataset_usable = counting
    train_in_process(rank, world_size, overrides)
    return len(scans)


def _corpus_without_summaries(corpus, directory):
    import shutil

    copies = {}
    for split in ("train", "valid"):
        for suffix in (".bin", ".idx"):  # no .summary.json: nothing vouches for the tokenizer
            shutil.copy(corpus[split] + suffix, directory / f"{split}_text_document{suffix}")
        copies[split] = str(directory / f"{split}_text_document")
    return dict(corpus, **copies)


def test_corpus_without_summary_is_scanned_once_on_rank0_and_recorded(corpus, tmp_path):
    from trainer_fixtures import small_overrides

    data = _corpus_without_summaries(corpus, tmp_path)
    overrides = small_overrides(data, tmp_path / "run", **{"training.train_iters": 1})
    assert run_distributed(_counting_scans, 2, overrides) == [2, 0]  # rank 0 scans train and valid, rank 1 not
    assert run_distributed(_counting_scans, 2, overrides) == [0, 0]  # a restart reuses the record
    record = (tmp_path / "run" / "data" / "cache" / "token_id_scan.json").read_text()
    assert data["train"] + ".bin" in record and data["valid"] + ".bin" in record


def _train_expecting_error(rank, world_size, overrides):
    from trainer_fixtures import train_in_process

    try:
        train_in_process(rank, world_size, overrides)
    except Exception as err:  # noqa: BLE001 - the test compares what each rank raised
        return type(err).__name__, str(err)
    return None


def test_out_of_vocabulary_ids_stop_every_rank_with_the_file_named(corpus, tmp_path):
    """A .bin with no summary and an id past the vocabulary (issue 22 case 6): rank 0's one scan finds it and
    every rank stops with that message (before, the other ranks were left waiting in a barrier)."""
    import numpy as np

    from trainer_fixtures import small_overrides

    data = _corpus_without_summaries(corpus, tmp_path)
    ids = np.fromfile(data["train"] + ".bin", dtype=np.uint16)
    ids[50] = 65535
    ids.tofile(data["train"] + ".bin")
    overrides = small_overrides(data, tmp_path / "run")
    rank0, rank1 = run_distributed(_train_expecting_error, 2, overrides, timeout=300)
    named = f"{data['train']}.bin: token id 65535 (first out-of-range id at token 50)"
    assert rank0[0] == "DatasetFormatError" and rank0[1].startswith(named)
    assert rank1[0] == "RankZeroError" and named in rank1[1]


def test_a_large_model_without_data_needs_allow_default_corpus():
    from nvium_dist.config import ConfigError, load_config
    from nvium_dist.training.trainer import check_data_config

    check_data_config(load_config(None, []))  # the quickstart's model may use the bundled corpus
    larger = ["model.hidden_size=256", "model.ffn_hidden_size=688"]
    with pytest.raises(ConfigError, match="bundled Shakespeare corpus .* data.allow_default_corpus=true"):
        check_data_config(load_config(None, larger))
    check_data_config(load_config(None, larger + ["data.allow_default_corpus=true"]))


# -- export self-check of a deep bf16 model ---------------------------------------------------------------------

def _deep_bf16_case(seed: int):
    import importlib.util
    from pathlib import Path

    from nvium_dist.config import ModelConfig
    from nvium_dist.inference.generator import ensure_process_group
    from nvium_dist.model import NviumModel
    from nvium_dist.tp_layout import gather_full_state_dict

    spec = importlib.util.spec_from_file_location(
        "export_checkpoint", Path(__file__).resolve().parents[1] / "tools" / "export_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    ensure_process_group("cpu")
    # 48 layers like the 1.5B model; weights large enough that bf16 rounding moves log-probs by ~1 nat
    config = ModelConfig(vocab_size=256, hidden_size=64, num_layers=48, num_heads=4, ffn_hidden_size=128,
                         exits=[12, 24, 36], seq_length=64, make_vocab_size_divisible_by=64, init_std=0.2)
    state = gather_full_state_dict(NviumModel(config, seed=seed))
    tokens = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    return tool, config, state, {"tokens": tokens, "labels": tokens.roll(-1, 1)}


def test_bf16_self_check_accepts_other_kernels_rounding_and_refuses_other_weights(capsys):
    """A 48-layer bf16 sample computed by kernels that round differently from this CPU's (here: no rounding
    at all, fp32 arithmetic) misses the bf16 recomputation by far more than the old fixed 0.1; the check then
    compares in fp32 within twice the measured bf16 rounding. Weights that are not the sample's still fail."""
    from nvium_dist.checkpoint_io import CheckpointError

    tool, config, state, sample = _deep_bf16_case(seed=3)
    heads, mix = tool._log_probs(config, state, sample, torch.bfloat16, torch.float32)
    other_kernels = dict(sample, log_p_heads=heads, log_p_mix=mix)
    low_heads, low_mix = tool._log_probs(config, state, sample, torch.bfloat16, torch.bfloat16)
    assert (low_heads - heads).abs().max() > 0.1  # the old check (bf16 here vs the sample, 0.1) refused this
    assert tool.self_check(config, state, other_kernels, None, "export", "bfloat16") == 0.0
    assert "in fp32 arithmetic" in capsys.readouterr().out
    _, _, wrong_state, _ = _deep_bf16_case(seed=4)
    with pytest.raises(CheckpointError, match="does not reproduce"):
        tool.self_check(config, wrong_state, other_kernels, None, "export", "bfloat16")
