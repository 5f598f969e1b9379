#!/usr/bin/env bash
# The CIFAR-10 accuracy grid on one CUDA GPU, within one ~10-minute budget.
#
#   bash benchmarks/gpu_session.sh OUTDIR [ARCHIVE]
#
# 1. 2:4 sparse kernels against dense bf16 on a random ViT-Tiny (GPU quiet).
# 2. The dense baseline (BASE_EPOCHS epochs), and beside it the full-data run of the tickets grid.
# 3. From the baseline, all at once (small models leave a big GPU mostly idle, so the runs share it):
#    the tickets grid (attention and random at drop 0.1, 0.3, 0.5; 5 epochs from scratch),
#    `lotus compress` at (0.3, 0.1), (auto, ISP 0.5, 0.3) and (2:4, 0.1) with 5 fine-tuning
#    epochs, and structured pruning (1 head in 3, MLP halved) against unstructured at the same
#    parameter count, both fine-tuned 5 epochs.
# 4. 2:4 kernels again on the fine-tuned 2:4 model, with its test accuracy through them.
# PHASES picks what runs (default: all of "sparse24 baseline grid compress structured"). Not in
# the default: "sampled" trains sampled attention tickets (temperature 1, two seeds; 3, one seed)
# against sampled random (two seeds) at drop 0.3 and 0.5, and temperature 1 at drop 0.1;
# "scoring" trains on drop-0.5 tickets scored by rollout and by early blocks; "spread" on block-2
# attention tickets spread over 2x2 blocks at drop 0.3 and 0.5, two seeds; "allblocks" on tickets
# scored by the class-token attention of all blocks averaged (fixed and spread, two seeds) against
# random tickets of two more seeds, at drop 0.3 and 0.5; "selector" trains a scorer for
# SELECTOR_EPOCHS (20) epochs, then trains on its tickets (all blocks, two seeds; last block) at
# drop 0.5 and 0.3; "fuse" trains on tickets with one more token fusing the dropped patches
# (all-blocks attention and random, two seeds each, drop 0.5 and 0.3); "balance" on all-blocks
# tickets ranked by patch position (seeds 0-2) against random tickets of seeds 3-5, at drop 0.5
# and 0.3; "more-seeds" adds seeds 2-4 of all-blocks tickets and 3-5 of balanced ones at both;
# "cluttered-base", "cluttered" and "cluttered-more-seeds": CIFAR-10 in clutter (below); "isp-step" compresses
# with stage 1 at 0.3 and ISP to 0.5. A baseline already in WORK/baseline is used, not retrained.
# OUTDIR gets results.tar.gz (JSON results, logs, per-epoch metrics) and models.tar.gz.part*. Accuracies are the figures these runs
# give; epoch times are not comparable between runs (they share the GPU): time ratios come from
# the CPU benchmarks (token_gather_step.py, cifar10_tickets.py on the CPU).
set -u
OUT=$(realpath -m "${1:?usage: gpu_session.sh OUTDIR [ARCHIVE]}")
ARCHIVE=$(realpath -m "${2:-../shared/data/cifar10-jpg.tar.gz}")
BASE_EPOCHS=${BASE_EPOCHS:-15}
EPOCHS=${EPOCHS:-5}
DEADLINE=${DEADLINE:-470}  # seconds from the start by which the training runs are stopped
PHASES=" ${PHASES:-sparse24 baseline grid compress structured} "
PY=${PY:-python3}
cd "$(dirname "$0")"
ROOT=$(cd .. && pwd)
WORK=${WORK:-$ROOT/runs/gpu}
BASE=$WORK/baseline
source ./gpu_common.sh
"$PY" -c "from common import cifar10_folder; from pathlib import Path; print(cifar10_folder(Path('$ARCHIVE')))" || exit 1

has sparse24 && run sparse24_random sparse24_gpu.py --name sparse24_gpu_random --runs 30 --rounds 5

