"""The slurm/ scripts on a real (private, two-node) Slurm cluster: no mocks.

The cluster (tests/slurm_cluster.py) runs munged, slurmctld and two slurmd "nodes" from the installed
Debian packages. If it cannot start, the tests fail with the reason. Jobs run the real scripts:
  * slurm/pretrain.sbatch: a tiny 2-node x 1-process gloo run to completion, and the same run preempted
    (Slurm's `--signal=B:USR1` emulated by `scancel --signal=USR1 --batch`), requeued and resumed, whose
    per-step losses must equal the uninterrupted run's;
  * slurm/submit_preprocess.sh: preprocessing array + dependent merge == one preprocess_data.py run;
  * slurm/export.sbatch on the finished run.
Job outputs stay under pytest's tmp directory (basetemp) for inspection.
"""
from __future__ import annotations

import json
import os
import re
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from slurm_cluster import SlurmCluster, SlurmError, free_ports

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "slurm"
ITERS = 40          # training steps of the tiny runs
SIGNAL_AT = 5       # the preempted run gets USR1 once this many steps are logged

pytestmark = pytest.mark.slurm


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def cluster():
    c = SlurmCluster()
    try:
        c.start()
    except SlurmError as err:
        pytest.fail(f"the private Slurm cluster did not start: {err}", pytrace=False)
    try:
        yield c
    finally:
        c.stop()


