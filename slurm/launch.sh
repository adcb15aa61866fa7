# shellcheck shell=bash
# Shared body of the slurm/train_*.sh templates; they set RECIPE and source this file. Arguments are
# recipe overrides (dotted.key=value) passed through to harness/train.py.
#
# Flow: site settings -> rendezvous address and port -> pre-flight (recipe check, nodes join, all-reduce)
# -> training under srun in the background (so the USR1 trap can run) -> requeue on exit code 75.
# Variables (all optional): HARNESS_DIR, HARNESS_SITE, PYTHON, LAUNCH_MODE (torchrun | srun),
# NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT, RDZV_BACKEND, PREFLIGHT (1 | 0), MAX_REQUEUES, LOG_DIR.
# See slurm/README.md.
set -euo pipefail

log() { echo "[$(date '+%F %T')] launch: $*"; }
die() { echo "[$(date '+%F %T')] launch: error: $*" >&2; exit 2; }

# Signals first: the default action of USR1 would kill this shell. While ranks run, forward the
# signal to them (scancel --signal reaches every task of every step, on every node); before that,
# remember it and requeue instead of starting.
STOP_REQUESTED=0
STEP_PID=
# shellcheck disable=SC2317,SC2329  # called by the traps below
on_signal() {
  STOP_REQUESTED=1
  if [ -n "$STEP_PID" ] && kill -0 "$STEP_PID" 2>/dev/null; then
    log "$1 received: asking every rank to checkpoint at the next step and exit"
    scancel --signal=USR1 "$SLURM_JOB_ID" || log "scancel failed; the job will end at its time limit"
  else
    log "$1 received before training started"
  fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

: "${SLURM_JOB_ID:?run this through sbatch (or srun inside an allocation)}"
: "${RECIPE:?the template must set RECIPE}"
HARNESS_DIR=${HARNESS_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
[ -f "$HARNESS_DIR/harness/train.py" ] || die "no harness/train.py under HARNESS_DIR=$HARNESS_DIR: submit from the repository root or set HARNESS_DIR"
cd "$HARNESS_DIR"
LOG_DIR=${LOG_DIR:-logs}  # pre-flight output and exit-code files; keep it beside sbatch's --output
mkdir -p "$LOG_DIR"
HARNESS_SITE=${HARNESS_SITE:-default}
# a site is a file name in slurm/env/, never a path: a '../' would source any script on the machine
[[ $HARNESS_SITE =~ ^[A-Za-z0-9_.-]+$ && $HARNESS_SITE != *..* ]] || die "HARNESS_SITE=$HARNESS_SITE is not a site name; use the name of a file in slurm/env/ (letters, digits, . _ -), without .sh"
[ -f "slurm/env/$HARNESS_SITE.sh" ] || die "no site file slurm/env/$HARNESS_SITE.sh (HARNESS_SITE=$HARNESS_SITE)"
# shellcheck source=slurm/env/default.sh
source "slurm/env/$HARNESS_SITE.sh"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=$PWD/.venv/bin/python; else PYTHON=$(command -v python3); fi
fi

# --- geometry: every count from Slurm at run time ---------------------------------------------------
LAUNCH_MODE=${LAUNCH_MODE:-torchrun}
GPUS_ON_NODE=$(nvidia-smi -L 2>/dev/null | wc -l || true)
if [ "$LAUNCH_MODE" = torchrun ]; then
  # one srun task per node, each a torchrun agent for the node's GPUs (CPU: NPROC_PER_NODE, default 1)
  NNODES=$SLURM_NTASKS
  NPROC_PER_NODE=${NPROC_PER_NODE:-$(( GPUS_ON_NODE > 0 ? GPUS_ON_NODE : 1 ))}
  [ "$NNODES" = "${SLURM_NNODES:-1}" ] || log "note: $NNODES launcher tasks on ${SLURM_NNODES:-1} node(s); expected one task per node (--ntasks-per-node=1)"
elif [ "$LAUNCH_MODE" = srun ]; then
  # one srun task per GPU; harness/distributed.py reads SLURM_PROCID / SLURM_LOCALID / SLURM_STEP_NUM_TASKS
  NNODES=${SLURM_NNODES:-1}
  NPROC_PER_NODE=1
else
  die "LAUNCH_MODE=$LAUNCH_MODE: use torchrun or srun"
fi
if [ "$LAUNCH_MODE" = torchrun ]; then WORLD_SIZE=$(( NNODES * NPROC_PER_NODE )); else WORLD_SIZE=$SLURM_NTASKS; fi

# --- rendezvous: the first node's routable address, a port derived from the job id ----------------
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
if [ -z "${MASTER_ADDR:-}" ]; then
  MASTER_ADDR=$(getent ahostsv4 "$HEAD_NODE" | awk 'NR == 1 {print $1}')
  if [ "${SLURM_NNODES:-1}" -gt 1 ] && { [ -z "$MASTER_ADDR" ] || [[ $MASTER_ADDR == 127.* ]]; }; then
    # /etc/hosts maps the name to loopback (Debian's 127.0.1.1): other nodes could not reach it.
    # This batch shell runs on the head node, so ask the kernel for its first routable address.
    MASTER_ADDR=$(hostname -I | awk '{print $1}')
  fi
  [ -n "$MASTER_ADDR" ] || die "cannot resolve the head node $HEAD_NODE: set MASTER_ADDR"
fi
MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
export MASTER_ADDR MASTER_PORT

EXIT_FILE=$(realpath -m "$LOG_DIR/exit-$SLURM_JOB_ID")
rm -f "$EXIT_FILE"
export HARNESS_EXIT_CODE_FILE=$EXIT_FILE
export SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}

log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) start $(date -Is), restart $SLURM_RESTART_COUNT, on $SLURM_JOB_NODELIST"
log "recipe $RECIPE, overrides: ${*:-none}"
log "$LAUNCH_MODE: $NNODES node(s) x $NPROC_PER_NODE process(es) = world size $WORLD_SIZE; rendezvous $MASTER_ADDR:$MASTER_PORT ($HEAD_NODE)"
log "site $HARNESS_SITE; python $PYTHON; harness $(git rev-parse --short HEAD 2>/dev/null || echo '(not a git checkout)')"
"$PYTHON" -c 'import sys, torch; print(f"[versions] python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}, gpus {torch.cuda.device_count()}")'