if has baseline && [ ! -f "$BASE/model.json" ]; then
  run baseline cifar10_baseline.py --epochs "$BASE_EPOCHS" --warmup-epochs 1 --archive "$ARCHIVE" --out "$BASE" &
  baseline=$!
  has grid && run tickets-full cifar10_tickets.py --selects full --epochs "$EPOCHS" --baseline "$BASE" --work "$WORK/tickets" --archive "$ARCHIVE" &
  wait $baseline
fi
[ -f "$BASE/model.json" ] || { echo "no CIFAR-10 baseline: the phases that need it are skipped" | tee -a "$RAW/logs/driver.log"; }

if [ -f "$BASE/model.json" ] && has compress; then
  run compress-s0.3-d0.1 cifar10_compress.py --name s0.3-d0.1 --sparsity 0.3 --drop 0.1 --epochs "$EPOCHS" \
    --baseline "$BASE" --archive "$ARCHIVE" --skip-export &
  run compress-auto-isp0.5-d0.3 cifar10_compress.py --name auto-isp0.5-d0.3 --sparsity auto --isp-target 0.5 --drop 0.3 \
    --epochs "$EPOCHS" --baseline "$BASE" --archive "$ARCHIVE" --skip-export &
  has sparse24 && run compress-2to4-d0.1 cifar10_compress.py --name 2to4-d0.1 --sparsity 2:4 --drop 0.1 --epochs "$EPOCHS" \
    --baseline "$BASE" --archive "$ARCHIVE" --skip-export &
fi
tickets() {  # tickets NAME ARGS...: one run of the tickets grid in the background
  local name=$1; shift
  run "tickets-$name" cifar10_tickets.py --epochs "$EPOCHS" --baseline "$BASE" --work "$WORK/tickets" --archive "$ARCHIVE" "$@" &
}
if [ -f "$BASE/model.json" ] && has grid; then
  for drop in 0.5 0.3 0.1; do
    for select in attention random; do
      tickets "$select-$drop" --selects "$select" --drops "$drop"
    done
  done
fi
if [ -f "$BASE/model.json" ] && has sampled; then
  for drop in 0.5 0.3; do
    for seed in 0 1; do
      tickets "random-$drop-sampled-$seed" --selects random --drops "$drop" --temperature 1 --seed "$seed"
      tickets "attention-$drop-t1-$seed" --selects attention --drops "$drop" --temperature 1 --seed "$seed"
    done
    tickets "attention-$drop-t3-0" --selects attention --drops "$drop" --temperature 3
  done
  tickets attention-0.1-t1-0 --selects attention --drops 0.1 --temperature 1
fi
if [ -f "$BASE/model.json" ] && has scoring; then
  tickets attention-0.5-rollout --selects attention --drops 0.5 --method rollout
  tickets attention-0.5-layers2 --selects attention --drops 0.5 --layers 2
  tickets attention-0.5-rollout-layers0.1.2 --selects attention --drops 0.5 --method rollout --layers 0,1,2
fi
if [ -f "$BASE/model.json" ] && has spread; then
  for drop in 0.5 0.3; do
    for seed in 0 1; do
      tickets "attention-$drop-layers2-spread2-$seed" --selects attention --drops "$drop" --layers 2 --spread 2 --seed "$seed"
    done
  done
fi
if [ -f "$BASE/model.json" ] && has allblocks; then
  for drop in 0.5 0.3; do
    for seed in 0 1; do
      tickets "attention-$drop-layersall-$seed" --selects attention --drops "$drop" --layers all --seed "$seed"
      tickets "attention-$drop-layersall-spread2-$seed" --selects attention --drops "$drop" --layers all --spread 2 --seed "$seed"
    done
    for seed in 1 2; do
      tickets "random-$drop-$seed" --selects random --drops "$drop" --seed "$seed"
    done
  done
