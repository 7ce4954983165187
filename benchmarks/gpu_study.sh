#!/usr/bin/env bash
# The shortened GPU study (study preset `gpu-smoke`) end to end on one GPU, offline, in about 3 minutes:
#   1. scripts/make_math_dataset.py writes the word-problem dataset (train/eval JSONL) and a local Qwen2
#      checkpoint (BPE tokenizer + random init + a short SFT warm start on the GPU) into a temporary directory;
#   2. the `gpu-smoke` preset is copied to $OUT/gpu-smoke.toml with model.path / task.path filled in;
#   3. python3 -m cppo_diag.cli.main study ... trains grpo_clip, dppo, cppo x 2 seeds (3 workers on one GPU),
#      under a wall-clock cap (SIGINT: running cells stop; the study is resumable) and writes the results page;
#   4. prints a summary (warm start, per-run status and timing, the per-seed table, the results' summary).
#
#   OUT=/tmp/out bash benchmarks/gpu_study.sh               # GPU (default); results in $OUT/
#   OUT=/tmp/out bash benchmarks/gpu_study.sh --cpu-tiny    # the same commands, tiny sizes, CPU, ~1 minute
#
# Environment: OUT (default: a new temp dir), PYTHON (default python3), PYTHONPATH must reach the repo root
# (the script adds it) and polars. STUDY_CAP_S (default 130 on a GPU, a budget; 3000 with --cpu-tiny, only a
# hang guard far above the tiny runs, so a loaded CPU box is slower rather than failed) caps the training phase,
# SFT_SECONDS (default 35) the warm start. Outputs: $OUT/results.md, $OUT/results/ (figures, per_seed.csv),
# $OUT/study/ (the runs; browse with `cppo-diag app`), $OUT/warmstart.json, $OUT/gpu-smoke.toml, $OUT/timing.txt.
# The training/analysis path imports torch, transformers, tokenizers, numpy, polars, pyarrow, scipy, matplotlib,
# tqdm, safetensors; never streamlit, plotly or msgspec (--cpu-tiny runs with those imports blocked).
set -euo pipefail

MODE=gpu
for a in "$@"; do
  case "$a" in
    --cpu-tiny) MODE=cpu-tiny ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_study.sh: unknown argument '$a' (expected --cpu-tiny or --help)" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
OUT="${OUT:-$(mktemp -d /tmp/gpu-study.XXXXXX)}"
mkdir -p "$OUT"
WORK="$(mktemp -d /tmp/gpu-study-data.XXXXXX)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
T0=$(date +%s)
stamp() { echo "$1 $(( $(date +%s) - T0 ))s" | tee -a "$OUT/timing.txt"; }
: > "$OUT/timing.txt"

if [ "$MODE" = cpu-tiny ]; then
  # mirror the GPU image: these packages are absent there, so nothing on this path may import them
  mkdir -p "$WORK/block"
  cat > "$WORK/block/sitecustomize.py" <<'PYEOF'
import sys
class _Block:
    BLOCKED = ("streamlit", "plotly", "msgspec")
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            raise ImportError(f"{name} is blocked by gpu_study.sh --cpu-tiny (absent on the GPU image)")
        return None
sys.meta_path.insert(0, _Block())
PYEOF
  export PYTHONPATH="$WORK/block:$PYTHONPATH"
  DATA_ARGS=(--n-train 200 --n-eval 4 --hidden 64 --layers 2 --heads 4 --vocab-size 300 --sft-steps 10
             --sft-batch 8 --device cpu --threads 1 --no-progress)
  CAP="${STUDY_CAP_S:-3000}"  # a hang guard (the tiny study takes about a minute on an idle 2-core box)
  WORKERS=1
  THREADS=(--threads 1)
else
  DATA_ARGS=(--n-train 4000 --n-eval 32 --sft-steps 3000 --sft-batch 128 --sft-seconds "${SFT_SECONDS:-35}" --device cuda
             --no-progress)
  CAP="${STUDY_CAP_S:-130}"
  WORKERS=3
  THREADS=()
fi

