#!/usr/bin/env bash
# The lab's GPU runs, each mode one device call of under 10 minutes; logs and JSON packed into
# $OUT/results.tgz (the device tool returns at most 8 files).
#   bash experiments/device_run.sh check   # correctness on the GPU: tests, kernel checks, async, leaks
#   bash experiments/device_run.sh bench   # the GPU benchmarks quoted in docs/
#   bash experiments/device_run.sh fp8     # FP8 kernels: bit-exactness, speed, the FP8 experiment
#   bash experiments/device_run.sh kernels # FP8 kernel speed (device time) + a quick IPC ring re-check
#   bash experiments/device_run.sh fp8kernels  # FP8 kernels: quick bit-exact sweep, speed table, GPU tests
#   bash experiments/device_run.sh multigpu    # several GPUs, one rank each: FP8/fp32 rings vs NCCL
#   bash experiments/device_run.sh final4      # several GPUs: kernels, launch cost, GPU tests, FP8 rings
#   bash experiments/device_run.sh verify1     # one GPU: full bit-exact sweep, GPU tests, leak check
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
RES=$(mktemp -d); trap 'tar czf "$OUT/results.tgz" -C "$RES" . ; cp "$RES/summary.txt" "$OUT/"' EXIT  # 2 files back
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
. "$(dirname "$0")/ringlab_path.sh"   # import ringlab from this checkout (not pip-installed there)
summary="$RES/summary.txt"; : > "$summary"
step() {  # step NAME SECONDS COMMAND...: run, log to NAME.log, record the exit status
  local name=$1 secs=$2; shift 2
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
nvidia-smi -L | tee -a "$summary"
case "${1:-check}" in
check)
  step gpu_tests 330 python3 -m pytest -q -x tests/test_gpu.py
  step kernels_check 150 python3 experiments/device_kernels_check.py
  step kernels_check_mpi 90 mpirun -n 4 python3 experiments/device_kernels_check.py --no-speed
  step fp8_pytest 150 python3 -m pytest -q tests/test_fp8.py tests/test_kernels_reduce.py
  step async_check 90 mpirun -n 4 python3 tests/mpi/async_device_check.py
  step leak_check 120 mpirun -n 4 python3 experiments/leak_check.py --device --json "$RES/leak_gpu.json"
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
    --label "H100, 8 ranks sharing one GPU" --json "$RES/sweep_gpu_shared_8ranks.json" --plot-prefix "$RES/bw_gpu_shared_8ranks"
  ;;
final)   # the last call of a session: FP8 on the GPU plus the benchmarks whose files were lost
  step kernels_check 140 python3 experiments/device_kernels_check.py
  step fp8_pytest 70 python3 -m pytest -q tests/test_fp8.py tests/test_kernels_reduce.py
  step fp8 100 mpirun -n 8 python3 experiments/fp8_compression.py --json "$RES/fp8_gpu.json"
  step datapath_n8 65 mpirun -n 8 python3 experiments/gpu_datapath.py --sizes 64M,256M --iters 20 --slices 1,4 \
    --staged-max 64M --json "$RES/gpu_n8.json"
  step small_n8 40 mpirun -n 8 python3 experiments/gpu_datapath.py --sizes 8,1K,8K,64K,256K,1M,16M --iters 30 \
    --variants ipc-shared,ipc,oneshot,twoshot,mpi-staged,staged,nccl --slices 1 --baseline ipc-shared --json "$RES/small_n8.json"
  step overlap 65 mpirun -n 8 python3 experiments/overlap.py --backend cupy --hidden 2048 --layers 16 --batch 8192 \
    --tp-m 8192 --tp-k 1024 --tp-n 4096 --iters 3 --json "$RES/overlap_gpu.json" --plot "$RES/overlap_gpu.png"
  step bw_vs_n 60 mpirun -n 8 python3 experiments/bandwidth_vs_n.py -b 1K -e 16M -f 16 --iters 10 --warmup 3 --backend cupy \
    --label "H100, ranks sharing one GPU" --json "$RES/sweep_gpu_shared_8ranks.json" --plot-prefix "$RES/bw_gpu_shared_8ranks"
  ;;
kernels)  # FP8 kernel speed (device time, queued launches) + a quick re-check of the IPC rings
  step kernels_check 240 python3 experiments/device_kernels_check.py --n 65539 --iters 10 --json "$RES/kernels_speed.json"
  step ipc_check 120 mpirun -n 4 python3 tests/mpi/gpu_check.py ipc-shared,ipc,oneshot,twoshot 0,2,1009,100003
  ;;