def job_env(cluster: SlurmCluster, **extra) -> dict:
    """Environment a job is submitted with (sbatch exports it): this venv's python, CPU, one thread."""
    bin_dir = str(Path(sys.executable).parent)
    env = dict(cluster.env, PATH=f"{bin_dir}:{cluster.env.get('PATH', '')}", NVIUM_PYTHON=sys.executable,
               OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="offline")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def tool(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)], check=True,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Default corpus -> 512-piece tokenizer -> train/valid .bin/.idx, with the real tools."""
    d = tmp_path_factory.mktemp("slurm-corpus")
    tool("build_default_corpus.py", "--output-dir", d / "corpus")
    tool("train_tokenizer.py", "--input", d / "corpus" / "train.jsonl", "--vocab-size", 512,
         "--output-prefix", d / "tok", "--threads", 1)
    for split in ("train", "valid"):
        tool("preprocess_data.py", "--input", d / "corpus" / f"{split}.jsonl", "--json-keys", "text",
             "--tokenizer-model", d / "tok.model", "--output-prefix", d / split, "--append-eod", "--no-progress")
    return {"dir": d, "train": str(d / "train_text_document"), "valid": str(d / "valid_text_document"),
            "tokenizer": str(d / "tok.model")}


def tiny_overrides(corpus: dict, run_dir: Path) -> list[str]:
    """pretrain/configs/tiny.yaml made smaller still; bare KEY=VALUE arguments become --set KEY=VALUE."""
    settings = {
        "data.train_data": f"[{corpus['train']}]", "data.valid_data": f"[{corpus['valid']}]",
        "data.tokenizer_model": corpus["tokenizer"],
        "model.vocab_size": 512, "model.make_vocab_size_divisible_by": 64, "model.hidden_size": 64,
        "model.num_layers": 4, "model.num_heads": 4, "model.ffn_hidden_size": 128, "model.exits": "[1,2,3]",
        "model.seq_length": 64, "training.micro_batch_size": 4, "training.global_batch_size": 8,
        "training.train_iters": ITERS, "training.log_interval": 1, "training.save_interval": 25,
        "training.eval_interval": ITERS, "training.eval_iters": 2, "parallel.zero_stage": 1,
    }
    return ["--set", f"training.run_dir={run_dir}"] + [f"{k}={v}" for k, v in settings.items()]


class PretrainJob:
    def __init__(self, cluster: SlurmCluster, corpus: dict, base: Path, name: str, extra: tuple[str, ...] = ()):
        self.cluster, self.name = cluster, name
        self.run_dir = base / name
        self.log_dir = base / f"{name}-logs"
        self.batch_log = base / f"{name}-batch.out"
        env = job_env(cluster, NVIUM_DEVICE="cpu", NVIUM_NPROC_PER_NODE=1, NVIUM_LOG_DIR=self.log_dir,
                      NVIUM_MASTER_PORT=free_ports(1)[0])
        self.id = cluster.sbatch(["-N2", "-J", f"nvium-{name}", "-o", self.batch_log, SLURM / "pretrain.sbatch",
                                  ROOT / "pretrain" / "configs" / "tiny.yaml", *tiny_overrides(corpus, self.run_dir),
                                  *extra],
                                 cwd=base, env=env)

    def node_log(self, node: str) -> Path:
        return self.log_dir / f"nvium-{self.name}-{self.id}-{node}.log"

    def logs(self) -> str:
        parts = []
        for f in [self.batch_log, self.node_log("node1"), self.node_log("node2")]:
            text = f.read_text(errors="replace") if f.exists() else "(missing)"
            parts.append(f"--- {f.name} ---\n" + "\n".join(text.replace("\r", "\n").splitlines()[-40:]))
        return "\n".join(parts)

    def wait(self, timeout: float = 900) -> dict:
        info = self.cluster.wait(self.id, timeout=timeout)
        assert info["JobState"] == "COMPLETED", f"job {self.id}: {info['JobState']} {info.get('ExitCode')}\n{self.logs()}"
        return info

    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def train_records(self) -> list[dict]:
        return [r for r in self.metrics() if "loss" in r and "eval_ce" not in r]


@pytest.fixture(scope="module")
def training_jobs(cluster, corpus, tmp_path_factory) -> dict:
    """The uninterrupted reference run and the preempted run, submitted together (1 CPU per node each).

    Once the second run has logged SIGNAL_AT steps it gets what `#SBATCH --signal=B:USR1@300` sends 300 s
    before the time limit: SIGUSR1 to the batch shell only (`scancel --signal=USR1 --batch`)."""
    base = tmp_path_factory.mktemp("slurm-pretrain")
    jobs = {"reference": PretrainJob(cluster, corpus, base, "reference"),
            "preempted": PretrainJob(cluster, corpus, base, "preempted")}
    job = jobs["preempted"]
    cluster.wait_for(f"{SIGNAL_AT} logged steps of job {job.id}",
                     lambda: len(job.train_records()) >= SIGNAL_AT or cluster.state(job.id) not in ("PENDING", "RUNNING"),
                     timeout=600)
    assert cluster.state(job.id) == "RUNNING", job.logs()
    cluster.run(["scancel", "--signal=USR1", "--batch", str(job.id)])
    job.signalled_at = len(job.train_records())
    return jobs


# ----------------------------------------------------------------------------------------------- tests

def test_cluster_runs_two_node_job(cluster, tmp_path):
    """Plain sbatch + srun: one task on each of the two nodes; NodeAddr is what pretrain.sbatch reads."""
    out = tmp_path / "hostname.out"
    job = cluster.sbatch(["-N2", "--ntasks-per-node=1", "-o", out, "--wrap",
                          "srun bash -c 'echo task $SLURM_PROCID on $SLURMD_NODENAME'"], cwd=tmp_path)
    info = cluster.wait(job, timeout=120)
    assert info["JobState"] == "COMPLETED", (info, out.read_text() if out.exists() else "")
    assert info["NodeList"] == "node[1-2]"
    assert sorted(out.read_text().split("\n")[:2]) == ["task 0 on node1", "task 1 on node2"]
    assert cluster.node_addr("node1") == "127.0.0.1"


def test_pretrain_refuses_fewer_cpus_than_trainers(cluster, tmp_path):
    """Without --exclusive or --cpus-per-task a job holds one CPU per node; two trainers would share it."""
    out = tmp_path / "batch.out"
    env = job_env(cluster, NVIUM_DEVICE="cpu", NVIUM_NPROC_PER_NODE=2, NVIUM_LOG_DIR=tmp_path / "logs")
    job = cluster.sbatch(["-N1", "-o", out, SLURM / "pretrain.sbatch", ROOT / "pretrain" / "configs" / "tiny.yaml"],
                         cwd=tmp_path, env=env)
    info = cluster.wait(job, timeout=120)
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("2:"), info
    assert "holds 1 CPU(s) per node for 2 trainer processes" in out.read_text()
    job = cluster.sbatch(["-N1", "--cpus-per-task=2", "-o", tmp_path / "ok.out", "--wrap", "echo $SLURM_CPUS_ON_NODE"],
                         cwd=tmp_path)
    assert cluster.wait(job, timeout=120)["JobState"] == "COMPLETED"
    assert (tmp_path / "ok.out").read_text().strip() == "2"  # what the script then sees


@pytest.mark.slow
def test_pretrain_two_nodes_completes(training_jobs):
    job = training_jobs["reference"]
    info = job.wait()
    assert info["Restarts"] == "0" and info["ExitCode"] == "0:0"
    steps = [r["step"] for r in job.train_records()]
    assert steps == list(range(1, ITERS + 1)), job.logs()
    latest = (job.run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest.endswith(f"step_{ITERS:08d}") and (job.run_dir / "checkpoints" / f"step_{ITERS:08d}").is_dir()
    batch = job.batch_log.read_text()
    assert "nodes 2 (node[1-2]) x 1 processes, device cpu, rendezvous 127.0.0.1:" in batch
    for node in ("node1", "node2"):   # one log per node, each with its own torchrun
        assert "torchrun exited with status 0" in job.node_log(node).read_text()


@pytest.mark.slow
def test_preemption_checkpoints_requeues_and_resumes_identically(cluster, training_jobs):
    job, reference = training_jobs["preempted"], training_jobs["reference"]
    signalled_at = job.signalled_at
    info = job.wait()
    reference.wait()

    assert info["Restarts"] == "1", job.logs()
    node_logs = job.node_log("node1").read_text() + job.node_log("node2").read_text()
    stops = [int(line.rsplit(" ", 1)[1]) for line in node_logs.replace("\r", "\n").splitlines()
             if line.startswith("preempted: checkpoint saved at step")]
    assert len(stops) == 1, job.logs()
    stop = stops[0]
    assert signalled_at <= stop < ITERS, (signalled_at, stop)
    assert (job.run_dir / "checkpoints" / f"step_{stop:08d}").is_dir()
    batch = job.batch_log.read_text()
    assert "received SIGUSR1" in batch and "requeueing job" in batch, batch
    assert f"resumed from {job.run_dir / 'checkpoints' / f'step_{stop:08d}'} at step {stop}" in node_logs, job.logs()
    for node in ("node1", "node2"):
        assert "received SIGUSR1" in job.node_log(node).read_text()

    # Every step trained and logged exactly once, with the uninterrupted run's loss.
    records = job.train_records()
    assert [r["step"] for r in records] == list(range(1, ITERS + 1)), job.logs()
    ref = {r["step"]: r["loss"] for r in reference.train_records()}
    diffs = {r["step"]: abs(r["loss"] - ref[r["step"]]) for r in records}
    assert max(diffs.values()) <= 1e-6, {s: d for s, d in diffs.items() if d > 1e-6}
    ref_eval = [r for r in reference.metrics() if "eval_ce" in r]
    got_eval = [r for r in job.metrics() if "eval_ce" in r]
    assert len(got_eval) == len(ref_eval) == 1
    assert abs(got_eval[0]["eval_ce"] - ref_eval[0]["eval_ce"]) <= 1e-6


@pytest.mark.slow
def test_export_sbatch_exports_latest_checkpoint(cluster, training_jobs, tmp_path):
    job = training_jobs["reference"]
    job.wait()
    out = tmp_path / "export"
    log = tmp_path / "export.out"
    export = cluster.sbatch(["-o", log, SLURM / "export.sbatch", job.run_dir, out], cwd=tmp_path,
                            env=job_env(cluster))
    info = cluster.wait(export, timeout=600)
    assert info["JobState"] == "COMPLETED", log.read_text()
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        assert (out / name).is_file(), (name, log.read_text())


def trainer_workers(run_dir: Path) -> list[int]:
    """Pids of the trainer processes (torchrun's workers, not torchrun) of the run in `run_dir`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if (any(a.endswith(b"pretrain_nvium.py") for a in args) and f"training.run_dir={run_dir}".encode() in args
                and b"torch.distributed.run" not in args):
            found.append(int(cmdline.parent.name))
    return found