fi
if has selector; then  # a longer-trained scorer (SELECTOR_EPOCHS), then its tickets at drop 0.5 and 0.3
  SEL=$WORK/selector${SELECTOR_EPOCHS:=20}
  [ -f "$SEL/model.json" ] || run selector cifar10_baseline.py --epochs "$SELECTOR_EPOCHS" --warmup-epochs 1 --archive "$ARCHIVE" \
    --out "$SEL" --name "cifar10_baseline_$SELECTOR_EPOCHS"
  [ -f "$SEL/model.json" ] || echo "no selector: its tickets are not trained" | tee -a "$RAW/logs/driver.log"
  [ -f "$SEL/model.json" ] && for drop in 0.5 0.3; do
    for args in "--layers all --seed 0" "--layers all --seed 1" "--seed 0"; do
      run "tickets-$drop-selector$SELECTOR_EPOCHS${args// /}" cifar10_tickets.py --epochs "$EPOCHS" --baseline "$SEL" \
        --work "$WORK/tickets" --archive "$ARCHIVE" --selects attention --drops "$drop" --tag "selector$SELECTOR_EPOCHS" $args &
    done
  done
fi
if [ -f "$BASE/model.json" ] && has fuse; then
  for drop in 0.5 0.3; do
    for seed in 0 1; do
      tickets "attention-$drop-layersall-fuse-$seed" --selects attention --drops "$drop" --layers all --fuse --seed "$seed"
      tickets "random-$drop-fuse-$seed" --selects random --drops "$drop" --fuse --seed "$seed"
    done
  done
fi
if [ -f "$BASE/model.json" ] && has balance; then
  for drop in 0.5 0.3; do
    for seed in 0 1 2; do
      tickets "attention-$drop-layersall-balance-$seed" --selects attention --drops "$drop" --layers all --balance --seed "$seed"
    done
    for seed in 3 4 5; do
      tickets "random-$drop-$seed" --selects random --drops "$drop" --seed "$seed"
    done
  done
fi
if [ -f "$BASE/model.json" ] && has more-seeds; then
  for drop in 0.5 0.3; do
    for seed in 2 3 4; do
      tickets "attention-$drop-layersall-$seed" --selects attention --drops "$drop" --layers all --seed "$seed"
    done
    for seed in 3 4 5; do
      tickets "attention-$drop-layersall-balance-$seed" --selects attention --drops "$drop" --layers all --balance --seed "$seed"
    done
  done
fi
# CIFAR-10 in clutter (cluttered_cifar10.py: objects on a 64x64 canvas of other images' pieces, 8px patches):
# "cluttered-base" makes the data and its own BASE_EPOCHS baseline, with two seeds of full data beside it;
# "cluttered" trains on its tickets (all blocks: seeds 0-2 at drop 0.5, 0-1 at 0.3; last block: seed 0 at 0.5)
# against random tickets of the same seeds, then measures how much of the object each kind of ticket keeps;
# "cluttered-more-seeds" adds seeds of both. The cluttered baseline joins the models archive: a later GPU run
# can carry it to WORK/cluttered-baseline and skip "cluttered-base" (the data are remade, about a minute).
CL=${CLUTTERED:-$ROOT/data/cluttered64} CL_BASE=$WORK/cluttered-baseline
cluttered() {  # cluttered NAME ARGS...: one 5-epoch run on the cluttered data in the background
  local name=$1; shift
  run "cluttered-$name" cifar10_tickets.py --data "$CL" --patch-size 8 --suite cluttered64_tickets --epochs "$EPOCHS" \
    --baseline "$CL_BASE" --work "$WORK/cluttered" "$@" &
}
if has cluttered-base || has cluttered || has cluttered-more-seeds; then
  [ -f "$CL/placements.npz" ] || run cluttered-data cluttered_cifar10.py --archive "$ARCHIVE" --out "$CL"
fi
if has cluttered-base && [ ! -f "$CL_BASE/model.json" ]; then
  run cluttered-baseline cifar10_baseline.py --data "$CL" --patch-size 8 --epochs "$BASE_EPOCHS" --warmup-epochs 1 \
    --out "$CL_BASE" --name cluttered64_baseline &
  for seed in 0 1; do cluttered "full-$seed" --selects full --seed "$seed"; done
  wait
