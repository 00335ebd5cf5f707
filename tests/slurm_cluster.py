"""A private, real Slurm cluster on this machine, for the SLURM tests.

Starts, from the installed Debian packages (munge, slurmctld, slurmd, slurm-client; nothing is
installed here), its own ``munged`` (own key made with ``dd``, own socket), one ``slurmctld`` and two
``slurmd`` "nodes" (``node1``, ``node2``; both ``NodeHostname=localhost NodeAddr=127.0.0.1`` on
their own free TCP ports). Config, state, spool, logs and the munge socket all live in one temporary
directory; client commands find the cluster through ``SLURM_CONF`` (see :attr:`SlurmCluster.env`).
:meth:`SlurmCluster.stop` cancels the remaining jobs and stops exactly the daemons started here, by
PID (also when start-up fails half way).

    with SlurmCluster() as cluster:
        job = cluster.sbatch(["-N2", "--wrap", "srun hostname"])
        info = cluster.wait(job)          # {'JobState': 'COMPLETED', ...} from `scontrol show job`

Accounting is off (no slurmdbd), so ``sacct`` has nothing; job states come from
``scontrol show job`` (``MinJobAge`` keeps finished jobs visible for an hour) and the job-completion
log ``jobcomp.txt`` (``JobCompType=jobcomp/filetxt``) in the cluster directory.

Run standalone to poke at a cluster by hand: ``python tests/slurm_cluster.py`` prints the SLURM_CONF
to export and waits for Ctrl-C.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED",
}


class SlurmError(RuntimeError):
    pass


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None
    )


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started the cluster dies (even by SIGKILL),
    so that a killed test run does not leave daemons behind (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def missing_programs() -> list[str]:
    return [name for name in DAEMONS + CLIENTS + ("mungekey",) if _which(name) is None]


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so that they differ)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def parse_scontrol(text: str) -> dict[str, str]:
    """Key=Value pairs of one `scontrol show -o` record (values may contain '=' but not spaces)."""
    out: dict[str, str] = {}
    for tok in text.split():
        if "=" in tok:
            key, val = tok.split("=", 1)
            out.setdefault(key, val)
    return out


class SlurmCluster:
    """A two-node Slurm cluster in a temporary directory. Use as a context manager or start()/stop()."""

    def __init__(self, nodes: int = 2, cpus_per_node: int = 2, root: str | os.PathLike | None = None,
                 keep: bool | None = None, cred_expire: int = 10):
        self.nodes = [f"node{i + 1}" for i in range(nodes)]
        self.cpus_per_node = cpus_per_node
        # Step credential lifetime; Slurm also holds a requeued job for this long before it may start
        # again (default 120 s). Short here so that requeue tests do not wait two minutes.
        self.cred_expire = cred_expire
        self._root_arg = root
        self.keep = bool(int(os.environ.get("NVIUM_SLURM_KEEP", "0"))) if keep is None else keep
        self.root: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.env: dict[str, str] = {}

    # ------------------------------------------------------------------ start / stop
    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        missing = missing_programs()
        if missing:
            raise SlurmError(
                f"Slurm/munge programs not found: {', '.join(missing)}. Install the Debian packages with "
                "`bash scripts/setup.sh --with-slurm` (munge slurmctld slurmd slurm-client)."
            )
        if os.geteuid() != 0:
            raise SlurmError("the private Slurm cluster runs its daemons as root (SlurmUser=root); run as root")
        if self._root_arg is not None:
            self.root = Path(self._root_arg)
            self.root.mkdir(parents=True, exist_ok=True)
        else:
            self.root = Path(tempfile.mkdtemp(prefix="nvium-slurm-"))
        try:
            self._write_files()
            self._start_munged(timeout)
            self._start_slurmctld(timeout)
            self._start_slurmds(timeout)
        except BaseException as exc:
            logs = self.log_tail()
            self.stop()
            if isinstance(exc, SlurmError):
                raise SlurmError(f"{exc}\n{logs}") from None
            raise
        return self

    def _write_files(self) -> None:
        r = self.root
        for sub in ("state", "log", "run", "munge", "jobs"):
            (r / sub).mkdir(exist_ok=True)
        for node in self.nodes:
            (r / "spool" / node).mkdir(parents=True, exist_ok=True)
        os.chmod(r, 0o755)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        # Own key: 1024 random bytes (what `mungekey` would make), readable by the owner only.
        subprocess.run(["dd", "if=/dev/urandom", f"of={key}", "bs=1024", "count=1", "status=none"], check=True)
        os.chmod(key, 0o400)
        self.munge_socket = r / "munge" / "munge.socket"
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        self.ctld_port, self.node_ports = ctld_port, node_ports
        host = socket.gethostname().split(".")[0]
        (r / "plugstack.conf").write_text("")
        node_lines = "\n".join(
            f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus_per_node} "
            "RealMemory=1000 State=UNKNOWN"
            for n, p in zip(self.nodes, node_ports)
        )
        conf = f"""\
