#!/usr/bin/env bash
# The lab's GPU runs: each mode is one device call of under 10 minutes, named by its purpose; logs and JSON
# are packed into $OUT/results.tgz (the device tool returns at most 8 files).
#   ONLY="step names" bash experiments/device_run.sh MODE   # run only those steps of a mode
#   bash experiments/device_run.sh check     # correctness on one GPU: GPU tests, bit-exact kernel sweep, FP8 over IPC, async, leaks
#   bash experiments/device_run.sh check-ipc # the IPC executors only: every transport, one-/two-shot, FP8 over IPC, leaks
#   bash experiments/device_run.sh bench     # one GPU, ranks sharing it: the data-path, small-message, FP8, overlap, sweep benchmarks
#   bash experiments/device_run.sh kernels   # kernel speed (device time vs a device copy) and host cost per launch
#   bash experiments/device_run.sh multigpu  # one rank per GPU: FP8 bit-exact across GPUs, FP8 and fp32 rings vs NCCL
#   bash experiments/device_run.sh device-ring  # one GPU, 8 ranks, MPS on: the persistent-kernel ring's checks and bench,
#                                                 torch streams and torch.cuda.graph through the public API
#   bash experiments/device_run.sh device-overlap    # the overlap experiment over the device ring (MPS on)
#   bash experiments/device_run.sh device-nomps      # the device ring's no-MPS fallback beside today's paths
#   bash experiments/device_run.sh device-small      # one-shot / two-shot persistent kernels: checks, latency, auto
#   bash experiments/device_run.sh device-fp8        # FP8 device ring and fp8-direct: checks, speed vs fp32 ring;
#                                                      the public API's device routes bit for bit
#                                                      (CHECK_ARGS: more check arguments, e.g. --algos fp8-direct)
#   bash experiments/device_run.sh device-fp8-sweep  # the FP8 kernels' launch shapes / tiles (each checked, then timed)
#   bash experiments/device_run.sh device-fp8-nomps  # the FP8 paths without MPS (fallback / time-sliced rows)
#   bash experiments/device_run.sh device-fp8-profile  # all ranks in one launch (no MPS): checked, timed, and one
#                                                        call of each path under Nsight Compute (PATHS, SIZE)
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
RES=$(mktemp -d); trap 'tar czf "$OUT/results.tgz" -C "$RES" . ; cp "$RES/summary.txt" "$OUT/"' EXIT  # 2 files back
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
. "$(dirname "$0")/ringlab_path.sh"   # import ringlab from this checkout (not pip-installed there)
summary="$RES/summary.txt"; : > "$summary"
step() {  # step NAME SECONDS COMMAND...: run, log to NAME.log, record the exit status ($ONLY: names to run)
  local name=$1 secs=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  local t0=$SECONDS
  timeout "$secs" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$summary"
  tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null   # after every step: a killed run still returns its logs
  tail -n "${TAIL:-6}" "$RES/$name.log"
}
kernel_speed() {  # kernel_speed SECONDS: quick bit-exact sweep, then the kernel speed table on GPU 0
  step kernels_check "$1" python3 experiments/device_kernels_check.py --quick --n 65539 --iters 10 \
    --json "$RES/kernels_speed_gpu.json"
}
mps_start() {  # MPS control daemon, pipe and log directories under /tmp (README: ranks sharing one GPU)
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"; nvidia-cuda-mps-control -d; sleep 1
}
mps_stop() { echo quit | nvidia-cuda-mps-control; sleep 2; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; }
nvidia-smi -L | tee -a "$summary"
case "${1:-check}" in
check)
  step gpu_tests 330 python3 -m pytest -q -x tests/test_gpu.py
  step kernels_full 200 python3 experiments/device_kernels_check.py --n 4099 --no-speed
  step fp8_ipc_check 200 mpirun -n 4 python3 experiments/device_kernels_check.py --no-check --no-speed
  step kernels_check_mpi 90 mpirun -n 4 python3 experiments/device_kernels_check.py --no-speed
  step fp8_pytest 150 python3 -m pytest -q tests/test_fp8.py tests/test_kernels_reduce.py
  step async_check 90 mpirun -n 4 python3 tests/mpi/async_device_check.py
  step leak_check 120 mpirun -n 4 python3 experiments/leak_check.py --device --json "$RES/leak_gpu.json"
  ;;
check-ipc)  # the host-driven IPC executors after a refactor: every transport and one-/two-shot, FP8 over IPC, leaks
  export RINGLAB_TIMEOUT=60
  step ipc_check 150 mpirun -n 4 python3 tests/mpi/gpu_check.py ipc-shared,ipc,ipc:4,ipc-host,oneshot,twoshot,staged \
    0,2,1009,100003
  step fp8_ipc_check 150 mpirun -n 4 python3 experiments/device_kernels_check.py --no-check --no-speed
  step leak_check 120 mpirun -n 4 python3 experiments/leak_check.py --device --iters 300 --json "$RES/leak_gpu.json"
  ;;