@pytest.mark.slow
def test_hung_rank_is_requeued_and_resumes_from_its_last_checkpoint(cluster, corpus, tmp_path):
    """SIGSTOP one of the two trainer ranks: the other's watchdog exits with code 75 (HUNG) within
    hang_timeout_s, pretrain.sbatch requeues the job, and the requeued job resumes from the newest checkpoint
    written before the hang and trains to the end."""
    iters, save_every = 60, 5
    job = PretrainJob(cluster, corpus, tmp_path, "hung", extra=(
        f"training.train_iters={iters}", f"training.save_interval={save_every}", "training.hang_timeout_s=15"))
    cluster.wait_for(f"8 logged steps of job {job.id}",
                     lambda: len(job.train_records()) >= 8 or cluster.state(job.id) not in ("PENDING", "RUNNING"),
                     timeout=600)
    workers = trainer_workers(job.run_dir)
    assert len(workers) == 2, (workers, job.logs())
    os.kill(workers[1], signal.SIGSTOP)
    stopped_at = len(job.train_records())
    info = job.wait()

    assert info["Restarts"] == "1", job.logs()
    batch = job.batch_log.read_text()
    assert "a trainer rank hung or lost a hung peer (exit code 75" in batch and "requeueing job" in batch, batch
    node_logs = job.node_log("node1").read_text() + job.node_log("node2").read_text()
    assert re.search(r"\[watchdog\] rank [01] hung in (step|save|eval) at step \d+: no progress for \d+ s", node_logs), job.logs()
    resumed = re.findall(r"resumed from \S+step_(\d{8}) at step (\d+)", node_logs)
    assert resumed, job.logs()
    step = int(resumed[0][1])
    assert step % save_every == 0 and stopped_at - save_every <= step <= stopped_at + 1, (step, stopped_at)
    assert [r["step"] for r in job.train_records()] == list(range(1, iters + 1)), job.logs()


