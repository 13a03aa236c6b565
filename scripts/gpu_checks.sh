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
else
  DEVICE=cuda; TRAINER=gpu; STEPS=300; BENCH=(--preset issue12)
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
  $PY -m sharebone.train experiment=omniglot_maml_5w1s task=synthetic_images trainer=$TRAINER \
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
