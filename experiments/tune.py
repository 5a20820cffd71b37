"""Measure the host all-reduce algorithms on this machine and write the tuning file ``algo="auto"`` reads.

    mpirun -n 8 python experiments/tune.py                 # same as: mpirun -n 8 python -m ringlab.bench.tuner
    mpirun -n 8 python experiments/tune.py --sizes 8,4K,64K,1M,8M --iters 20 --out tuning.json
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ringlab.bench.tuner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
