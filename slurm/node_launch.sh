#!/bin/bash
# One node's launcher, run by slurm/pretrain.sbatch as the single srun task on each node:
#
#   srun ... slurm/node_launch.sh python -m torch.distributed.run --nnodes=N ... pretrain/pretrain_nvium.py ...
#
# It starts the given torchrun command in the background and forwards preemption signals to the
# trainer worker processes (the children of torchrun):
#   * USR1 (Slurm's pre-timeout signal, forwarded by the batch script through srun) and TERM
#     (scancel, time limit, preemption) make each worker finish its step, save a checkpoint and exit 0.
#   * torchrun itself is started with USR1 and TERM ignored (and TORCHELASTIC_SIGNALS_TO_HANDLE without
#     SIGTERM), because torchrun does not handle USR1 (Python's default action kills it) and treats TERM
#     as "kill the workers and fail". Slurm delivers step signals to every process of the step, so the
#     workers usually get the signal directly as well; the trainer's handler only sets a flag, so the
#     extra copies are harmless. The trainer installs its own handlers, replacing the inherited SIG_IGN.
#   * A worker still importing when the first signal arrives misses it (it ignores USR1 until its
#     handler is installed), so the signal is re-sent every NVIUM_RESIGNAL_SECS (default 5) until
#     torchrun exits.
# The exit status is torchrun's.
#
# Environment: NVIUM_NODE_LOG_DIR (append all output to DIR/<job name>-<job id>-<node>.log),
# NVIUM_VENV (a virtualenv to activate first), NVIUM_RESIGNAL_SECS.
set -u

node=${SLURMD_NODENAME:-$(hostname -s)}
if [[ -n "${NVIUM_NODE_LOG_DIR:-}" ]]; then
  # One log per job and node (Slurm node name, which srun's %N does not give when nodes share a host).
  exec >>"$NVIUM_NODE_LOG_DIR/${SLURM_JOB_NAME:-nvium}-${SLURM_JOB_ID:-0}-$node.log" 2>&1
fi
log() { echo "[node_launch $node $(date +%H:%M:%S)] $*" >&2; }

if [[ $# -eq 0 ]]; then
  echo "usage: node_launch.sh TORCHRUN_COMMAND..." >&2
  exit 2
fi
if [[ -n "${NVIUM_VENV:-}" ]]; then
  # shellcheck disable=SC1091
  . "$NVIUM_VENV/bin/activate"
fi

# Direct children of a process (the torchrun workers), without needing procps in a container.
children_of() {
  if command -v pgrep >/dev/null 2>&1; then
    pgrep -P "$1"
    return 0
  fi
  local status
  for status in /proc/[0-9]*/status; do
    if grep -qx "PPid:[[:space:]]*$1" "$status" 2>/dev/null; then
      status=${status#/proc/}
      echo "${status%/status}"
    fi
  done
}

stop_signal=""
launcher_pid=""
send_stop() {
  local pid sent=""
  [[ -n "$launcher_pid" ]] || return 0
  for pid in $(children_of "$launcher_pid"); do
    kill -s "$stop_signal" "$pid" 2>/dev/null && sent+=" $pid"
  done
  log "sent SIG$stop_signal to trainer workers:${sent:- (none yet)}"
}
on_signal() {
  log "received SIG$1; asking the trainer to checkpoint and exit"
  stop_signal=$1
  send_stop
}
trap 'on_signal USR1' USR1   # before torchrun starts: an untrapped USR1 would kill this shell
trap 'on_signal TERM' TERM

(
  trap '' USR1 TERM
  export TORCHELASTIC_SIGNALS_TO_HANDLE=${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGINT,SIGHUP,SIGQUIT}
  exec "$@"
) &
launcher_pid=$!
log "started (pid $launcher_pid): $*"

resignal=${NVIUM_RESIGNAL_SECS:-5}
while kill -0 "$launcher_pid" 2>/dev/null; do
  if [[ -n "$stop_signal" ]]; then
    sleep "$resignal" &
    timer=$!
    wait -n "$launcher_pid" "$timer"
    kill "$timer" 2>/dev/null
    wait "$timer" 2>/dev/null
    if kill -0 "$launcher_pid" 2>/dev/null; then
      send_stop
    fi
  else
    wait "$launcher_pid"   # returns early when a trapped signal arrives
  fi
done
wait "$launcher_pid"
rc=$?
log "torchrun exited with status $rc"
exit "$rc"