fp8ipc)   # the FP8 ring over IPC: bit-exact vs the NumPy path, then GPU collective speed
  step fp8_ipc_check 200 mpirun -n 4 python3 experiments/device_kernels_check.py --no-check --no-speed
  step fp8_speed 330 mpirun -n 8 python3 experiments/fp8_compression.py --backend cupy --no-accuracy --no-kernels \
    --sizes 64M,256M --iters 5 --warmup 2 --json "$RES/fp8_gpu_speed.json"
  ;;
fp8final)  # device-side tests of the final FP8 code: pytest on real kernels, FP8 IPC tests, leak check
  step fp8_gpu_tests 200 python3 -m pytest -q -x tests/test_gpu.py -k fp8
  step fp8_pytest 150 python3 -m pytest -q tests/test_fp8.py tests/test_kernels_reduce.py
  step leak_check 100 mpirun -n 4 python3 experiments/leak_check.py --device --iters 200 --json "$RES/leak_gpu.json"
  ;;
fp8kernels)  # FP8 kernels on one GPU: bit-exact sweep (hardware conversion) + speed table, then the GPU tests
  kernel_speed 330
  step fp8_pytest 100 python3 -m pytest -q tests/test_fp8.py tests/test_kernels_reduce.py
  step fp8_gpu_tests 120 python3 -m pytest -q -x tests/test_gpu.py -k fp8
  ;;
multigpu)  # one rank per GPU: kernels on GPU 0, FP8 all-reduce bit-exact across GPUs, FP8 and fp32 rings vs NCCL
  nvidia-smi topo -m > "$RES/topology.txt" 2>&1; cat "$RES/topology.txt"
  ng=$(nvidia-smi -L | wc -l); export RINGLAB_TIMEOUT=90
  kernel_speed 200
  step fp8_check_multigpu 120 mpirun -n "$ng" python3 experiments/device_kernels_check.py --no-check --no-speed
  step fp8_speed_multigpu 150 mpirun -n "$ng" python3 experiments/fp8_compression.py --backend cupy --no-accuracy \
    --no-kernels --sizes 64M,256M --iters 10 --warmup 3 --json "$RES/fp8_speed_${ng}gpu.json"
  step datapath_multigpu 90 mpirun -n "$ng" python3 experiments/gpu_datapath.py --sizes 64M,256M --iters 20 \
    --slices 1 --staged-max 64M --json "$RES/gpu_datapath_${ng}gpu.json"
  step reduce_pytest 60 python3 -m pytest -q tests/test_kernels_reduce.py
  ;;
final4)  # the session's last call on several GPUs: kernels (one GPU), host cost per launch, GPU tests, FP8 rings
  ng=$(nvidia-smi -L | wc -l); export RINGLAB_TIMEOUT=90
  kernel_speed 200
  step launch_overhead 60 python3 experiments/launch_overhead.py --json "$RES/launch_overhead.json"
  step gpu_pytest 100 python3 -m pytest -q tests/test_fp8.py tests/test_kernels_reduce.py
  step fp8_check_multigpu 120 mpirun -n "$ng" python3 experiments/device_kernels_check.py --no-check --no-speed
  step fp8_speed_multigpu 100 mpirun -n "$ng" python3 experiments/fp8_compression.py --backend cupy --no-accuracy \
    --no-kernels --sizes 64M,256M --iters 10 --warmup 3 --json "$RES/fp8_speed_${ng}gpu.json"
  step fp8_speed_2gpu 60 mpirun -n 2 python3 experiments/fp8_compression.py --backend cupy --no-accuracy \
    --no-kernels --sizes 64M,256M --iters 10 --warmup 3 --transports ipc --json "$RES/fp8_speed_2gpu.json"
  ;;
verify1)  # one GPU, after the last code change: the full bit-exact sweep, GPU tests, leak check
  step kernels_full 200 python3 experiments/device_kernels_check.py --n 4099 --no-speed
  step gpu_pytest 80 python3 -m pytest -q tests/test_fp8.py tests/test_kernels_reduce.py
  step gpu_fp8_launch 180 python3 -m pytest -q -x tests/test_gpu.py -k "fp8 or numba_launch"
  step leak_check 100 mpirun -n 4 python3 experiments/leak_check.py --device --iters 200 --json "$RES/leak_gpu.json"
  ;;
fp8)
  step kernels_check 150 python3 experiments/device_kernels_check.py
  step kernels_check_mpi 90 mpirun -n 4 python3 experiments/device_kernels_check.py --no-speed
  step fp8_pytest 120 python3 -m pytest -q tests/test_fp8.py tests/test_kernels_reduce.py
  step fp8 150 mpirun -n 8 python3 experiments/fp8_compression.py --json "$RES/fp8_gpu.json"
  ;;
esac
cat "$summary"
