# Sourced by the GPU session scripts, from benchmarks/ with ROOT, WORK, OUT, PY and DEADLINE set:
# the environment of their benchmark runs and the helpers that run them under one deadline.
RAW=$WORK/out  # gathered into OUTDIR's few archives at the end
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 LOTUS_BENCH_RESULTS=$RAW/results OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$OUT" "$RAW/results" "$RAW/logs"
T0=$SECONDS
left() { local t=$((DEADLINE - (SECONDS - T0))); echo $((t > 1 ? t : 1)); }
has() { [[ $PHASES == *" $1 "* ]]; }
run() {  # run NAME SCRIPT ARGS...: a benchmark script under the deadline, its output added to logs/NAME.log
  local name=$1; shift
  timeout "$(left)" "$PY" "$@" >>"$RAW/logs/$name.log" 2>&1
  echo "$name: exit $? at $((SECONDS - T0)) s" | tee -a "$RAW/logs/driver.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RAW/logs/gpu.txt"
"$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$RAW/logs/gpu.txt"
