# source bench/gpu_bytecode.sh: give the GPU machine a Python that keeps bytecode, as a user's has
# (pip writes .pyc files when it installs). The lent GPU image sets PYTHONDONTWRITEBYTECODE=1 and
# ships no .pyc, so every process compiles its imports from source: `import pytorch_lightning` 10 s,
# `import torch` 3 s (bench/startup.py, docs/benchmarks.md), paid once by the diffusers example and
# once per job by the workflow. Run before both tools; its seconds count in neither's figures.
unset PYTHONDONTWRITEBYTECODE
_bc_start=$(date +%s.%N)
python3 -m compileall -q -j 0 $(python3 -c "import site; print(' '.join(site.getsitepackages()))") > /tmp/compileall.log 2>&1
echo "bytecode: site-packages compiled in $(python3 -c "print(round($(date +%s.%N) - $_bc_start, 1))") s" \
  "($(grep -c '^\*\*\*' /tmp/compileall.log) files it cannot compile: old test files)"