bench)
  step oneshot_check 60 mpirun -n 3 python3 tests/mpi/gpu_check.py oneshot,twoshot 0,2,1009,100003
  for n in 8 4 2; do
    step datapath_n$n 90 mpirun -n $n python3 experiments/gpu_datapath.py --sizes 64M,256M --iters 20 --slices 1,4 \
      --staged-max 256M --json "$RES/gpu_n$n.json"
  done
  step datapath_n1 45 mpirun -n 1 python3 experiments/gpu_datapath.py --sizes 64M --iters 20 --slices 1 --json "$RES/gpu_n1.json"
  step small_n8 90 mpirun -n 8 python3 experiments/gpu_datapath.py --sizes 8,1K,8K,64K,256K,1M,16M --iters 30 \
    --variants ipc-shared,ipc,oneshot,twoshot,mpi-staged,staged,nccl --slices 1 --baseline ipc-shared --json "$RES/small_n8.json"
  step ring_main 60 mpirun -n 8 python3 experiments/ring.py --sizes 1M,64M --iters 10
  step overlap 120 mpirun -n 8 python3 experiments/overlap.py --backend cupy --hidden 2048 --layers 16 --batch 8192 \
    --tp-m 8192 --tp-k 1024 --tp-n 4096 --iters 5 --json "$RES/overlap_gpu.json" --plot "$RES/overlap_gpu.png"
  step bw_vs_n 120 mpirun -n 8 python3 experiments/bandwidth_vs_n.py -b 1K -e 64M -f 8 --iters 10 --warmup 3 --backend cupy \
    --label "8 ranks sharing one GPU" --json "$RES/sweep_gpu_shared_8ranks.json" --plot-prefix "$RES/bw_gpu_shared_8ranks"
  step fp8_speed 330 mpirun -n 8 python3 experiments/fp8_compression.py --backend cupy --no-accuracy --no-kernels \
    --sizes 64M,256M --iters 5 --warmup 2 --json "$RES/fp8_gpu_speed.json"
  ;;
kernels)  # kernel speed (device time, queued launches) and what one launch costs the host
  kernel_speed 330
  step launch_overhead 60 python3 experiments/launch_overhead.py --json "$RES/launch_overhead.json"
  ;;
device-ring)  # the persistent-kernel ring (docs/device_ring.md): bit-exact checks, stalled peer, benchmarks
  stall="env RINGLAB_ABORT_ON_TIMEOUT=0 RINGLAB_TIMEOUT=2 mpirun -n 3 python3 tests/mpi/device_ring_check.py --stall --mode per-rank"
  bench="env RINGLAB_TIMEOUT=20 mpirun -n 8 python3 experiments/device_ring_bench.py --iters 10"
  mps_start
  step device_ring_check_n2 90 mpirun -n 2 python3 tests/mpi/device_ring_check.py
  step device_ring_check_n8 120 mpirun -n 8 python3 tests/mpi/device_ring_check.py
  step device_ring_stall 60 $stall
  step torch_check_n8 200 env RINGLAB_TIMEOUT=60 mpirun -n 8 python3 tests/mpi/device_torch_check.py
  step torch_check_n2 150 env RINGLAB_TIMEOUT=60 mpirun -n 2 python3 tests/mpi/device_torch_check.py
  step device_ring_stall_staged 60 $stall --stall-count 4096
  step device_ring_mps 240 env DEVICE_RING_PROFILE=1 $bench --json "$RES/h200_n8_mps.json"
  mps_stop
  ;;
device-small)  # one-shot / two-shot persistent kernels (docs/device_small.md): checks, stalled peer, latency with auto
  mps_start
  step small_check_n8 240 env RINGLAB_TIMEOUT=60 mpirun -n 8 python3 tests/mpi/device_small_check.py
  step small_stall 60 env RINGLAB_ABORT_ON_TIMEOUT=0 RINGLAB_TIMEOUT=2 mpirun -n 3 python3 tests/mpi/device_small_check.py \
    --stall --mode per-rank
  step small_latency 200 env RINGLAB_TIMEOUT=20 mpirun -n 8 python3 experiments/device_latency_bench.py \
    --json "$RES/h200_n8_latency_mps.json" --write-tuning "$RES/tuning_h200_n8.json"
  mps_stop
  ;;
device-fp8)  # the FP8 device ring and fp8-direct (docs/fp8.md): bit-exact checks, stalled peer, speed vs the fp32 ring
  mps_start
  step fp8_check_n8 "${CHECK_S:-420}" env RINGLAB_TIMEOUT=60 mpirun -n 8 python3 tests/mpi/device_fp8_check.py ${CHECK_ARGS:-}
  step fp8_stall 120 env RINGLAB_ABORT_ON_TIMEOUT=0 RINGLAB_TIMEOUT=2 mpirun -n 3 python3 tests/mpi/device_fp8_check.py \
    --stall --mode per-rank
  step fp8_bench 200 env RINGLAB_TIMEOUT=20 mpirun -n 8 python3 experiments/device_fp8_bench.py \
    --json "$RES/h200_n8_fp8_mps.json"
  step api_check 150 env RINGLAB_TIMEOUT=60 mpirun -n 8 python3 tests/mpi/device_api_check.py
  mps_stop
  ;;
