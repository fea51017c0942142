#!/usr/bin/env bash
# The issue-2 GPU baseline: mixtral_small for 50 steps (synthetic data), XLA ragged_dot experts, then
# the same with rematerialisation when memory is short. Results land in experiments/results/ (and $OUT).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
for extra in "" "model.remat=true"; do
  echo "== mixtral_small $extra"
  python3 experiments/train.py --config mixtral_small --benchmark --no-progress train.steps=50 \
      train.log_every=10 moe.grouped_gemm_backend=xla $extra && break
done
mkdir -p "${OUT:-/tmp/out}"; cp experiments/results/train_*.json "${OUT:-/tmp/out}/" 2>/dev/null
