# Source this on a machine where kvjax cannot be pip-installed (the lent GPU machines have no
# network): it lays out `kvjax` the way `pip install -e .` would (kvjax.models and
# kvjax.pallas_kernels come from the top-level folders) and puts it on PYTHONPATH.
#   source benchmarks/gpu_env.sh && python3 benchmarks/generate_bench.py --device gpu
# The SmolLM2 GGUF (98 MB) is over the lent machines' 64 MiB per-call transfer: split it into
# two halves under the ignored .gl/ (head -c / tail -c), carry .gl/a in one call and .gl/b in
# the next while the machine is warm (ignored files stay between calls), `cat` them together
# there and pass the file with --model (benchmarks/quality_sweep.py). The machines have no
# `gguf` package: carry its wheel (pure Python) and `pip install --no-deps --target /tmp/...`.
_root=$(pwd)
_pp=$(mktemp -d)
cp -r "$_root/kvjax" "$_pp/kvjax"
ln -s "$_root/models" "$_pp/kvjax/models"
ln -s "$_root/pallas_kernels" "$_pp/kvjax/pallas_kernels"
export PYTHONPATH="$_pp:$_root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset _root _pp
