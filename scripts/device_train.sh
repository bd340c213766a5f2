#!/usr/bin/env bash
# Train the zoo's GPU candidates on one lent GPU machine, all at once, under one wall-clock budget, and run the
# CUDA tests and the CUDA segmenter benchmark beside them. Results are packed into $OUT (the device tool's
# return folder; default runs/device_out here).
#
# Prepare here first (the machine gets the checkout only, 64 MiB in all):
#   python scripts/device_bundle.py          # .devdata/: hippocampus, shrunk mini-MIAS and TCIA copies
#   pip download nibabel pydicom wheels into .whl/ (the GPU image lacks them; see /work/.library/device)
#   the zoo's weights and the data do not both fit in 64 MiB: for the call, untrack the weights the jobs do not
#   read (git rm --cached models/*/model.safetensors except dino_tiny_medical's, listed in .git/info/exclude),
#   and restore them after (git reset; drop the exclude lines)
# then run there:  bash scripts/device_train.sh   (MIN=7 by default: minutes per training run)
# The two calls of 2026-11-27:  MIN=7 bash scripts/device_train.sh
#   MIN=3.2 SLACK=30 JOBS="seg_unet3d seg_unet3d_w24" NO_BENCH=1 \
#     TESTS="tests/test_cuda.py tests/test_dino.py tests/test_engine_train.py" bash scripts/device_train.sh
#
# Jobs (one process each, one GPU shared):
#   seg_{unet,emf,dinocnn,mim}: the four hippocampus segmenters, same split, same MIN-minute budget
#     (medssl finetune --max-minutes), 2D batch 64, 3D batch 8 of 32x48x32, lr 3e-3, cosine on time;
#   seg_mimpt: MiM pretrained (nested masked reconstruction, 1/3 of the budget) then fine-tuned (2/3);
#   dino_{a,b,c}: DINO ViT-tiny pretraining variants on hippocampus + mini-MIAS + TCIA;
#   seg_unet3d, seg_unet3d_w24: 3D U-Nets (3 levels; base width 16 and 24), batch 8 of 40x56x40.
# JOBS="seg_unet dino_a ..." picks some (default: the first eight, as run in 2026-11-27's first call).
set -u
MIN=${MIN:-7}
D=${DATA:-.devdata}
OUT=${OUT:-runs/device_out}
R=runs/device
mkdir -p "$OUT" "$R"
export PYTHONUNBUFFERED=1 MEDSSL_DATA_DIR="$D" OMP_NUM_THREADS=2
PY=${PY:-python3}
if [ -d .whl ] && ! "$PY" -c "import nibabel, pydicom" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
DEV=${DEV:-cuda}
M="$PY -m napari_medssl.engine.cli"  # the medssl console script, without installing the package
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
"$PY" -c "import torch, napari_medssl.engine.cli; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" \
  >> "$OUT/gpu.txt" 2>&1 || { cat "$OUT/gpu.txt"; exit 1; }
cat "$OUT/gpu.txt"

SPLIT=models/splits/hippocampus_seed0.json
SEG="--task segment --data $D/hippocampus --split-file $SPLIT --max-steps 1000000 --val-every 1000 \
 --warmup-steps 300 --lr 3e-3 --device $DEV --no-resume"
T=$("$PY" -c "print(int($MIN * 60 + ${SLACK:-120}))")  # hard stop per job, SLACK s past its own budget
JOBS=${JOBS:-seg_unet seg_emf seg_dinocnn seg_mim seg_mimpt dino_a dino_b dino_c}
run() { local name=$1; shift; case " $JOBS " in *" $name "*) ;; *) return 0;; esac; ( timeout "$T" "$@" > "$R/$name.log" 2>&1; echo "exit $?" >> "$R/$name.log" ) & }

run seg_unet $M finetune --model unet_tiny --batch-size 64 --max-minutes "$MIN" --out "$R/seg_unet" $SEG
run seg_emf $M finetune --model emfformer_tiny --batch-size 64 --max-minutes "$MIN" --out "$R/seg_emf" $SEG
run seg_dinocnn $M finetune --model dinocnn_tiny --batch-size 64 --max-minutes "$MIN" --out "$R/seg_dinocnn" \
  --set dino_checkpoint=models/dino_tiny_medical/model.safetensors $SEG
run seg_mim $M finetune --model mim_tiny --batch-size 8 --patch-size 32 48 32 --max-minutes "$MIN" \
  --out "$R/seg_mim" $SEG
