#!/usr/bin/env bash
# CI stage: the argument-mismatch and fault tests again under Open MPI: Debian's Open MPI and Debian's
# mpi4py (python3-mpi4py, compiled against that Open MPI) seen from a second venv, .venv-openmpi, made with
# Debian's python3 and --system-site-packages. MPICH tolerates some erroneous MPI that Open MPI rejects.
# (Building mpi4py from source instead took over 20 minutes on the 2-core CI machine under load.)
set -uo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
if ! /usr/bin/python3 -c "from mpi4py import MPI; assert 'Open MPI' in MPI.Get_library_version()" 2>/dev/null \
   || ! /usr/bin/mpirun --version 2>/dev/null | grep -q "Open MPI"; then
  echo "CI(openmpi): installing Debian's Open MPI and mpi4py"
  { apt-get update -q && apt-get install -y -q openmpi-bin libopenmpi-dev python3-mpi4py python3-venv; } >/dev/null \
    || { echo "CI(openmpi): apt-get failed" >&2; exit 1; }
fi
[ -x .venv-openmpi/bin/python ] || /usr/bin/python3 -m venv --system-site-packages .venv-openmpi || exit 1
. .venv-openmpi/bin/activate
# ringlab without its mpich dependency (--no-deps), plus what the tests below import
pip install -q ml_dtypes matplotlib pytest pytest-timeout hypothesis && pip install -q --no-deps . || exit 1   # a copy: old setuptools cannot map ringlab -> collectives/ in place
python -c "from mpi4py import MPI; print('CI(openmpi):', MPI.Get_library_version().splitlines()[0])"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export PATH="/usr/bin:$PATH"   # Open MPI's mpirun, not the mpich wheel's
python -m pytest -q tests/test_validate.py tests/test_faults.py tests/test_timeouts.py tests/test_launch.py
