# Shared by stage1.sbatch, stage2.sbatch and coma.sbatch (sourced, not run).
#
# Inputs (environment, all optional): LAUNCHER=srun|torchrun|deepspeed (default srun),
# GPUS_PER_NODE (default: what SLURM allocated, else 8), RUN_ROOT (default runs), PYTHON
# (default python), DS_MULTINODE (deepspeed's multi-node backend, default slurm).
# Provides: MASTER_ADDR, MASTER_PORT, NNODES, GPUS_PER_NODE, and `coma_launch SCRIPT ARGS...`,
# which runs SCRIPT on every GPU of the allocation with the chosen launcher, `coma_train RUN_DIR
# SCRIPT ARGS...`, the same plus checkpoint-and-requeue on SLURM's early warning (below), and
# `coma_log DIR`, which copies this job's output into DIR/slurm-JOBID.log as well.
#
# Checkpoint before the time limit or a preemption: the scripts ask for `--signal=B:USR1@300`
# (this shell gets SIGUSR1 5 minutes ahead); coma_train forwards it to the training ranks on
# every node (not to the launchers, which would die of it), every rank saves at the end of its
# step and the run exits, leaving RUN_DIR/STOPPED (pipeline/train.py); coma_train then requeues
# the job (COMA_REQUEUE=0: exit 4 instead), and the requeued job resumes with --train.resume=auto.

set -euo pipefail

REPO="${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
cd "$REPO"
LAUNCHER="${LAUNCHER:-srun}"
RUN_ROOT="${RUN_ROOT:-runs}"
PYTHON="${PYTHON:-python}"

# First node of the allocation hosts the rendezvous; scontrol expands gpu[01-04] notation.
NODES=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
NNODES="${SLURM_JOB_NUM_NODES:-${#NODES[@]}}"
export MASTER_ADDR="${MASTER_ADDR:-${NODES[0]}}"
# Derived from the job id so two jobs sharing a node never pick the same port.
export MASTER_PORT="${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-8}}}"
GPUS_PER_NODE="${GPUS_PER_NODE##*:}"   # "h100:8" -> "8"

# NCCL: fail fast instead of hanging on a dead peer; InfiniBand when present.
export NCCL_ASYNC_ERROR_HANDLING=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-8}}"
export TOKENIZERS_PARALLELISM=false

coma_log() {  # coma_log RUN_DIR: tee everything this script prints into the run directory
  mkdir -p "$1"
  exec > >(tee -a "$1/slurm-${SLURM_JOB_ID}.log") 2>&1
  echo "[coma] job ${SLURM_JOB_ID} on ${NNODES} node(s) x ${GPUS_PER_NODE} GPU(s): ${NODES[*]}; launcher ${LAUNCHER}; master ${MASTER_ADDR}:${MASTER_PORT}"
}

# SLURM's warning may also come between stages (during coma.sbatch's export): this shell only
# notes it then, and coma_stop_point requeues before the next stage would start.
COMA_STOP_REQUESTED=0
coma_note_stop() { COMA_STOP_REQUESTED=1; echo "[coma] SIGUSR1 from SLURM between stages"; }
trap coma_note_stop USR1

coma_requeue() {  # coma_requeue REASON: requeue this job (COMA_REQUEUE=0: exit 4 instead)
  echo "[coma] $1"
  if [ "${COMA_REQUEUE:-1}" = 1 ]; then
    echo "[coma] requeueing job ${SLURM_JOB_ID}; it continues where this one stopped"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  exit 4
}

coma_stop_point() {  # between stages: requeue now if SLURM warned meanwhile
  if [ "$COMA_STOP_REQUESTED" = 1 ]; then coma_requeue "time limit or preemption ahead: the next stage waits for the requeued job"; fi
}

coma_stop_ranks() {  # coma_stop_ranks SCRIPT: SIGUSR1 to this job's processes running SCRIPT, on every node
  COMA_STOP_REQUESTED=1
  echo "[coma] SIGUSR1 from SLURM (time limit or preemption ahead): the ranks checkpoint and stop"
  # "python [-u] SCRIPT ...": the ranks (and their loader workers, which ignore it), whichever
  # launcher started them; a launcher's own command line ("python -m ...") does not match.  Only
  # processes of this job (SLURM_JOB_ID in their environment): a node may run the user's other jobs.
  srun --overlap --nodes="$NNODES" --ntasks-per-node=1 bash -c \
    'for p in $(pgrep -f "$1"); do grep -qaz "^SLURM_JOB_ID=$2\$" "/proc/$p/environ" 2>/dev/null && kill -USR1 "$p"; done; true' \
    coma-stop "^[^ ]+ (-u )?$1( |\$)" "$SLURM_JOB_ID" || true
}

coma_train() {  # coma_train RUN_DIR SCRIPT ARGS...: coma_launch, checkpoint on SIGUSR1, requeue
  local run_dir="$1" script="$2" rc=0 pid
  shift
  coma_stop_point
  rm -f "$run_dir/STOPPED"  # only this launch's stop may requeue the job
  trap "coma_stop_ranks '$script'" USR1  # before the launch: SIGUSR1's default would end this shell
  coma_launch "$@" &
  pid=$!
  # `wait` returns early when a trapped signal arrives: wait again until the launcher is done.
  while true; do
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  trap coma_note_stop USR1
  if [ -f "$run_dir/STOPPED" ]; then
    coma_requeue "$(cat "$run_dir/STOPPED")"
  fi
  return "$rc"
}

coma_launch() {  # coma_launch SCRIPT ARGS...
  local script="$1"; shift
  case "$LAUNCHER" in
    srun)
      # One task per GPU; pipeline/dist.py reads SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS.
      srun --nodes="$NNODES" --ntasks-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1 \
        "$PYTHON" "$script" "$@"
      ;;
    torchrun)
      # One torchrun per node; each spawns GPUS_PER_NODE workers.
      srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE" \
        --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
        "$script" "$@"
      ;;
    deepspeed)
      # DeepSpeed's launcher wants a hostfile: one "host slots=N" line per node.
      local hostfile="$RUN_ROOT/.hostfile-${SLURM_JOB_ID}"
      mkdir -p "$RUN_ROOT"
      : > "$hostfile"
      for h in "${NODES[@]}"; do echo "$h slots=$GPUS_PER_NODE" >> "$hostfile"; done
      deepspeed --hostfile "$hostfile" --launcher "${DS_MULTINODE:-slurm}" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$script" "$@"
      ;;
    *)
      echo "[coma] LAUNCHER=$LAUNCHER is not one of srun, torchrun, deepspeed" >&2
      exit 2
      ;;
  esac
}
