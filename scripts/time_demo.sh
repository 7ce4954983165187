#!/bin/bash
# Time the demo's first look: `cppo-diag demo --quick` with the app on (no browser), as `make demo-quick` runs it.
# Prints when the app answered, when the run's first step was committed (the first figures the app can draw
# of the live run) and when training ended, in seconds from the start, with the load average at the end.
# The README's demo paragraph quotes its output (issue 24).
#
#   scripts/time_demo.sh [OUT_DIR] [PORT]        default OUT_DIR: a new temp dir, PORT: 8731
#   PYTHON=.venv/bin/python scripts/time_demo.sh  (default: python3)
set -u
cd "$(dirname "$0")/.."
out=${1:-$(mktemp -d)}; port=${2:-8731}; py=${PYTHON:-python3}
mkdir -p "$out"
t0=$(date +%s.%N)
since() { echo "$(date +%s.%N) - $t0" | bc; }
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$py" -m cppo_diag.cli.main demo --quick --no-browser --exit-when-done \
  --port "$port" --out "$out/runs" > "$out/demo.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null' EXIT INT TERM
health=""; first=""
while kill -0 "$pid" 2>/dev/null; do
  if [ -z "$health" ] && curl -sf "http://127.0.0.1:$port/_stcore/health" >/dev/null 2>&1; then health=$(since); fi
  if [ -z "$first" ] && ls "$out"/runs/demo-cppo-*/_done/step=000000.rank0 >/dev/null 2>&1; then first=$(since); fi
  sleep 1
done
wait "$pid"; rc=$?
trap - EXIT INT TERM
printf 'demo --quick: rc=%s app_answered_s=%.0f first_step_s=%.0f total_s=%.0f loadavg=%s cpus=%s\n' \
  "$rc" "${health:-nan}" "${first:-nan}" "$(since)" "$(cut -d' ' -f1-3 /proc/loadavg | tr ' ' '/')" "$(nproc)"
tail -n 3 "$out/demo.log"
exit "$rc"
