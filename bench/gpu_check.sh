#!/usr/bin/env bash
# GPU check: the CUDA tests, then training and prediction side by side with nnU-Net v2 on the GPU,
# in under 8 minutes, and a short results file (card, versions, each step's status and time, the
# benchmarks' tables and ratios).
#
#   bash bench/gpu_check.sh                      # on a machine with a CUDA GPU (about 7 minutes)
#   bash bench/gpu_check.sh --dry-run            # the same steps on the CPU with tiny budgets (checks the script)
#   bash bench/gpu_check.sh --out results.md     # where the results file goes (default gpu_check_results.md)
#
# Each step has its own time limit (a step that runs over is stopped and reported as such, the
# others still run); the limits add up to 450 s on a GPU. Budgets and limits can be changed through
# the environment: GPU_CHECK_TRAIN_ARGS, GPU_CHECK_PREDICT_ARGS (extra arguments of bench_train.py and
# bench_predict.py), GPU_CHECK_TEST_S, GPU_CHECK_TRAIN_S, GPU_CHECK_PREDICT_S (seconds), PYTHON (the
# interpreter: default .venv/bin/python). The real data must be in ../shared/data beside the checkout.
set -u
cd "$(dirname "$0")/.."

DRY=0
OUT="gpu_check_results.md"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    --out=*) OUT="${1#--out=}" ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  export CUDA_VISIBLE_DEVICES=""
  export OMP_WAIT_POLICY=PASSIVE  # both tools: nnU-Net's spinning OpenMP threads take minutes per volume on a busy CPU
  TRAIN_ARGS="${GPU_CHECK_TRAIN_ARGS:---tp-epochs 2 --iters 2 --budget 0}"
  PREDICT_ARGS="${GPU_CHECK_PREDICT_ARGS:---quick --test mt0 --nnunet-processes 1}"
  TEST_S="${GPU_CHECK_TEST_S:-120}"; TRAIN_S="${GPU_CHECK_TRAIN_S:-600}"; PREDICT_S="${GPU_CHECK_PREDICT_S:-600}"
else
  DEVICE=cuda
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: torch sees no CUDA device here; run with --dry-run to check the script on the CPU" >&2
    exit 1
  fi
  # throughput: 4 epochs x 50 iterations per tool; then 40 s of training each for the Dice at equal time
  TRAIN_ARGS="${GPU_CHECK_TRAIN_ARGS:---tp-epochs 4 --iters 50 --budget 40}"
  PREDICT_ARGS="${GPU_CHECK_PREDICT_ARGS:---epochs 1 --iters 20}"
  TEST_S="${GPU_CHECK_TEST_S:-120}"; TRAIN_S="${GPU_CHECK_TRAIN_S:-210}"; PREDICT_S="${GPU_CHECK_PREDICT_S:-120}"
fi

STEPS="$WORK/steps.tsv"
: > "$STEPS"
step() {  # step NAME LIMIT_S LOG COMMAND...: run under a time limit, record status and seconds
  local name="$1" limit="$2" log="$3"; shift 3
  local t0 rc status
  t0=$(date +%s)
  echo "== $name (limit ${limit} s): $*" >&2
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out after ${limit} s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$log" >> "$STEPS"
  tail -n 3 "$log" >&2
}

START=$(date +%s)
step "CUDA tests (pytest -m cuda)" "$TEST_S" "$WORK/tests.log" \
  "$PY" -m pytest tests/test_cuda.py -m cuda -q -rs -p no:cacheprovider
# shellcheck disable=SC2086
step "training vs nnU-Net (bench_train.py $TRAIN_ARGS)" "$TRAIN_S" "$WORK/train.log" \
  "$PY" bench/bench_train.py --device "$DEVICE" --json "$WORK/train.json" $TRAIN_ARGS
# shellcheck disable=SC2086
step "prediction vs nnU-Net (bench_predict.py $PREDICT_ARGS)" "$PREDICT_S" "$WORK/predict.log" \
  "$PY" bench/bench_predict.py --device "$DEVICE" --json "$WORK/predict.json" $PREDICT_ARGS
TOTAL=$(( $(date +%s) - START ))

"$PY" - "$WORK" "$OUT" "$DRY" "$TOTAL" <<'EOF'
import json, subprocess, sys
from pathlib import Path

work, out, dry, total = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
import torch

if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    card = f"{p.name}, {p.total_memory / 1024**3:.0f} GB, {torch.cuda.device_count()} visible"
else:
    card = "none (CPU dry run)" if dry else "none"
lines = [f"# spineauto GPU check{' (dry run on the CPU: tiny budgets, figures say nothing)' if dry else ''}", "",
         f"- card: {card}", f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}",
         f"- commit: {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip() or '?'}",
         f"- total: {total} s", "", "| step | status | seconds |", "|---|---|---|"]
logs = {}
for row in (work / "steps.tsv").read_text().splitlines():
    name, status, secs, log = row.split("\t")
    lines.append(f"| {name} | {status} | {secs} |")
    logs[name] = Path(log)
tests = next((v for k, v in logs.items() if k.startswith("CUDA tests")), None)
if tests and tests.is_file():
    summary = [l for l in tests.read_text().splitlines() if l.strip() and (" passed" in l or " skipped" in l or " failed" in l or " error" in l)]
    lines += ["", f"CUDA tests: {summary[-1].strip('= ') if summary else 'no summary (see the log)'}"]
    skips = [l for l in tests.read_text().splitlines() if l.startswith("SKIPPED")]
    lines += [f"- {l}" for l in skips[:10]]
train = work / "train.json"
if train.is_file():
    t = json.loads(train.read_text())
    lines += ["", f"Training (`{t['command']}`), device {t['device']}, patch {t['matched_plan']['patch_size']}, "
              f"batch {t['matched_plan']['batch_size']}:", "", "| tool | samples/s | peak GPU MB | peak RSS MB | Dice held-out |", "|---|---|---|---|---|"]
    for tool, r in t["tools"].items():
        dice = f"{r['dice_held_out']:.4f}" if "dice_held_out" in r else "-"
        gpu = "-" if r.get("peak_gpu_mb") is None else f"{r['peak_gpu_mb']:.0f}"
        lines.append(f"| {tool} | {r['samples_per_s']:.1f} | {gpu} | {r['peak_rss_mb']:.0f} | {dice} |")
    lines.append(f"\nspineauto / nnU-Net samples/s: {t['throughput_ratio']:.2f}x")
predict = work / "predict.json"
if predict.is_file():
    p = json.loads(predict.read_text())
    lines += ["", f"Prediction (`{p['command']}`), {p['volumes']} volumes, TTA {'on' if p['tta'] else 'off'}:", "",
              "| tool | s/volume | peak GPU MB | peak RSS MB |", "|---|---|---|---|"]
    for tool, r in p["results"].items():
        gpu = "-" if r.get("peak_gpu_mb") is None else f"{r['peak_gpu_mb']:.0f}"
        lines.append(f"| {tool} | {r['s_per_volume']:.2f} | {gpu} | {r['peak_rss_mb']:.0f} |")
    lines.append(f"\nspineauto / nnU-Net time per volume: {p['time_ratio']:.2f}")
for name, log in logs.items():
    if log.is_file() and "ok" not in next((l.split("\t")[1] for l in (work / "steps.tsv").read_text().splitlines() if l.startswith(name)), "ok"):
        lines += ["", f"Last lines of `{name}`:", "```", *log.read_text().splitlines()[-15:], "```"]
out.write_text("\n".join(lines) + "\n")
print(f"wrote {out}")
EOF
# the exit code says whether every step passed
! grep -qv $'\tok\t' "$STEPS"