# --- pre-flight: nothing is loaded before these pass -----------------------------------------------
if [ "${PREFLIGHT:-1}" = 1 ]; then
  # 1. the recipe and overrides, validated for this world size (no model is loaded)
  WORLD_SIZE=$WORLD_SIZE RANK=0 LOCAL_RANK=0 "$PYTHON" harness/train.py --config "$RECIPE" "$@" --dry-run > "$LOG_DIR/resolved-$SLURM_JOB_ID.txt" \
    || die "the recipe does not validate for world size $WORLD_SIZE (see above); nothing was started"
  log "recipe validated for world size $WORLD_SIZE: $LOG_DIR/resolved-$SLURM_JOB_ID.txt"
  # 2. every node reaches the head node (names the ones that do not)
  # one task per launcher task (torchrun: per node) or per node (srun mode); the job's layout places them
  if [ "$LAUNCH_MODE" = torchrun ]; then JOIN_LAYOUT=(--ntasks="$NNODES"); else JOIN_LAYOUT=(--ntasks="$NNODES" --ntasks-per-node=1); fi
  srun "${JOIN_LAYOUT[@]}" --kill-on-bad-exit=1 \
    "$PYTHON" -m harness.preflight join --nodes "$NNODES" --addr "$MASTER_ADDR" --port "$(( MASTER_PORT + 1 ))" \
    --hosts "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | tr '\n' ' ')" || die "pre-flight: not every node joined"
fi

# --- launch --------------------------------------------------------------------------------------
run_ranks() {  # run_ranks SCRIPT ARGS...: start SCRIPT on every rank, in the background; sets STEP_PID
  if [ "$LAUNCH_MODE" = torchrun ]; then
    # Single quotes: $SLURM_PROCID expands in each task, so every node gets its own rank. The agent
    # ignores USR1 (a torchrun agent would die of it); its workers install their own handler.
    # Left to itself, torchrun finds both of these from the node's hostname, which fails where the
    # name maps to 127.0.1.1 (Debian's default) or other nodes cannot resolve it:
    # - is_host: task 0 runs on the head node and hosts the rendezvous store (otherwise no agent may
    #   host it, and all of them time out);
    # - local_addr: the address the workers' store is reached at, the one this node reaches the head
    #   node from (a UDP connect sends nothing; it only picks the route).
    # shellcheck disable=SC2016
    srun --ntasks="$NNODES" --kill-on-bad-exit=1 --wait=60 --unbuffered bash -c \
      'trap "" USR1; is_host=false; [ "$SLURM_PROCID" != 0 ] || is_host=true
       local_addr=$("$0" -c "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect((sys.argv[1], 9)); print(s.getsockname()[0])" "${3%:*}")
       exec "$0" -u -m torch.distributed.run --nnodes="$1" --nproc_per_node="$2" --node_rank="$SLURM_PROCID" \
         --rdzv_backend="${RDZV_BACKEND:-c10d}" --rdzv_endpoint="$3" --rdzv_id="$SLURM_JOB_ID-$4" --rdzv_conf="is_host=$is_host" \
         --local_addr="$local_addr" --max_restarts=0 "${@:5}"' \
      "$PYTHON" "$NNODES" "$NPROC_PER_NODE" "$MASTER_ADDR:$MASTER_PORT" "$RANDOM" "$@" &
  else
    srun --kill-on-bad-exit=1 --wait=60 --unbuffered "$PYTHON" -u "$@" &
  fi
  STEP_PID=$!
}

wait_step() {  # wait for STEP_PID through trapped signals; sets STEP_RC
  STEP_RC=0
  while true; do
    wait "$STEP_PID" && STEP_RC=0 || STEP_RC=$?
    kill -0 "$STEP_PID" 2>/dev/null || break  # still running: the wait was cut short by a trap
  done
}

if [ "${PREFLIGHT:-1}" = 1 ]; then
  # 3. all ranks, under the real launcher: process group up, all-reduce correct
  run_ranks harness/preflight.py allreduce
  wait_step
  [ "$STEP_RC" = 0 ] || die "pre-flight all-reduce failed (exit $STEP_RC); see the ranks' errors above"
fi

requeue() {
  if [ "$SLURM_RESTART_COUNT" -lt "${MAX_REQUEUES:-20}" ]; then
    log "requeueing job $SLURM_JOB_ID (restart $(( SLURM_RESTART_COUNT + 1 ))): $1"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  log "MAX_REQUEUES=${MAX_REQUEUES:-20} reached: not requeueing; resubmit to continue (resume is automatic)"
}
[ "$STOP_REQUESTED" = 0 ] || requeue "stop signal before training started"

run_ranks harness/train.py --config "$RECIPE" "$@"
wait_step
# torchrun reports any worker failure as 1: the harness's own exit code is in the exit file
RC=$STEP_RC
if [ -s "$EXIT_FILE" ]; then RC=$(tr -d '[:space:]' < "$EXIT_FILE"); fi
log "training exited $RC (srun $STEP_RC) at $(date -Is)"

[ "$RC" != 75 ] || requeue "the ranks saved a checkpoint on a stop signal; the next run resumes from it"
exit "$RC"
