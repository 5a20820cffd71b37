"""GPU executors: CUDA IPC rings, one-shot/two-shot, the device transport choice, the NCCL baseline."""
