#!/usr/bin/env bash
# The device ring's GPU runs (docs/device_ring.md), one device call each; logs and JSON under $OUT.
#   bash experiments/device_ring_run.sh check   # MPS on: bit-exact vs the host ring (N=2, 8), graphs, stalled peer
#   bash experiments/device_ring_run.sh bench   # 8 ranks on one GPU: MPS on, stalled peer, then MPS off (fallback)
# Until it becomes a mode of experiments/device_run.sh (that file was frozen during the layout change).
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export RINGLAB_TIMEOUT=${RINGLAB_TIMEOUT:-20}      # a hang ends in CollectiveTimeout, not the device call's limit
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation --root-user-action=ignore . 2>&1 | tail -3
mps_start() {   # the MPS control daemon, pipe and log directories under /tmp (README: "Ranks sharing one GPU")
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"; nvidia-cuda-mps-control -d; sleep 1
}
mps_stop() { echo quit | nvidia-cuda-mps-control; sleep 2; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; }
trap 'echo quit | CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe nvidia-cuda-mps-control 2>/dev/null' EXIT
step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, print the exit status and the log's end
  local name=$1 secs=$2; shift 2
  echo "=== $name"; timeout "$secs" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?"
  grep -v '^\s*\^' "$OUT/$name.log" | tail -n "${TAIL:-6}"; sleep 2
}
BENCH="mpirun -n 8 python3 experiments/device_ring_bench.py --iters 10"
STALL="env RINGLAB_ABORT_ON_TIMEOUT=0 RINGLAB_TIMEOUT=2 mpirun -n 3 python3 tests/mpi/device_ring_check.py --stall --mode per-rank"
case "${1:-check}" in
check)
  mps_start
  step check_n2 90 mpirun -n 2 python3 tests/mpi/device_ring_check.py
  step check_n8 120 mpirun -n 8 python3 tests/mpi/device_ring_check.py
  step stall 60 $STALL
  mps_stop
  ;;
bench)
  mps_start
  TAIL=30 step bench_mps 150 $BENCH --json "$OUT/h200_n8_mps.json"
  step stall_mps 40 $STALL
  mps_stop
  TAIL=30 step bench_nomps 120 $BENCH --variants ipc-shared,oneshot,twoshot --large-variants ipc-shared \
    --json "$OUT/h200_n8_nomps.json"
  ;;
*) echo "unknown mode $1 (check, bench)"; exit 2 ;;
esac
