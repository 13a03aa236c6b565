#!/usr/bin/env bash
# Issue 12's GPU checks as one run, for a session lent a device machine (prepared and tried on
# a CPU with SMOKE=1; never needed for CI). From the repository root:
#
#   SMOKE=1 bash scripts/gpu_checks.sh            # here, on the CPU: seconds, checks the script
#   bash scripts/gpu_checks.sh                     # there: ~6 min on an H100/H200
#
# There, hydra-core, omegaconf, antlr4 and wandb travel as wheels in .whl/ (see the device
# README: `pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl`;
# `pip wheel --no-deps antlr4-python3-runtime==4.9.3` for antlr4), learn2learn as its
# Cython-regenerated source in .l2l/ (scripts/install_learn2learn.sh keeps it with --keep).
# Real Omniglot for the bf16 comparison: copy ../shared/data/omniglot to .data/omniglot and
# carry .data (2.8 MB); without it that comparison runs on synthetic images.
# Results land in $OUT (the device tool's folder), else ./gpu_out.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
if [ -d .l2l ]; then
  python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/site .l2l || exit 1
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 WANDB_MODE=offline
PY=${PYTHON:-python3}
if [ "${SMOKE:-0}" = 1 ]; then
  DEVICE=cpu; TRAINER=cpu; STEPS=3; BENCH=(--device cpu --iters 1 --warmup 0 --hidden 8
    --impls sharebone,sharebone-vmap-chunk4 --settings 5w1s15q:8 --orders 2)
  LOOP=(--steps 3 --warmup 1 --repeats 1 sampler.meta_batch_size=2 backbone.hidden=8)
  PRECISIONS="32-true"; EPOCHS=1; EPISODES=4
  SHORT=(sampler.batches_per_epoch=2 sampler.meta_batch_size=2 sampler.val_episodes=2)
else
  DEVICE=cuda; TRAINER=gpu; STEPS=300; BENCH=(--preset issue12)
  LOOP=(--steps 200 --warmup 10 --repeats 2)
  PRECISIONS="32-true bf16-mixed"; EPOCHS=3; EPISODES=600; SHORT=()
  nvidia-smi > "$OUT/device.txt" 2>&1
fi

# 1. The tests that need a GPU (they skip on a CPU): episodes drawn on the GPU equal the
#    host's; augmentation on the device.
$PY -m pytest -q -p no:cacheprovider -m "" -rs tests/test_placement.py tests/test_image_folder.py \
  -k "gpu or device" 2>&1 | tee "$OUT/gpu_tests.txt"

# 2. Issue 12's table: learn2learn vs vmap (chunked, bf16), peak memory, same process.
$PY scripts/bench_maml.py --data random --repeats 1 "${BENCH[@]}" --out "$OUT/maml.json" \
  2>&1 | tee "$OUT/bench_maml.txt"

# 3. sharebone-train's steps with the split's images on the host vs on the GPU: it/s and the
#    step's time in the loader (perf/data_ms), from the runs' CSV logs.
for on in false true; do
  $PY -m sharebone.run.train experiment=omniglot_maml_5w1s task=synthetic_images trainer=$TRAINER \
    logger=csv figures.enabled=false sampler.images_on_device=$on trainer.max_epochs=1 \
    sampler.batches_per_epoch=$STEPS test.episodes=20 "test.settings=[{n_way: 5, k_shot: 1}]" \
    hydra.run.dir="$OUT/train_on_device_$on" > "$OUT/train_on_device_$on.txt" 2>&1
  echo "images_on_device=$on: exit $?"
  $PY - "$OUT/train_on_device_$on" <<'PY'
import csv, sys
from pathlib import Path
rows = [r for p in Path(sys.argv[1]).glob("csv/**/metrics.csv") for r in csv.DictReader(p.open())
        if r.get("perf/step_ms")]
for r in rows:
    print({k: round(float(r[k]), 3) for k in ("perf/data_ms", "perf/step_ms", "perf/data_fraction")})
PY
done 2>&1 | tee "$OUT/train_on_device.txt"

# 4. The Lightning gap: sharebone-train's steps/s over the bare step (goal >= 0.9), and the
#    host syncs left per training step, by line.
$PY scripts/bench_loop.py --device $DEVICE --logger wandb "${LOOP[@]}" --out "$OUT/loop.json" \
  2>&1 | tail -n 12 | tee "$OUT/bench_loop.txt"

# 5. bf16 against float32: the same short budget, steps/s and the 5w1s test accuracy.
TASK=(task=synthetic_images)
[ -d .data/omniglot ] && TASK=(task=omniglot_small "data_dir=$PWD/.data")
for p in $PRECISIONS; do
  $PY -m sharebone.run.train experiment=omniglot_maml_5w1s "${TASK[@]}" trainer=$TRAINER \
    ++trainer.precision=$p logger=csv figures.enabled=false trainer.max_epochs=$EPOCHS \
    test.episodes=$EPISODES "test.settings=[{n_way: 5, k_shot: 1}]" "${SHORT[@]}" \
    hydra.run.dir="$OUT/precision_$p" > "$OUT/precision_$p.txt" 2>&1
  echo "precision=$p: exit $?"
  $PY - "$OUT/precision_$p" <<'PY'
import json, sys
from pathlib import Path
m = json.loads((Path(sys.argv[1]) / "metrics.json").read_text())
print({k: v for k, v in m.items() if k.startswith("test/5w1s") or k == "train_seconds"})
PY
done 2>&1 | tee "$OUT/precision.txt"

# 6. Issue 23: iMAML's peak memory flat in inner_steps, MAML's growing; time per meta-batch.
if [ "${SMOKE:-0}" = 1 ]; then IMAML=(--device cpu --hidden 8 --steps 1,2 --iters 1 --warmup 0)
else IMAML=(--device cuda --steps 1,5,10,20 --iters 10 --warmup 2 --meta-batch 32); fi
$PY scripts/bench_imaml.py "${IMAML[@]}" --out "$OUT/imaml.json" 2>&1 | tee "$OUT/bench_imaml.txt"
