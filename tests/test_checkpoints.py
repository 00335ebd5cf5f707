"""Checkpoints against hostile and careless input, with the real trainer in gloo processes.

A resume in any layout continues the run (weights and Adam moments), a planted pickle never runs, a
damaged newest checkpoint falls back to the previous one, pruning keeps to the run's lineage, rank 0
chooses the checkpoint for every rank, and one run directory has one trainer. Every resume test checks
the step it resumed from: on CPU a deterministic restart from step 0 would give the same losses.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed_runner import run_distributed
from nvium_dist.checkpoint_io import CheckpointError, verify_manifest, write_manifest
from trainer_fixtures import ROOT, corpus, read_metrics, small_overrides, train  # noqa: F401

TOLERANCE = 1e-5
SIX_STEPS = {"training.train_iters": 6, "training.save_interval": 4, "training.eval_interval": 100}
LAYOUTS = {  # name -> (processes, settings)
    "tp1": (1, {}),
    "tp2": (2, {"parallel.tensor_parallel": 2}),
    "dp2-zero2": (2, {"parallel.zero_stage": 2}),
    "dp2-zero3": (2, {"parallel.zero_stage": 3}),
    "pp2-zero1": (2, {"parallel.pipeline_parallel": 2, "parallel.zero_stage": 1}),
}
STEP4 = "step_00000004"
# DeepSpeed's ZeRO-1 files from one process: the lean path would run ZeRO-0 (parallel.lean_single_process)
ZERO1_ONE_PROCESS = {"parallel.zero_stage": 1, "parallel.lean_single_process": "false"}


@pytest.fixture(scope="module")
def six_step_run(corpus, tmp_path_factory):  # noqa: F811
    """An uninterrupted 6-step run per layout (checkpoints at steps 4 and 6), trained once: -> (run dir, records)."""
    runs = {}

    def get(layout: str):
        if layout not in runs:
            run_dir = tmp_path_factory.mktemp(layout)
            processes, settings = LAYOUTS[layout]
            records, _, resumed = train(processes, corpus, run_dir, **SIX_STEPS, **settings)
            assert resumed is None and sorted(records) == [1, 2, 3, 4, 5, 6]
            runs[layout] = run_dir, records
        return runs[layout]
    return get


def copy_checkpoints(source_run: Path, target_run: Path, *steps: str) -> Path:
    """A new run directory holding copies of `steps` of another run, `latest` at the last of them."""
    checkpoints = target_run / "checkpoints"
    checkpoints.mkdir(parents=True)
    for step in steps:
        shutil.copytree(source_run / "checkpoints" / step, checkpoints / step)
    (checkpoints / "latest").write_text(steps[-1] + "\n")
    return checkpoints


def choose(run_dir: Path, corpus: dict, settings: dict) -> Path | None:  # noqa: F811
    """Rank 0's choice of checkpoint, in this process (its warnings go to this process's stderr)."""
    from nvium_dist.config import load_config
    from nvium_dist.training.checkpoint import choose_checkpoint

    return choose_checkpoint(run_dir, load_config(None, small_overrides(corpus, run_dir, **settings)))


def loss_diffs(records, reference, steps):
    return [abs(records[s]["loss"] - reference[s]["loss"]) for s in steps]


@pytest.mark.parametrize("source,target", [
    ("tp2", "tp2"), ("pp2-zero1", "pp2-zero1"), ("tp2", "tp1"), ("tp1", "tp2"), ("dp2-zero2", "pp2-zero1"),
    ("pp2-zero1", "dp2-zero3")])
def test_resume_in_any_layout_continues_the_run(source, target, six_step_run, corpus, tmp_path):  # noqa: F811
    """From step 4 of a run, in the same layout (DeepSpeed's own state) or another one (full weights and Adam
    moments from model.safetensors and optimizer.safetensors), steps 5-6 match the uninterrupted run."""
    source_run, uninterrupted = six_step_run(source)
    copy_checkpoints(source_run, tmp_path, STEP4)
    processes, settings = LAYOUTS[target]
    records, _, resumed = train(processes, corpus, tmp_path, **SIX_STEPS, **settings)
    assert resumed == 4 and sorted(records) == [5, 6]
    diffs = loss_diffs(records, uninterrupted, [5, 6])
    print(f"{source} -> {target}: |loss diff| at steps 5, 6 = {diffs}")
    assert max(diffs) < (1e-6 if source == target else TOLERANCE)


def test_reshard_then_train_continues_the_run(six_step_run, corpus, tmp_path):  # noqa: F811
    """`export_checkpoint.py --tp 2` of a TP=1 checkpoint, then training at TP=2 from it."""
    source_run, uninterrupted = six_step_run("tp1")
    out = tmp_path / "tp2"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "export_checkpoint.py"), "--checkpoint",
                           str(source_run / "checkpoints" / STEP4), "--output", str(out), "--tp", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "self-check (resharded checkpoint)" in done.stdout
    step = out / "checkpoints" / STEP4
    assert sorted(p.name for p in step.iterdir()) == ["config.json", "manifest.json", "model.safetensors",
                                                      "optimizer.safetensors", "sample_check.safetensors",
                                                      "trainer_state.json"]
    records, _, resumed = train(2, corpus, out, **SIX_STEPS, **LAYOUTS["tp2"][1])
    assert resumed == 4 and sorted(records) == [5, 6]
    assert max(loss_diffs(records, uninterrupted, [5, 6])) < TOLERANCE


# -- code execution and tampering -------------------------------------------------------------------------

class PlantedPayload:
    """What an attacker plants: unpickling it calls os.makedirs(marker) (any callable would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


@pytest.fixture(scope="module")
def zero1_run(corpus, tmp_path_factory):  # noqa: F811
    """One process, ZeRO-1 (DeepSpeed writes model and optimizer pickles), checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("zero1")
    train(1, corpus, run_dir, **{"training.train_iters": 4, "training.save_interval": 2, **ZERO1_ONE_PROCESS})
    return run_dir


def test_checkpoints_hold_no_programs_and_a_complete_manifest(zero1_run):
    step = zero1_run / "checkpoints" / STEP4
    assert not list(step.rglob("*.py")), "DeepSpeed's zero_to_fp32.py / zero_to_torch.py must not stay in step dirs"
    manifest = json.loads((step / "manifest.json").read_text())
    files = sorted(p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest["files"]) == files
    assert {"deepspeed/state/mp_rank_00_model_states.pt", "deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "optimizer.safetensors", "rng/rank_00000.pt"} <= set(files)


def test_planted_pickle_is_refused_and_never_runs(zero1_run, corpus, tmp_path, capsys):  # noqa: F811
    """A pickle swapped into the newest checkpoint (and one added next to it): the manifest refuses that
    checkpoint and the run resumes from the previous one; the payload never runs."""
    marker = tmp_path / "payload-ran"
    checkpoints = copy_checkpoints(zero1_run, tmp_path / "run", "step_00000002", STEP4)
    state = checkpoints / STEP4 / "deepspeed" / "state"
    torch.save({"module": PlantedPayload(marker)}, state / "mp_rank_00_model_states.pt")
    torch.save(PlantedPayload(marker), state / "extra.pt")
    settings = {"training.train_iters": 6, "training.save_interval": 2, **ZERO1_ONE_PROCESS}
    assert choose(tmp_path / "run", corpus, settings) == checkpoints / "step_00000002"
    err = capsys.readouterr().err
    assert f"WARNING: checkpoint {checkpoints / STEP4} is unusable" in err and "manifest does not list" in err
    records, _, resumed = train(1, corpus, tmp_path / "run", **settings)
    assert resumed == 2 and sorted(records) == [3, 4, 5, 6]
    assert not marker.exists()


def test_planted_pickle_with_a_forged_manifest_still_never_runs(zero1_run, corpus, tmp_path, capsys):  # noqa: F811
    """Whoever can rewrite the manifest too gets past it, but the pickles' globals are read without running them:
    the checkpoint is refused naming the file and the run falls back to the previous one (issue 22 case 11: it
    aborted); DeepSpeed's files load with weights_only=True anyway."""
    from nvium_dist.training.checkpoint import load_weights_only

    marker = tmp_path / "payload-ran"
    checkpoints = copy_checkpoints(zero1_run, tmp_path / "run", "step_00000002", STEP4)
    planted = checkpoints / STEP4 / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": PlantedPayload(marker)}, planted)
    write_manifest(checkpoints / STEP4)
    settings = {"training.train_iters": 6, "training.save_interval": 2, **ZERO1_ONE_PROCESS}
    assert choose(tmp_path / "run", corpus, settings) == checkpoints / "step_00000002"
    err = capsys.readouterr().err
    assert f"WARNING: checkpoint {checkpoints / STEP4} is unusable ({planted} names " in err, err
    assert "makedirs, which weights_only loading refuses" in err, err
    with pytest.raises(CheckpointError, match="could not be loaded with weights_only=True"):
        load_weights_only(planted)
    records, _, resumed = train(1, corpus, tmp_path / "run", **settings)  # replaces the planted step 4
    assert resumed == 2 and sorted(records) == [3, 4, 5, 6]
    assert not marker.exists()
    # DeepSpeed's real files load through the same allowlist
    original = zero1_run / "checkpoints" / STEP4 / "deepspeed" / "state" / planted.name
    assert load_weights_only(original)["optimizer_state_dict"]["zero_stage"] == 1


def test_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(zero1_run, corpus, tmp_path):  # noqa: F811
    """Issue 22 case 10 on a real full tmpfs: the save fails with "no space left" naming the path and the free
    space (today torch's "[enforce fail ...] unexpected pos"); step 2 and `latest` survive, no partial step stays."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        checkpoints = copy_checkpoints(zero1_run, disk / "run", "step_00000002")
        before = sorted(p.relative_to(checkpoints).as_posix() for p in checkpoints.rglob("*"))
        with open(disk / "filler", "wb") as f:
            f.write(b"\0" * (shutil.disk_usage(disk).free - 1024 * 1024))  # room for the index cache only
        settings = {"training.train_iters": 4, "training.save_interval": 2, "parallel.zero_stage": 1}
        with pytest.raises(RuntimeError, match=r"no space left on the device writing .*\.tmp_step_00000004 \(\d\.\d MiB "
                                               r"free there.*latest still names the last good checkpoint"):
            train(1, corpus, disk / "run", **settings)
        assert sorted(p.relative_to(checkpoints).as_posix() for p in checkpoints.rglob("*")) == before
        assert (checkpoints / "latest").read_text().strip() == "step_00000002"
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# -- fallback, fresh starts and pruning ---------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["deepspeed-byte", "no-trainer-state", "truncated-weights"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(damage, zero1_run, corpus,  # noqa: F811
                                                               tmp_path, capsys):
    checkpoints = copy_checkpoints(zero1_run, tmp_path, "step_00000002", STEP4)
    newest = checkpoints / STEP4
    if damage == "deepspeed-byte":
        target = newest / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "no-trainer-state":
        (newest / "trainer_state.json").unlink()
    else:
        target = newest / "model.safetensors"
        target.write_bytes(target.read_bytes()[:1000])
    settings = {"training.train_iters": 5, "training.save_interval": 100, **ZERO1_ONE_PROCESS}
    assert choose(tmp_path, corpus, settings) == checkpoints / "step_00000002"
    assert f"WARNING: checkpoint {newest} is unusable" in capsys.readouterr().err
    records, _, resumed = train(1, corpus, tmp_path, **settings)
    assert resumed == 2 and sorted(records) == [3, 4, 5]


def test_no_good_checkpoint_is_an_error_unless_fresh_starts_are_allowed(zero1_run, corpus,  # noqa: F811
                                                                         tmp_path, capsys):
    checkpoints = copy_checkpoints(zero1_run, tmp_path, STEP4)
    (checkpoints / STEP4 / "trainer_state.json").write_text("{}")
    settings = {"training.train_iters": 2, **ZERO1_ONE_PROCESS}
    with pytest.raises(RuntimeError, match="no usable checkpoint .* training.allow_fresh_start=true"):
        train(1, corpus, tmp_path, **settings)
    allowed = {**settings, "training.allow_fresh_start": "true"}
    assert choose(tmp_path, corpus, allowed) is None
    assert "starting from step 0 because training.allow_fresh_start=true" in capsys.readouterr().err
    records, _, resumed = train(1, corpus, tmp_path, **allowed)
    assert resumed is None and sorted(records) == [1, 2]
    assert (checkpoints / STEP4).is_dir()  # the broken checkpoint is left for inspection


def test_pruning_keeps_to_the_lineage(zero1_run, corpus, tmp_path):  # noqa: F811
    """A fresh start (allowed) over a broken step 100 of an earlier run: pruning by name would delete the
    new run's own checkpoints and leave `latest` dangling; pruning by step within the lineage does not."""
    checkpoints = copy_checkpoints(zero1_run, tmp_path, STEP4)
    old = checkpoints / "step_00000100"
    os.rename(checkpoints / STEP4, old)
    (old / "model.safetensors").unlink()
    (checkpoints / "latest").write_text(old.name + "\n")
    settings = {"training.train_iters": 6, "training.save_interval": 2, "training.keep_checkpoints": 1,
                **ZERO1_ONE_PROCESS, "training.allow_fresh_start": "true"}
    train(1, corpus, tmp_path, **settings)
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000006", old.name]
    assert (checkpoints / "latest").read_text().strip() == "step_00000006"
    records, _, resumed = train(1, corpus, tmp_path, **{**settings, "training.train_iters": 8})
    assert resumed == 6 and sorted(records) == list(range(1, 9))


def test_resume_with_another_model_or_seed_is_refused(zero1_run, corpus, tmp_path):  # noqa: F811
    copy_checkpoints(zero1_run, tmp_path, STEP4)
    settings = {"training.train_iters": 6, **ZERO1_ONE_PROCESS}
    with pytest.raises(RuntimeError, match=r"model.hidden_size: checkpoint 64 != config 96"):
        train(1, corpus, tmp_path, **settings, **{"model.hidden_size": 96})
    with pytest.raises(RuntimeError, match=r"training.seed: checkpoint 1234 != config 99.*sample order"):
        train(1, corpus, tmp_path, **settings, **{"training.seed": 99})


# -- rank 0 decides ---------------------------------------------------------------------------------------------

def _find_resume_per_rank(rank, world_size, run_dirs, overrides):
    """Each rank looks at its own copy of the run directory, as if the file system showed them different states."""
    from nvium_dist.config import load_config
    from nvium_dist.parallel import init_distributed
    from nvium_dist.training.checkpoint import find_resume

    config = load_config(None, overrides)
    init_distributed(config.parallel)
    try:
        found = find_resume(run_dirs[rank], config, rank)
    except Exception as err:  # noqa: BLE001 - the test compares what each rank raised
        return type(err).__name__, str(err)
    return "chose", str(found["path"]) if found else None


def test_rank0_chooses_the_checkpoint_and_its_errors_reach_every_rank(zero1_run, corpus, tmp_path):  # noqa: F811
    good = copy_checkpoints(zero1_run, tmp_path / "good", "step_00000002", STEP4)
    damaged = copy_checkpoints(zero1_run, tmp_path / "damaged", "step_00000002", STEP4)
    (damaged / STEP4 / "trainer_state.json").unlink()
    overrides = small_overrides(corpus, tmp_path, **ZERO1_ONE_PROCESS)
    both = run_distributed(_find_resume_per_rank, 2, [tmp_path / "good", tmp_path / "damaged"], overrides)
    assert both == [("chose", str(good / STEP4))] * 2
    both = run_distributed(_find_resume_per_rank, 2, [tmp_path / "damaged", tmp_path / "good"], overrides)
    assert both == [("chose", str(damaged / "step_00000002"))] * 2
    shutil.rmtree(damaged / "step_00000002")
    errors = run_distributed(_find_resume_per_rank, 2, [tmp_path / "damaged", tmp_path / "good"], overrides)
    assert errors[0][0] == "CheckpointError" and "no usable checkpoint" in errors[0][1]
    assert errors[1][0] == "RankZeroError" and "no usable checkpoint" in errors[1][1]


# -- one trainer per run directory ----------------------------------------------------------------------------

def test_second_trainer_on_a_run_dir_stops_with_one_clear_line(corpus, tmp_path):  # noqa: F811
    from nvium_dist.training.run_lock import RunDirLock

    holder = RunDirLock(tmp_path)
    holder.acquire()  # what a running trainer's rank 0 holds
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    cmd = [sys.executable, str(ROOT / "pretrain" / "pretrain_nvium.py"), "--config",
           str(ROOT / "pretrain" / "configs" / "tiny.yaml")]
    for override in small_overrides(corpus, tmp_path):
        cmd += ["--set", override]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: run directory {tmp_path} is in use by trainer pid {os.getpid()} on ")
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    holder.release()


# -- pipeline checkpoints send nothing model-sized to rank 0 -----------------------------------------------------

def _train_recording_object_collectives(rank, world_size, overrides):
    """Trains with torch.distributed's object collectives wrapped to record the pickled size of what they carry
    (an object collective over NCCL stages the whole pickle in GPU memory, world-size times on the receiver)."""
    import pickle

    import torch.distributed as dist

    from trainer_fixtures import train_in_process

    sizes = []
    for name in ("gather_object", "all_gather_object", "broadcast_object_list", "scatter_object_list"):
        original = getattr(dist, name)

        def recording(obj, *args, _original=original, **kwargs):
            sizes.append(len(pickle.dumps(obj)))
            return _original(obj, *args, **kwargs)
        setattr(dist, name, recording)
    result = train_in_process(rank, world_size, overrides)
    return result, max(sizes)


def test_pipeline_checkpoint_sends_nothing_model_sized_through_object_collectives(corpus, tmp_path):  # noqa: F811
    overrides = small_overrides(corpus, tmp_path, **{"training.train_iters": 2, **LAYOUTS["pp2-zero1"][1]})
    results = run_distributed(_train_recording_object_collectives, 2, overrides)
    largest = max(size for _, size in results)
    model_bytes = (tmp_path / "checkpoints" / "step_00000002" / "model.safetensors").stat().st_size
    print(f"largest object collective payload {largest} bytes; model.safetensors {model_bytes} bytes")
    assert largest < 16_384 < model_bytes // 10
    records, _ = read_metrics(tmp_path)
    assert sorted(records) == [1, 2]


def test_a_partial_check_refuses_a_file_the_manifest_does_not_list(tmp_path):
    """verify_manifest(only=...) (what an export reads) treats an unlisted file it would read as planted, and
    a file that is absent and unlisted (a checkpoint saved without one) as fine."""
    (tmp_path / "config.json").write_text("{}")
    write_manifest(tmp_path)
    verify_manifest(tmp_path, only=["config.json", "sample_check.safetensors"])
    (tmp_path / "sample_check.safetensors").write_bytes(b"planted after the save")
    with pytest.raises(CheckpointError, match="manifest does not list.*sample_check.safetensors"):
        verify_manifest(tmp_path, only=["config.json", "sample_check.safetensors"])
