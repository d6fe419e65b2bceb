#!/usr/bin/env bash
# One short GPU check (issue 4's leftovers), for a lent H100/H200 with no network:
#   (a) bench/train.py in-process: plain torch loop against our DeepSpeed path (pipelines/training/loop.py's
#       build_engines + train_step, one rank, nccl), preset paper at 1024², batch 4, activation checkpointing on;
#   (b) bench/decode.py, InfGen decoder only (the stock one needs diffusers), preset paper.
# Run from the repository root with the wheels in .whl/ (deepspeed built with DS_BUILD_OPS=0, hjson,
# pydantic + pydantic-core (cp312) + annotated-types + typing-inspection + typing-extensions, lpips):
#   bash bench/gpu_check.sh          # device tool: carry [".whl"]; about 3 minutes, 7 at most
# Reports and logs go to $OUT (default: runs/gpu_check). Parts never abort each other.
set -u
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
START=$SECONDS
left() { echo $((420 - (SECONDS - START))); }  # seconds left of a 7-minute whole

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DS_ACCELERATOR=cuda NCCL_DEBUG=WARN \
  TORCH_EXTENSIONS_DIR=/tmp/torch_extensions NO_ALBUMENTATIONS_UPDATE=1

if [ -d .whl ]; then
  timeout 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || echo "FAILED: wheel install"
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "no .whl/ here: using what is installed" && export PYTHONPATH=$PWD
fi

{
  nvidia-smi -L
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader
  timeout 60 "$PY" - <<'EOF'
import importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "deepspeed", "pydantic", "pydantic_core", "hjson", "typing_extensions",
             "annotated_types", "typing_inspection", "lpips", "numpy"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} MISSING")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(), torch.cuda.get_device_name())
print("nccl", torch.cuda.nccl.version(), "distributed nccl", torch.distributed.is_nccl_available())
try:
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    print("deepspeed imports; accelerator", get_accelerator()._name,
          "comm backend", get_accelerator().communication_backend_name())
except Exception as error:
    print("FAILED: import deepspeed:", type(error).__name__, error)
EOF
} 2>&1 | tee "$OUT/env.txt"

# (a) plain vs DeepSpeed training step: paper@1024², batch 4, checkpointing on (as the stage1 preset)
TRAIN=(bench/train.py --device cuda --engines both --checkpointing on --batch 4 --steps 6 --warmup 2)
echo "== (a) ${TRAIN[*]}"
timeout 210 "$PY" "${TRAIN[@]}" --output "$OUT/train-gpu.md" > "$OUT/train-gpu.log" 2>&1 \
  || echo "FAILED or partial: bench/train.py (exit $?), see train-gpu.log"
tail -n 15 "$OUT/train-gpu.log"

# (b) decoder throughput, InfGen only (its query path changed since the last GPU run)
echo "== (b) bench/decode.py"
budget=$(left); [ "$budget" -gt 150 ] && budget=150; [ "$budget" -lt 30 ] && budget=30
timeout "$budget" "$PY" bench/decode.py --device cuda --presets paper \
  --decoders infgen --repeats 3 --budget-seconds 30 --output "$OUT/decode-gpu.md" > "$OUT/decode-gpu.log" 2>&1 \
  || echo "FAILED: bench/decode.py (exit $?), see decode-gpu.log"
tail -n 12 "$OUT/decode-gpu.log"

# (a') only if DeepSpeed failed on nccl in (a) and time is left: the same DeepSpeed step on gloo
if grep -q "FAILED" "$OUT/train-gpu.md" 2>/dev/null \
  && grep -qiE "nccl.*(error|fail|warn)|(error|fail).*nccl" "$OUT/train-gpu.log" \
  && [ "$(left)" -gt 100 ]; then
  echo "== (a') DeepSpeed on gloo"
  timeout "$(( $(left) - 10 ))" "$PY" bench/train.py --device cuda --engines deepspeed --checkpointing on \
    --batch 4 --steps 6 --warmup 2 --dist-backend gloo --output "$OUT/train-gpu-gloo.md" \
    > "$OUT/train-gpu-gloo.log" 2>&1 || echo "FAILED: DeepSpeed on gloo (exit $?)"
  tail -n 12 "$OUT/train-gpu-gloo.log"
fi
echo "== done in $((SECONDS - START)) s; reports in $OUT"
