#!/usr/bin/env bash
# One prepared pass of every GPU check, for a CUDA machine with no network (the lead runs it on a lent H100).
# Carries polars as wheels in .whl/ (see docs/benchmarks.md); everything else is in the machine's image.
# Writes logs to $OUT (or ./gpu_out). Each step runs even if an earlier one failed; the exit code is the
# number of failed steps.
set -u
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
fails=0
step() {  # step NAME TIMEOUT CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  tail -n 40 "$OUT/$name.log"
  echo "=== $name: rc=$rc in $(( $(date +%s) - t0 )) s"
  [ $rc -eq 0 ] || fails=$((fails + 1))
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, polars; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'polars', polars.__version__)"
step cuda_tests 120 python3 -m pytest -q -p no:cacheprovider -k cuda tests/masks/test_masks.py tests/masks/test_masks_bench.py tests/masks/test_masks_fastpaths.py tests/capture/test_capture.py
step bench_rules 60 python3 benchmarks/bench_rules.py --device cuda
step bench_rules_bf16 45 python3 benchmarks/bench_rules.py --device cuda --dtype bfloat16 --rules cppo dppo grpo_clip
step bench_capture 75 python3 benchmarks/bench_capture.py --device cuda --repeats 6
step bench_capture_writer 75 python3 benchmarks/bench_capture.py --writer-only --repeats 5 --settings default,zstd,lz4-t2,lz4-t4 --device cuda
step gpu_check 200 python3 benchmarks/gpu_check.py
# issue 10 item 7: the `long` preset on CUDA in bf16 (sampling and training), DPPO then CPPO; the check script
# prints the masked fractions, the other criteria, s/step and tokens/s (the trainer's throughput scalar)
for rule in dppo cppo; do
  step "long_$rule" 300 python3 -m cppo_diag.cli.main train --preset long --rule.name "$rule" --device cuda \
    --precision bf16 --log.out_dir "$OUT/runs" --log.name "long-$rule" --log.progress false
  step "long_${rule}_check" 60 python3 scripts/check_long_preset.py "$OUT/runs/long-$rule"
done
echo "failed steps: $fails"
exit $fails
