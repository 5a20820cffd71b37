"""The benchmark room: one harness (check before timing, nccl-tests columns), its variants, the tuner."""
