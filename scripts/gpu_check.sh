#!/usr/bin/env bash
# `make bench-gpu` / one device call: GPU first contact (src/bench_gpu.py), self-installing.
#
#   bash scripts/gpu_check.sh [OUT_DIR] [extra src.bench_gpu args...]
#
# On the device machine (its own Python 3.12 + torch 2.11, no registry): installs the wheels of .whl/
# (scripts/fetch_gpu_wheels.sh, run beforehand where a registry is reachable; the device call carries .whl)
# into /tmp/site without touching its torch, then runs every part and prints the table last. The report
# (bench_gpu.json, bench_gpu.md) and the log go to OUT_DIR (default $OUT when set, else outputs/bench_gpu);
# run folders and checkpoints to a scratch folder, so only a few files come back from $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-outputs/bench_gpu}}"
shift || true
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" - <<'PY' 2>&1 | tee "$OUT_DIR/env.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for m in ("hydra", "omegaconf", "diffusers", "transformers", "peft", "lightning", "webdataset", "streaming", "wandb"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:  # reported, the bench says which part it breaks
        print(m, "NOT IMPORTABLE:", type(e).__name__, e)
PY
DEVICE="${DEVICE:-$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
SIZE="${SIZE:-$([ "$DEVICE" = cuda ] && echo full || echo tiny)}"
"$PY" -m src.bench_gpu --device "$DEVICE" --size "$SIZE" --out "$OUT_DIR" --work "${WORK:-/tmp/bench_gpu_work}" "$@" \
  2>&1 | tee "$OUT_DIR/log.txt"
