#!/usr/bin/env bash
# The one command a GPU owner runs (budget: 8 minutes on one H100). One line per check, PASS, FAIL or SKIP, with
# its figures and the peak GPU memory it took (bench/gpu_check.py says what each check does):
#   deepspeed-zero0 / deepspeed-zero2  DeepSpeed bf16 + NCCL, one rank, ZeRO 0 and 2
#   two-workers-bf16                   2 ranks (NCCL, bf16) train what 1 rank trains (2 GPUs; SKIP on 1)
#   zero2-kill-resume                  ZeRO-2 `fit` killed after epoch 1, resumed: the uninterrupted weights
#   vit-b16-step                       ViT-B/16 training step, random weights, batch 64, 224 px: time, memory
#   tune-trial-b16                     one tune trial as presets/vtab1k_vitb16.yaml runs it, ViT-B/16, 224 px
#   train-eval-ray                     train + evaluate stages through a local Ray, one GPU per worker
#   dynamic-vs-full                    compacted dynamic inference vs full depth, batch 1, 64, 256: images/s
#   pipeline                           `dvc repro` of the embedded default in a scratch clone, CUDA_VISIBLE_DEVICES
#                                      set (epochs cut to fit the budget; GPU_CHECK_FULL=1 keeps params.yaml's)
# Usage: bench/gpu_check.sh [--cpu-dry-run] [--no-pipeline] [--out FILE]
#   --cpu-dry-run  the python checks on the CPU at tiny shapes (what CI runs); the pipeline check is skipped
#   --out FILE     where the whole output goes too (tee); default on a GPU: bench/results/gpu_check-<date>.txt,
#                  the file BENCHMARKS.md cites; default with --cpu-dry-run: none
# Python: .venv/bin/python if it exists (reused as it is), else `make install` creates it (minutes: the whole
# stack is downloaded, so that first run takes longer).
# Exit: 0 all passed (SKIP included), 1 a check failed, 2 bad usage or no Python environment, 3 no CUDA device.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0 PIPELINE=1 OUT=
while [[ $# -gt 0 ]]; do
  case $1 in
    --cpu-dry-run) DRY=1 PIPELINE=0 ;;
    --no-pipeline) PIPELINE=0 ;;
    --out) [[ $# -ge 2 ]] || { echo "gpu_check: --out needs a file" >&2; exit 2; }; OUT=$2; shift ;;
    --out=*) OUT=${1#--out=} ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

export DS_BUILD_OPS=0 RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true \
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false DVC_NO_ANALYTICS=1 PYTHONUNBUFFERED=1

if [[ $DRY == 0 ]] && ! command -v nvidia-smi >/dev/null 2>&1 && [[ ! -e /dev/nvidia0 ]]; then
  echo "gpu_check: no CUDA device on this machine (no nvidia-smi, no /dev/nvidia0); --cpu-dry-run checks the script on the CPU"
  exit 3
fi

PY=${GPU_CHECK_PYTHON:-$ROOT/.venv/bin/python}
if [[ ! -x $PY ]]; then
  echo "gpu_check: no .venv here; creating it with make install"
  make install >&2 || { echo "gpu_check: make install failed"; exit 2; }
  PY=$ROOT/.venv/bin/python
fi
BIN=$(dirname "$PY")

if [[ $DRY == 0 ]]; then
  # GPUs 0 and 1 when there are two (the 2-worker check), else GPU 0; CUDA_VISIBLE_DEVICES set by the caller wins
  if [[ -z ${CUDA_VISIBLE_DEVICES:-} ]]; then
    NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    export CUDA_VISIBLE_DEVICES=$([[ ${NGPU:-0} -ge 2 ]] && echo 0,1 || echo 0)
  fi
  OUT=${OUT:-bench/results/gpu_check-$(date +%Y-%m-%d).txt}
fi
if [[ -n $OUT ]]; then
  mkdir -p "$(dirname "$OUT")" || exit 2
  exec > >(tee "$OUT") 2>&1   # everything below, stdout and stderr, on the terminal and in $OUT
  echo "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)'), host $(hostname), output in $OUT"
fi
if [[ $DRY == 0 ]]; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
fi

START=$SECONDS
PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} "$PY" bench/gpu_check.py $([[ $DRY == 1 ]] && echo --cpu-dry-run)
RC=$?
[[ $RC == 3 ]] && exit 3   # torch sees no CUDA device although the driver is there: say so, distinctly
FAILED=$(( RC != 0 ))

if [[ $PIPELINE == 1 ]]; then
  T0=$SECONDS
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
  LOG=$WORK/pipeline.log
  {
    git clone -q "$ROOT" "$WORK/repo" &&
    cd "$WORK/repo" &&
    if [[ ${GPU_CHECK_FULL:-0} != 1 ]]; then
      # the same stages on the same embedded data, fewer epochs and trials: the check is that it runs
      "$PY" - <<'EOF'
import yaml
p = yaml.safe_load(open("params.yaml"))
p.setdefault("pretrain", {})["epochs"] = 2
p.setdefault("train", {})["epochs"] = 2
t = p.setdefault("tune", {})
t.update(num_samples=2, epochs=1)
t.setdefault("scheduler", {})["grace_period"] = 1
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
EOF
    fi &&
    "$PY" - <<'EOF' &&
import yaml  # a trial's worker asks Ray for the GPU, as a GPU owner sets it (params.yaml has 0: CPU boxes)
p = yaml.safe_load(open("params.yaml"))
p.setdefault("tune", {}).setdefault("ray", {})["gpus_per_worker"] = 1.0
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
EOF
    PATH="$BIN:$PATH" PYTHONPATH="$WORK/repo" timeout "${GPU_CHECK_PIPELINE_TIMEOUT:-300}" "$BIN/dvc" repro &&
    PATH="$BIN:$PATH" "$BIN/dvc" metrics show
  } >"$LOG" 2>&1
  PRC=$?
  cd "$ROOT"
  if [[ $PRC == 0 ]]; then
    echo "PASS pipeline          dvc repro of the embedded default, CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES$([[ ${GPU_CHECK_FULL:-0} == 1 ]] || echo ', epochs cut'); $(grep -c "^Running stage" "$LOG") stages [$((SECONDS - T0)) s]"
    rm -rf "$WORK"
  else
    echo "FAIL pipeline          exit $PRC; last lines of $LOG:"; tail -n 15 "$LOG" | sed 's/^/    /'
    FAILED=1
  fi
fi

echo "gpu_check: $([[ $FAILED == 0 ]] && echo 'all checks passed' || echo 'FAILED') in $((SECONDS - START)) s"
exit $FAILED
