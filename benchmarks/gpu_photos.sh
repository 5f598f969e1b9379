#!/usr/bin/env bash
# Data lottery tickets on photographs (Tiny-ImageNet-100) on one CUDA GPU, within a ~10-minute call.
#
#   bash benchmarks/gpu_photos.sh OUTDIR
#
# 1. "scorer": a baseline (depth 6, 8-px patches: 64 patches) trained BASE_EPOCHS epochs by
#    scorer_coverage.py, which also measures after epochs MEASURE how much of the object each
#    selection keeps (does a better-trained scorer find the object?).
# 2. "grid": tiny_imagenet_tickets.py from that baseline, pruned to 0.5 and fine-tuned EPOCHS
#    epochs on full data, on the dense model, and on tickets of SELECTIONS at DROPS, one process
#    per seed of SEEDS sharing the GPU (the tickets and the pruned model are made first, once).
# 3. "scratch": the same selections trained from scratch for EPOCHS epochs (--mode scratch).
# PHASES picks what runs (default "scorer grid"). A phase whose runs already finished is read, not
# redone: a second call on a warm machine goes on where a deadline stopped the first.
#
# The data: DATA (an unpacked folder) where it is set; else ../shared/data/tiny-imagenet-100.tar.gz
# where it exists; otherwise the archive's parts in data/ (75 MB is over what one device call
# carries, 64 MiB with the working tree). Split it
# here with `split -b 40M -d ../shared/data/tiny-imagenet-100.tar.gz data/tiny-imagenet-100.tar.gz.part`,
# carry data/tiny-imagenet-100.tar.gz.part00 in a first call and ...part01 in the next (a warm
# machine keeps the first). OUTDIR gets results.tar.gz (JSON results, logs, per-epoch metrics) and
# the baseline in parts of 15 MB. Accuracies are the figures these runs give; their epoch times are
# not comparable (the runs share the GPU): time ratios come from the CPU benchmarks.
set -u
OUT=$(realpath -m "${1:?usage: gpu_photos.sh OUTDIR}")
BASE_EPOCHS=${BASE_EPOCHS:-20}
MEASURE=${MEASURE:-1,2,5,10,20}
EPOCHS=${EPOCHS:-5}
SELECTIONS=${SELECTIONS:-all,random}
DROPS=${DROPS:-0.5,0.3}
SEEDS=${SEEDS:-0 1 2}
DEADLINE=${DEADLINE:-540}  # seconds from the start by which the training runs are stopped
PHASES=" ${PHASES:-scorer grid} "
PY=${PY:-python3}
cd "$(dirname "$0")"
ROOT=$(cd .. && pwd)
WORK=${WORK:-$ROOT/runs/gpu-photos}
BASE=$WORK/scorer/baseline-$BASE_EPOCHS
source ./gpu_common.sh
DATA=${DATA:-$("$PY" -c "from common import tiny_imagenet_folder; print(tiny_imagenet_folder())")} || exit 1

has scorer && run scorer scorer_coverage.py --data "$DATA" --epochs "$BASE_EPOCHS" --measure "$MEASURE" --images 5000 \
  --selections last,all,rollout,grad,balance,random,centre --work "$WORK/scorer" --name "scorer_coverage_tiny_imagenet_$BASE_EPOCHS"
[ -f "$BASE/model.json" ] || echo "no baseline: the phases that need it are skipped" | tee -a "$RAW/logs/driver.log"

grid() {  # grid MODE: the tickets grid in MODE, one process per seed
  local mode=$1 common=(--data "$DATA" --baseline "$BASE" --mode "$1" --epochs "$EPOCHS" --drops "$DROPS" --tag "base$BASE_EPOCHS")
  local selections=$SELECTIONS
  [ "$mode" = finetune ] && selections=dense,$SELECTIONS
  run "$mode-prepare" tiny_imagenet_tickets.py "${common[@]}" --work "$WORK/$mode" --selections "$selections" --prepare-only
  for seed in $SEEDS; do
    run "$mode-seed$seed" tiny_imagenet_tickets.py "${common[@]}" --work "$WORK/$mode" --selections "$selections" --seeds "$seed" &
  done
  wait
  DEADLINE=$((SECONDS - T0 + 60)) run "$mode-report" tiny_imagenet_tickets.py "${common[@]}" --work "$WORK/$mode" \
    --selections "$selections" --report-only
}
[ -f "$BASE/model.json" ] && has grid && grid finetune
[ -f "$BASE/model.json" ] && has scratch && grid scratch

# results, logs and per-epoch metrics of every run (also of runs stopped at the deadline): one archive
(cd "$WORK" && find . \( -name metrics.jsonl -o -name model.json -o -name tickets.json \) -not -path './out/*' -print0 |
  tar czf "$RAW/runs-metrics.tar.gz" --null -T -)
tar czf "$OUT/results.tar.gz" -C "$RAW" results logs runs-metrics.tar.gz
# the baseline (for CPU work afterwards), in parts of 15 MB (the device tool returns files of 16 MiB at most)
[ -f "$BASE/model.json" ] && (cd "$WORK" && tar czf "$WORK/baseline.tar.gz" "scorer/baseline-$BASE_EPOCHS/model."*) &&
  split -b 15M -d "$WORK/baseline.tar.gz" "$OUT/baseline.tar.gz.part"
ls -la "$OUT"
echo "done at $((SECONDS - T0)) s" | tee -a "$RAW/logs/driver.log"