# Private test cluster written by tests/slurm_cluster.py
ClusterName=nvium-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={r}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={r}/log/jobcomp.txt
JobRequeue=1
ReturnToService=2
MinJobAge=3600
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
Waittime=0
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        self.conf = r / "slurm.conf"
        self.conf.write_text(conf)
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        # A job must not inherit the SLURM_* of an enclosing allocation (e.g. pytest run inside a job).
        for k in list(self.env):
            if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF":
                del self.env[k]

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self.env, start_new_session=True, preexec_fn=_die_with_parent)
        log.close()
        self.procs[name] = proc
        return proc

    def _wait_for(self, what: str, ok, timeout: float, procs: list[str]) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name in procs:
                rc = self.procs[name].poll()
                if rc is not None:
                    raise SlurmError(f"{name} exited with status {rc} while waiting for {what}")
            if ok():
                return
            time.sleep(0.2)
        raise SlurmError(f"timed out after {timeout:.0f}s waiting for {what}")

    def _start_munged(self, timeout: float) -> None:
        r = self.root
        self._spawn("munged", [
            _which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
            f"--key-file={r}/munge/munge.key", f"--log-file={r}/log/munged.log",
            f"--pid-file={r}/run/munged.pid", f"--seed-file={r}/munge/munged.seed",
        ])

        def munge_ok() -> bool:
            if not self.munge_socket.exists():
                return False
            enc = subprocess.run(["munge", "-S", str(self.munge_socket), "-n"], capture_output=True)
            if enc.returncode != 0:
                return False
            dec = subprocess.run(["unmunge", "-S", str(self.munge_socket)], input=enc.stdout, capture_output=True)
            return dec.returncode == 0

        self._wait_for("munged to answer on its socket", munge_ok, timeout, ["munged"])

    def _start_slurmctld(self, timeout: float) -> None:
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(self.conf)])
        self._wait_for("slurmctld to answer `scontrol ping`",
                       lambda: "UP" in self.run(["scontrol", "ping"], check=False).stdout,
                       timeout, ["munged", "slurmctld"])

    def _start_slurmds(self, timeout: float) -> None:
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)])

        def nodes_idle() -> bool:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split("\n")
            states = dict(line.split() for line in out if line.strip())
            return all(states.get(n, "").rstrip("*") in ("idle", "mix", "alloc") for n in self.nodes)

        self._wait_for("both slurmd nodes to register idle", nodes_idle, timeout,
                       list(self.procs))

    def stop(self) -> None:
        """Cancel remaining jobs, then stop exactly the daemons started here (SIGTERM, then SIGKILL)."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            try:
                self.run(["scancel", "--full", "-u", "root"], check=False, timeout=15)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    q = self.run(["squeue", "-h", "-t", "running,completing,configuring", "-o", "%i"],
                                 check=False, timeout=15)
                    if q.returncode != 0 or not q.stdout.strip():
                        break
                    time.sleep(0.5)
            except (subprocess.SubprocessError, OSError):
                pass
        # slurmds first (they end their stepds' jobs), then the controller, munged last.
        order = [n for n in self.procs if n.startswith("slurmd-")] + ["slurmctld", "munged"]
        for name in order:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs.clear()
        if self.root is not None and not self.keep and self._root_arg is None:
            shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ clients
    def run(self, argv: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(argv, env=kw.pop("env", self.env), capture_output=True, text=True,
                              timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(map(str, argv))} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def sbatch(self, args: list[str], cwd: str | os.PathLike | None = None, env: dict | None = None) -> int:
        """Submits; returns the job id (`sbatch --parsable`)."""
        out = self.run(["sbatch", "--parsable", *map(str, args)], cwd=cwd, env=env or self.env).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job -o` of one job as a dict (array jobs: the first record)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if out.returncode != 0:
            return {}
        return parse_scontrol(out.stdout.splitlines()[0]) if out.stdout.strip() else {}

    def jobs(self, job_id: int | str) -> list[dict[str, str]]:
        """All records of `scontrol show job -o ID` (one per array task)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        return [parse_scontrol(line) for line in out.stdout.splitlines() if line.strip()]

    def state(self, job_id: int | str) -> str:
        return self.job(job_id).get("JobState", "")

    def wait(self, job_id: int | str, timeout: float = 300, states=TERMINAL_STATES,
             poll: float = 0.5) -> dict[str, str]:
        """Waits until every record of the job (all array tasks) is in one of `states`; returns the first."""
        deadline = time.monotonic() + timeout
        while True:
            recs = self.jobs(job_id)
            if recs and all(r.get("JobState") in states for r in recs):
                return recs[0]
            if time.monotonic() > deadline:
                raise SlurmError(f"job {job_id} not in {sorted(states)} after {timeout:.0f}s: "
                                 f"{[r.get('JobState') for r in recs]}\n{self.log_tail()}")
            time.sleep(poll)

    def wait_for(self, what: str, ok, timeout: float = 120, poll: float = 0.2):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = ok()
            if value:
                return value
            time.sleep(poll)
        raise SlurmError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.log_tail()}")

    def node_addr(self, node: str) -> str:
        return parse_scontrol(self.run(["scontrol", "show", "node", "-o", node]).stdout).get("NodeAddr", "")

    def log_tail(self, lines: int = 15) -> str:
        if self.root is None or not (self.root / "log").is_dir():
            return ""
        parts = []
        for f in sorted((self.root / "log").iterdir()):
            try:
                tail = f.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            if tail:
                parts.append(f"--- {f.name} ---\n" + "\n".join(tail))
        return "\n".join(parts)


def _main() -> None:
    with SlurmCluster(keep=True) as cluster:
        print(f"export SLURM_CONF={cluster.conf}")
        print(cluster.run(["sinfo", "-N"]).stdout)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    _main()