device-fp8-profile)  # experiments/device_fp8_onelaunch.py: checks and times, then `ncu --set full` of one call per path
  step onelaunch 240 python3 experiments/device_fp8_onelaunch.py --sizes 64M,256M --json "$RES/h200_onelaunch.json"
  for p in ${PATHS:-fp32-ring fp8-ring fp8-direct}; do
    step "ncu_$p" "${NCU_S:-150}" ncu --set full -k regex:^kernel --launch-skip 2 --launch-count 1 -f -o "$RES/prof_$p" \
      python3 experiments/device_fp8_onelaunch.py --paths "$p" --sizes "${SIZE:-64M}" --rounds 1 --calls 1
    if [ -f "$RES/prof_$p.ncu-rep" ]; then
      ncu --import "$RES/prof_$p.ncu-rep" --page details > "$RES/prof_$p.details.txt" 2>&1
      ncu --import "$RES/prof_$p.ncu-rep" --page source --csv --print-source sass > "$RES/prof_$p.sass.csv" 2>&1
      grep -E "Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Issue Slots Busy|Stall|Achieved Occupancy|Registers Per|Local" \
        "$RES/prof_$p.details.txt" | head -40
    fi
  done
  ;;
device-fp8-sweep)  # FP8 launch shapes THREADSxREGS[@BLOCKS_PER_SM][:TILES:FWD_TILES|:wSTEPS][sKB][gG][kK][pD] (FP32_SHAPES: fp32 rows;
  # SWEEP_ARGS: more device_fp8_bench.py arguments, e.g. --block 256)
  mps_start
  step fp8_check_quick 300 env RINGLAB_TIMEOUT=60 mpirun -n 8 python3 tests/mpi/device_fp8_check.py --quick ${CHECK_ARGS:-}
  step fp8_sweep "${SWEEP_S:-300}" env RINGLAB_TIMEOUT=20 mpirun -n 8 python3 experiments/device_fp8_bench.py --rounds 5 \
    --shapes "${SHAPES:-512x128:0:1,512x128:1:4,512x128:2:4,1024x64:1:4}" --fp32-shapes "${FP32_SHAPES:-}" \
    --json "$RES/h200_n8_fp8_sweep.json" ${SWEEP_ARGS:-}
  mps_stop
  ;;
device-fp8-nomps)  # no MPS: the FP8 ring's host-driven fallback and fp8-direct time-sliced, beside the fp32 fallback
  step fp8_bench_nomps "${BENCH_S:-200}" env RINGLAB_TIMEOUT=60 mpirun -n 8 python3 experiments/device_fp8_bench.py \
    --rounds "${ROUNDS:-3}" --trace-calls 0 --json "$RES/h200_n8_fp8_nomps.json"
  ;;
device-overlap)  # the overlap experiment over the device ring, MPS on
  mps_start
  step overlap_device 200 env RINGLAB_TRANSPORT=device mpirun -n 8 python3 experiments/overlap.py --backend cupy \
    --hidden 2048 --layers 16 --batch 8192 --tp-m 8192 --tp-k 1024 --tp-n 4096 --iters 3 \
    --json "$RES/overlap_gpu_device_mps.json" --plot "$RES/overlap_gpu_device_mps.png"
  mps_stop
  ;;
device-nomps)  # the device ring without MPS: the single-context fallback beside today's paths
  step device_ring_nomps 150 env RINGLAB_TIMEOUT=20 mpirun -n 8 python3 experiments/device_ring_bench.py --iters 10 \
    --variants ipc-shared,oneshot,twoshot --large-variants ipc-shared --shapes "" --json "$RES/h200_n8_nomps.json"
  ;;
multigpu)  # one rank per GPU: FP8 all-reduce bit-exact across GPUs, FP8 and fp32 rings vs NCCL
  nvidia-smi topo -m > "$RES/topology.txt" 2>&1; cat "$RES/topology.txt"
  ng=$(nvidia-smi -L | wc -l); export RINGLAB_TIMEOUT=90
  step fp8_check_multigpu 120 mpirun -n "$ng" python3 experiments/device_kernels_check.py --no-check --no-speed
  step fp8_speed_multigpu 150 mpirun -n "$ng" python3 experiments/fp8_compression.py --backend cupy --no-accuracy \
    --no-kernels --sizes 64M,256M --iters 10 --warmup 3 --json "$RES/fp8_speed_${ng}gpu.json"
  step datapath_multigpu 90 mpirun -n "$ng" python3 experiments/gpu_datapath.py --sizes 64M,256M --iters 20 \
    --slices 1 --staged-max 64M --json "$RES/gpu_datapath_${ng}gpu.json"
  ;;
*)
  echo "device_run.sh: unknown mode ${1}; modes: check, check-ipc, bench, kernels, multigpu, device-ring, device-overlap, device-nomps, device-small, device-fp8, device-fp8-sweep, device-fp8-nomps, device-fp8-profile" >&2; exit 2
  ;;
esac
cat "$summary"
