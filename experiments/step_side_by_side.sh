#!/usr/bin/env bash
# The distillation step side by side, in interleaved rounds: this checkout's step (`new`), another
# checkout's (`main`: BEFORE=path), the plain JAX step and the authors'-style PyTorch step of
# ../shared/bench/anchor_step.py (ANCHOR=path; PyTorch needs torch in this Python), and the
# before-checkout's step with one feature changed (step_variants.py). Full width at batch 8 and
# the default run's width 0.125 at batch 32; 64 px, f = 4, CE + FM + AT+, fp32, no augmentation.
# usage: BEFORE=/path/to/old/checkout bash experiments/step_side_by_side.sh ROUNDS OUTLOG
# (VARIANTS="" skips the one-feature variants)
set -u
R=$1; OUT=$2; PY=${PY:-python}; HERE=$(cd "$(dirname "$0")/.." && pwd)
A=${ANCHOR:-$HERE/../shared/bench/anchor_step.py}; BEFORE=${BEFORE:-$HERE}
BFULL="--programs=distill --terms=ce,fm,at --image_size=64 --factor=4 --no_augment --dtypes=float32 --no_pipelined --steps=10 --warmup=3"
cd /tmp
run() {  # label, command...
  local label=$1; shift
  local line; line=$("$@" 2>&1 | grep -E "^# done|^RESULT" | tail -1)
  local ips; ips=$(echo "$line" | grep -oE "[0-9.]+ images/s|img_per_s=[0-9.]+" | grep -oE "[0-9.]+" | tail -1)
  echo "$label $ips" | tee -a "$OUT"
}
for r in $(seq 1 "$R"); do
  echo "# round $r $(date +%T)" | tee -a "$OUT"
  for W in 1.0:8 0.125:32; do
    w=${W%:*}; b=${W#*:}
    run "w$w/main"      env PYTHONPATH=$BEFORE $PY -m camkd_jax.benchmark $BFULL --width=$w --batch_size=$b
    run "w$w/new"       env PYTHONPATH=$HERE $PY -m camkd_jax.benchmark $BFULL --width=$w --batch_size=$b
    run "w$w/plain"     env ANCHOR_WIDTH=$w $PY $A jax 64 4 $b fp32 10
    run "w$w/torch"     env ANCHOR_WIDTH=$w $PY $A torch 64 4 $b fp32 10
    if [ "$w" = "1.0" ]; then
      for v in ${VARIANTS-nofreeze where cond_out}; do
        run "w$w/main+$v" env VARIANT=$v PYTHONPATH=$BEFORE $PY $HERE/experiments/step_variants.py $BFULL --width=$w --batch_size=$b
      done
    fi
  done
done
# the uint8 conversion and the student view alone (jitted, batch 8, 64 px, f = 4), median of 50
env PYTHONPATH=$HERE $PY - <<'PY' | tee -a "$OUT"
import time, statistics, numpy as np, jax, jax.numpy as jnp
from camkd_jax import ops
f = jax.jit(lambda u: ops.student_view(u.astype(jnp.float32) / 255.0, 4, 'upsampled'))
x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), np.uint8))
jax.block_until_ready(f(x)); ts = []
for _ in range(50):
  t = time.perf_counter(); jax.block_until_ready(f(x)); ts.append(time.perf_counter() - t)
print(f'view_ms {statistics.median(ts) * 1e3:.3f}')
PY