PRE=$("$PY" -c "print(round($MIN / 3, 2))"); FT=$("$PY" -c "print(round($MIN * 2 / 3, 2))")
run seg_mimpt bash -c "$M pretrain --model mim_tiny --data $D/hippocampus --split-file $SPLIT --batch-size 8 --patch-size 32 48 32 \
    --max-steps 1000000 --max-minutes $PRE --val-every 1000 --warmup-steps 300 --lr 1.5e-3 --device $DEV \
    --best-metric last --no-resume --out $R/pre_mim && \
  $M finetune --model $R/pre_mim/best.safetensors --batch-size 8 --patch-size 32 48 32 --max-minutes $FT \
    --out $R/seg_mimpt $SEG"
U3="--model unet_tiny --set spatial_dims=3 --set levels=3 --batch-size 8 --patch-size 40 56 40 --max-minutes $MIN"
run seg_unet3d $M finetune $U3 --out "$R/seg_unet3d" ${SEG/--val-every 1000/--val-every 500}
run seg_unet3d_w24 $M finetune $U3 --set base_width=24 --out "$R/seg_unet3d_w24" ${SEG/--val-every 1000/--val-every 500}
DINO="--model dino_tiny --data $D/hippocampus --data $D/mammography_mias --data $D/dicom/tcia_btp_PGBM-001 \
 --data $D/dicom/tcia_btp_PGBM-005_T1post --max-steps 1000000 --max-minutes $MIN --val-every 2000 \
 --best-metric last --device $DEV --no-resume --set momentum_teacher=0.996"
run dino_a $M pretrain $DINO --out "$R/dino_a" --batch-size 128 --lr 5e-4 --warmup-steps 500 \
  --set head_use_bn=true --set out_dim=1024
run dino_b $M pretrain $DINO --out "$R/dino_b" --batch-size 128 --lr 5e-4 --warmup-steps 500
run dino_c $M pretrain $DINO --out "$R/dino_c" --batch-size 256 --lr 2.5e-4 --warmup-steps 300 \
  --set head_use_bn=true --set out_dim=4096 --set n_local_crops=6

if [ -z "${SKIP_CHECKS:-}" ]; then
# beside the training: the CUDA tests and the CUDA cost table (memory ratios are per process, so valid under
# the shared load; latencies are not)
TESTS=${TESTS:-tests/test_cuda.py tests/test_engine_train.py tests/test_segmenters.py tests/test_mim.py \
  tests/test_dino.py tests/test_inference.py}
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -ra $TESTS > "$OUT/pytest_cuda.txt" 2>&1
tail -3 "$OUT/pytest_cuda.txt"
[ -n "${NO_BENCH:-}" ] || timeout 240 "$PY" benchmarks/bench_segmenters.py --device $DEV --repeats 20 > "$OUT/bench_cuda.txt" 2>&1
grep -v USDT "$OUT/bench_cuda.txt" | tail -12
fi

wait
# DINO runs: keep the teacher ViT only, in float16 (what the zoo publishes), as the run's best.safetensors
for r in dino_a dino_b dino_c; do
  [ -f "$R/$r/best.safetensors" ] || continue
  "$PY" -c "
import sys; from pathlib import Path; sys.path.insert(0, 'scripts')
from zoo_publish import convert
p = convert(Path('$R/$r'), True, True, [])
p.replace(Path('$R/$r/best.safetensors'))
" >> "$R/$r.log" 2>&1
done
for r in $JOBS; do
  grep -h '"event": "val"' "$R/$r/events.jsonl" 2>/dev/null | tail -2 | sed "s/^/$r /" | cut -c1-300
done
pack() { local name=$1; shift; tar -cf "$OUT/$name.tar" "$@" 2>/dev/null; }
files() { for r in "$@"; do for f in best.safetensors events.jsonl config.json split.json last.json; do
  [ -f "$R/$r/$f" ] && echo "$R/$r/$f"; done; done; }
mkdir -p $R/logs
for f in $R/*.log; do tail -c 4000 "$f" > "$R/logs/$(basename "$f" .log).txt"; done  # progress bars: one long line
pack unet_emf $(files seg_unet seg_emf) $R/logs
pack dinocnn $(files seg_dinocnn)
pack mim $(files seg_mim seg_mimpt) $(for f in events.jsonl config.json; do echo $R/pre_mim/$f; done)
pack dino_ab $(files dino_a dino_b)
pack dino_c $(files dino_c)
pack unet3d $(files seg_unet3d)
pack unet3d_w24 $(files seg_unet3d_w24)
ls -la "$OUT"