def read_documents(prefix: str) -> list[bytes]:
    """Documents of a Megatron .bin/.idx pair (MMIDIDX v1) as raw token bytes, without megatron."""
    idx = Path(prefix + ".idx").read_bytes()
    assert idx[:9] == b"MMIDIDX\x00\x00"
    dtype = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
             8: np.uint16}[idx[17]]
    n_seq = int(np.frombuffer(idx, np.int64, 1, 18)[0])
    lengths = np.frombuffer(idx, np.int32, n_seq, 34)
    pointers = np.frombuffer(idx, np.int64, n_seq, 34 + 4 * n_seq)
    data = Path(prefix + ".bin").read_bytes()
    size = np.dtype(dtype).itemsize
    return [data[p:p + n * size] for p, n in zip(pointers.tolist(), lengths.tolist())]


@pytest.mark.slow
def test_preprocess_array_and_merge_equal_one_run(cluster, corpus, tmp_path):
    # Five input files of a few Shakespeare scenes each.
    lines = (corpus["dir"] / "corpus" / "train.jsonl").read_text().splitlines()[:100]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i in range(5):
        (inputs / f"part_{i}.jsonl").write_text("\n".join(lines[i::5]) + "\n")
    files = sorted(str(p) for p in inputs.glob("*.jsonl"))
    env = job_env(cluster)

    def submit(mode: str, n: int) -> tuple[int, int]:
        out = subprocess.run(["bash", SLURM / "submit_preprocess.sh", "--input", f"{inputs}/*.jsonl",
                              "--tokenizer-model", corpus["tokenizer"], "--output-prefix", tmp_path / mode / "merged",
                              "--shards", str(n), "--mode", mode, "--log-dir", tmp_path / "logs"],
                             env=env, cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        array_id, merge_id = map(int, out.stdout.split("\n")[-2].split())
        deps = cluster.job(merge_id).get("Dependency", "")
        assert deps.startswith(f"afterok:{array_id}") or cluster.state(merge_id) != "PENDING", deps
        return array_id, merge_id

    shards = {"strided": 2, "contiguous": 2}   # 4 tasks: all fit on the 2 nodes x 2 CPUs at once
    jobs = {mode: submit(mode, n) for mode, n in shards.items()}
    # The same inputs through one preprocess_data.py run (here, while the jobs run).
    tool("preprocess_data.py", "--input", f"{inputs}/*.jsonl", "--json-keys", "text", "--tokenizer-model",
         corpus["tokenizer"], "--output-prefix", tmp_path / "single", "--append-eod", "--no-progress")

    for mode, (array_id, merge_id) in jobs.items():
        cluster.wait(array_id, timeout=600)
        tasks = cluster.jobs(array_id)
        assert [t["JobState"] for t in tasks] == ["COMPLETED"] * shards[mode], (mode, tasks, _read_all(tmp_path / "logs"))
        info = cluster.wait(merge_id, timeout=600)
        assert info["JobState"] == "COMPLETED", (mode, info, _read_all(tmp_path / "logs"))
    assert (tmp_path / "strided" / "merged.shards" / "shard_00001.files").read_text().split() == [files[1], files[3]]

    def same_bytes(a: str, b: str) -> bool:
        return all((Path(a + ext).read_bytes() == Path(b + ext).read_bytes()) for ext in (".bin", ".idx"))

    strided = str(tmp_path / "strided" / "merged_text_document")
    contiguous = str(tmp_path / "contiguous" / "merged_text_document")
    single = str(tmp_path / "single_text_document")
    # contiguous shards, merged in order: byte-identical to one run over the sorted files
    assert same_bytes(contiguous, single)
    # strided shards (files 0,2,4 | 1,3): the same documents, in shard order
    single_docs = read_documents(single)
    assert len(single_docs) == 100
    by_file = [single_docs[20 * k:20 * (k + 1)] for k in range(5)]   # 20 documents per input file
    assert read_documents(strided) == [d for k in (0, 2, 4, 1, 3) for d in by_file[k]]


def _read_all(directory: Path) -> str:
    return "\n".join(f"--- {f.name} ---\n{f.read_text(errors='replace')[-3000:]}" for f in sorted(directory.glob("*")))
