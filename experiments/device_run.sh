#!/usr/bin/env bash
# One device call: GPU tests, then the GPU benchmarks; results under $OUT (default ./out).
# usage (device tool): bash experiments/device_run.sh [tests|bench|all]
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
what=${1:-all}
nvidia-smi -L; python3 -c "import cupy, numpy, mpi4py; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'mpi4py', mpi4py.__version__)"
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout 420 python3 -m pytest -q -x tests/test_gpu.py ${GPU_TESTS:-} 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  for n in ${NS:-1 2 4 8}; do
    timeout 300 mpirun -n $n python3 experiments/gpu_datapath.py --sizes ${SIZES:-64M,256M} --json "$OUT/gpu_datapath_n$n.json" 2>&1 | tee "$OUT/gpu_datapath_n$n.log" | tail -22
  done
fi
