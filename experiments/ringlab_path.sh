# Source me on a machine where ringlab is not pip-installed (the device runs): makes `import ringlab` load
# this checkout by a link farm (ringlab -> collectives/, ringlab/kernels -> kernels/), as setup.py maps them.
_rl=$(mktemp -d); mkdir "$_rl/ringlab"
_src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ln -s "$_src"/collectives/* "$_rl/ringlab/"; ln -s "$_src/kernels" "$_rl/ringlab/kernels"
export PYTHONPATH=$_rl:$_src${PYTHONPATH:+:$PYTHONPATH}
unset _rl _src