fi
if has cluttered && [ -f "$CL_BASE/model.json" ]; then
  for seed in 0 1 2; do
    cluttered "attention-0.5-layersall-$seed" --selects attention --drops 0.5 --layers all --seed "$seed"
    cluttered "random-0.5-$seed" --selects random --drops 0.5 --seed "$seed"
  done
  for seed in 0 1; do
    cluttered "attention-0.3-layersall-$seed" --selects attention --drops 0.3 --layers all --seed "$seed"
    cluttered "random-0.3-$seed" --selects random --drops 0.3 --seed "$seed"
  done
  cluttered attention-0.5 --selects attention --drops 0.5
  wait
  DEADLINE=$((SECONDS - T0 + 60))  # the runs are done: a minute for the coverage
  run cluttered-coverage cluttered_cifar10.py --out "$CL" --coverage "$WORK"/cluttered/tickets-*
fi
if has cluttered-more-seeds && [ -f "$CL_BASE/model.json" ]; then  # seeds 3-5 at drop 0.5, 2-4 at 0.3
  for drop_seeds in "0.5 3 4 5" "0.3 2 3 4"; do
    set -- $drop_seeds
    drop=$1; shift
    for seed in "$@"; do
      cluttered "attention-$drop-layersall-$seed" --selects attention --drops "$drop" --layers all --seed "$seed"
      cluttered "random-$drop-$seed" --selects random --drops "$drop" --seed "$seed"
    done
  done
fi
if [ -f "$BASE/model.json" ] && has isp-step; then
  run compress-s0.3-isp0.5-d0.3 cifar10_compress.py --name s0.3-isp0.5-d0.3 --sparsity 0.3 --isp-target 0.5 --drop 0.3 \
    --epochs "$EPOCHS" --baseline "$BASE" --archive "$ARCHIVE" --skip-export &
fi
if [ -f "$BASE/model.json" ] && has structured; then
  run structured cifar10_structured.py --accuracy-only --finetune-epochs "$EPOCHS" --baseline "$BASE" \
    --work "$WORK/structured" --archive "$ARCHIVE" &
fi
wait

DEADLINE=$((SECONDS - T0 + 45))
if has sparse24 && [ -f "$ROOT/runs/bench-cifar10-compress-2to4-d0.1/model.json" ]; then
  run sparse24_finetuned sparse24_gpu.py --name sparse24_gpu_finetuned --checkpoint "$ROOT/runs/bench-cifar10-compress-2to4-d0.1" \
    --data "$(dirname "$(find "$ROOT/data" -maxdepth 3 -type d -name train | head -1)")" --runs 30 --rounds 3
fi

# results, logs and per-epoch metrics of every run (also of runs stopped at the deadline): one archive
(cd "$ROOT/runs" && find . \( -name metrics.jsonl -o -name stages.json -o -name metrics.json -o -name sweep.json \
  -o -name 'isp*.json' -o -name structured.json -o -name sparsity.json -o -name '*.md' -o -name '*.png' -o -name recipe.yaml \) \
  -not -path './gpu/out/*' -print0 | tar czf "$RAW/runs-metrics.tar.gz" --null -T -)
tar czf "$OUT/results.tar.gz" -C "$RAW" results logs runs-metrics.tar.gz
# the models (for CPU work afterwards), in parts of 15 MB (the device tool returns files of 16 MiB at most)
[ -n "${SKIP_MODELS:-}" ] || (cd "$ROOT/runs" && tar czf "$WORK/models.tar.gz" $(ls -d gpu/baseline/model.* bench-cifar10-compress-*/model.* \
  gpu/structured/ft-shrunk-*/model.* gpu/cluttered-baseline/model.* 2>/dev/null))
[ -n "${SKIP_MODELS:-}" ] || split -b 15M -d "$WORK/models.tar.gz" "$OUT/models.tar.gz.part"
ls -la "$OUT"
echo "done at $((SECONDS - T0)) s" | tee -a "$RAW/logs/driver.log"
