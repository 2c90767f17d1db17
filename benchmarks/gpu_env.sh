# Source this on a machine where kvjax cannot be pip-installed (the lent GPU machines have no
# network): it lays out `kvjax` the way `pip install -e .` would (kvjax.models and
# kvjax.pallas_kernels come from the top-level folders) and puts it on PYTHONPATH.
#   source benchmarks/gpu_env.sh && python3 benchmarks/generate_bench.py --device gpu
_root=$(pwd)
_pp=$(mktemp -d)
cp -r "$_root/kvjax" "$_pp/kvjax"
ln -s "$_root/models" "$_pp/kvjax/models"
ln -s "$_root/pallas_kernels" "$_pp/kvjax/pallas_kernels"
export PYTHONPATH="$_pp:$_root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset _root _pp
