#!/usr/bin/env bash
# The full-resolution mammography comparison (issue 16) at GPU scale, for a session that has a lent GPU:
# MIRAM, MAE, MSMAE and the from-scratch ViT, woman-grouped 5-fold CV (scripts/mammo_cv.py), one process per
# method side by side on one GPU, bf16 autocast in training, plus the models fine-tuned on every woman (--final)
# for the zoo. Results come back in $OUT (the device tool's return folder; default runs/device_out).
#
# Prepare here first (the machine gets the checkout only, 64 MiB in all): the full-resolution mini-MIAS PNGs
# (device_bundle.py's copy is shrunk 4x: not this one), 42 MB:
#   mkdir -p .devdata/mias_full && cp ../shared/data/mammography_mias/{*.png,labels.csv} .devdata/mias_full/
# and, since the zoo's weights and the data do not both fit, untrack the weights as scripts/device_train.sh
# describes; carry .devdata/mias_full.
# Then on the device:   bash scripts/device_mammo.sh        (about 12 minutes on an H200 with the defaults)
#
# Knobs: PRE (pretraining steps, 3000), FT (fine-tuning steps, 1000), BS (batch, 128), FOLDS (5),
# ENC ("--embed-dim 192 --depth 6 --heads 3": the ViT-tiny encoder; weights stay < 10 MB in float16).
# Publish afterwards on the CPU machine with scripts/zoo_publish.py --mammo (see models/README.md).
set -u
D=${DATA:-.devdata/mias_full}
OUT=${OUT:-runs/device_out}
R=runs/mammo_gpu
PRE=${PRE:-3000}
FT=${FT:-1000}
BS=${BS:-128}
FOLDS=${FOLDS:-5}
ENC=${ENC:---embed-dim 192 --depth 6 --heads 3}
mkdir -p "$OUT" "$R"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OMP_NUM_THREADS=3
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
CV="$PY scripts/mammo_cv.py --data $D --out $R --folds $FOLDS --pretrain-steps $PRE --finetune-steps $FT \
 --batch-size $BS --eval-batch 256 --device cuda --threads 3 --final $ENC"
$CV --prepare-only > "$R/prepare.log" 2>&1 || { cat "$R/prepare.log"; exit 1; }
for m in miram mae msmae scratch; do
  ( $CV --methods $m > "$R/$m.log" 2>&1; echo "exit $?" >> "$R/$m.log" ) &
done
wait
$CV --table --methods miram mae msmae scratch | tee "$OUT/table.md"
cp "$R"/*.log "$R"/log.txt "$R"/folds.json "$OUT"/ 2>/dev/null
for m in miram mae msmae scratch; do
  mkdir -p "$OUT/$m"
  cp "$R/$m"/summary.json "$R/$m"/fold*.json "$OUT/$m"/ 2>/dev/null
  cp "$R/$m/final.safetensors" "$OUT/$m/" 2>/dev/null
done