echo "== gpu_study.sh ($MODE): OUT=$OUT data=$WORK"
"$PY" -c "import torch, transformers, polars; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'polars', polars.__version__)"
if [ "$MODE" = gpu ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_study.sh: expected a CUDA device, found none (use --cpu-tiny on CPU)')"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
fi

# 1. dataset + local model (+ warm start)
"$PY" scripts/make_math_dataset.py --out "$WORK/data" --model-dir "$WORK/data/model" --seed 0 "${DATA_ARGS[@]}"
cp "$WORK/data/model/warmstart.json" "$OUT/warmstart.json"
stamp "data+warmstart"

# 2. the preset with the paths filled in (and, for --cpu-tiny, tiny sizes on the CPU)
"$PY" - "$WORK/data" "$OUT/gpu-smoke.toml" "$MODE" <<'PYEOF'
import json, sys, tomllib
from cppo_diag.study.config import preset_path
data, dst, mode = sys.argv[1:4]
cfg = tomllib.loads(preset_path("gpu-smoke").read_text())
s = cfg["trainer"]["set"]
s.update({"model.path": f"{data}/model", "task.path": f"{data}/train.jsonl", "task.eval_path": f"{data}/eval.jsonl"})
if mode == "cpu-tiny":
    cfg["study"]["description"] = "gpu-smoke at CPU-tiny sizes (test of the GPU script); numbers mean nothing."
    cfg["trainer"]["steps"] = 1
    s.update({"device": "cpu", "precision": "fp32", "rollout.prompts_per_step": 2, "rollout.n": 4,
              "rollout.max_new_tokens": 24, "log.eval_k": 2, "log.eval_every": 1, "ckpt.every": 1,
              # one step of 2 prompts: every group may get the same reward, and a run that trains nothing
              # fails (issue 22); keep the zero-variance groups so the update path runs (zero advantages)
              "optim.skip_zero_var": False})
    cfg["analysis"]["accuracy"] = "eval/avg@2"
    cfg["analysis"]["n_boot"] = 200

def val(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(val(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")

def emit(table, prefix, out):
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    if prefix and scalars:
        out.append(f"[{prefix}]")
    for k, v in scalars.items():
        out.append(f"{json.dumps(k) if '.' in k else k} = {val(v)}")
    for k, v in table.items():
        if isinstance(v, dict):
            emit(v, f"{prefix}.{k}" if prefix else k, out)

lines = ["# generated by benchmarks/gpu_study.sh from the gpu-smoke preset"]
emit(cfg, "", lines)
open(dst, "w").write("\n".join(lines) + "\n")
print(f"study file: {dst}")
PYEOF
stamp "study-file"

# 3. the study (capped; SIGINT lets the runner stop its training processes), then the analysis
set +e
timeout --signal=INT --kill-after=20 "$CAP" "$PY" -m cppo_diag.cli.main study "$OUT/gpu-smoke.toml" \
  --root "$OUT/study" --workers "$WORKERS" "${THREADS[@]}" --no-analyse --no-progress
STUDY_RC=$?
stamp "study(rc=$STUDY_RC)"
"$PY" -m cppo_diag.cli.main study "$OUT/gpu-smoke.toml" --root "$OUT/study" --analyse-only \
  --results "$OUT/results.md" --no-progress
ANALYSE_RC=$?
set -e
stamp "analysis(rc=$ANALYSE_RC)"

# 4. summary
echo "== summary ($MODE)"
echo "warm start: $(tr -d '\n ' < "$OUT/warmstart.json")"
"$PY" - "$OUT/study" <<'PYEOF'
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
for d in sorted(p for p in root.iterdir() if (p / "meta.json").is_file()):
    meta = json.loads((d / "meta.json").read_text())
    n = len(list((d / "_done").glob("step=*"))) if (d / "_done").is_dir() else 0
    print(f"  {d.name:<16} status={meta.get('status')} steps_done={n}")
logs = root / "_study" / "logs"
for log in sorted(logs.glob("*.log")) if logs.is_dir() else []:
    meta = log.parent.parent.parent / log.stem / "meta.json"
    if not meta.is_file() or json.loads(meta.read_text()).get("status") != "finished":
        print(f"-- {log.stem} did not finish; last lines of {log}:")
        print("\n".join(log.read_text(errors="replace").splitlines()[-15:]))
PYEOF
if [ -f "$OUT/results/per_seed.csv" ]; then echo "-- per_seed.csv"; cat "$OUT/results/per_seed.csv"; fi
if [ -f "$OUT/results.md" ]; then echo "-- results.md (head)"; head -40 "$OUT/results.md"; fi
cat "$OUT/timing.txt"
rm -rf "$WORK"
if [ "$STUDY_RC" -ne 0 ] || [ "$ANALYSE_RC" -ne 0 ]; then
  echo "gpu_study.sh: study rc=$STUDY_RC, analysis rc=$ANALYSE_RC (124/130 = hit the STUDY_CAP_S=$CAP s cap)" >&2
  exit 1
fi
echo "gpu_study.sh: OK in $(( $(date +%s) - T0 )) s"
