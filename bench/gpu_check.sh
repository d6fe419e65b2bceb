#!/usr/bin/env bash
# One GPU check in under 10 minutes (issue 15), for one lent H100/H200 with no network. Parts, in order:
#   (e) the evaluation's scorer on CUDA without Ray: InfGen, the stock decoder, Inception and LPIPS on the GPU,
#       chunks of a latent file scored, and LPIPS fed host-built images (the bug this issue fixed);
#   (d) bench/decode.py, InfGen `paper` at 1024², 2048², 4096² (targets: 2048² ≤ 0.3 s, 4096² ≤ 1.0 s),
#       then 2048² and 4096² again with the speed levers off (64-cell tiles, NCHW), the before/after;
#   (t) bench/train.py: plain torch against our DeepSpeed step, `paper` at 1024², batch 4, checkpointing on;
#   (w) the reduced demo workflow (bench/gpu_demo.yaml: ingest, latents, two training stages, evaluation)
#       end to end on CUDA with the time that is left. It needs the pipeline extra (ray, mlflow, img2dataset,
#       deepspeed, diffusers, lpips); where ray or another is missing it says which and is skipped. The
#       device tool's image has none of them and Ray's wheel alone is over its 64 MiB carry limit, so there
#       (w) runs only on a machine set up with `make setup`.
# Run from the repository root:
#   bash bench/gpu_check.sh          # device tool: carry [".whl"] (deepspeed with DS_BUILD_OPS=0, hjson,
#                                    # pydantic + pydantic-core (cp312) + annotated-types + typing-inspection +
#                                    # typing-extensions, lpips; diffusers + importlib_metadata for (e): the
#                                    # embedded substitute VAE is a diffusers AutoencoderKL)
# Reports and logs go to $OUT (default /tmp/gpu_check), at most 8 files. Parts never abort each other; each
# has its own timeout inside a 570-second whole.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
START=$SECONDS
TOTAL=570
left() { echo $((TOTAL - (SECONDS - START))); }
# A part's timeout: its own cap, or what is left of the whole less a reserve for the parts after it.
cap() { local budget=$(($(left) - $2)); [ "$budget" -gt "$1" ] && budget=$1; [ "$budget" -lt 20 ] && budget=20
        echo "$budget"; }

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DS_ACCELERATOR=cuda NCCL_DEBUG=WARN RAY_AUTH_MODE=disabled \
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
for name in ("torch", "deepspeed", "ray", "mlflow", "img2dataset", "diffusers", "lpips", "pydantic", "numpy"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} MISSING")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(), torch.cuda.get_device_name())
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# (e) the evaluation's device handling on CUDA, no Ray: the scorer as a GPU actor builds it (device "cuda")
echo "== (e) evaluation scorer on CUDA"
timeout "$(cap 90 400)" "$PY" - > "$OUT/eval-gpu.log" 2>&1 <<'EOF' || echo "FAILED: (e) evaluation on CUDA (exit $?)"
import tempfile, time
import numpy as np, torch
import infgen
from infgen.devices import module_device
from pipelines.evaluation.chunks import Unit, plan_chunks
from pipelines.evaluation.config import EMBEDDED
from pipelines.evaluation.scoring import ChunkScorer, full_reference, load_part, scoring_modules

root = tempfile.mkdtemp()
decoder = infgen.save(infgen.InfGen(infgen.preset("tiny", in_distribution_scale=2.0)), f"{root}/decoder")
np.save(f"{root}/dit.npy", np.random.default_rng(1).standard_normal((8, 4, 8, 8)).astype(np.float32))
sizes = ((64, 64), (256, 256))
chunks = plan_chunks(f"{root}/eval", sizes, 8, lambda size: [Unit("dit", 8, file=f"{root}/dit.npy")])
scorer = ChunkScorer(EMBEDDED.at_input_side(32), str(decoder), None, 32, chunks, threads=8, device="cuda")
devices = {name: str(module_device(module)) for name, module in scoring_modules(scorer.models).items()}
print("models on", devices)
assert all(device.startswith("cuda") for device in devices.values()), devices
for index, chunk in enumerate(chunks):
    started = time.perf_counter()
    scorer({"index": np.array([index])})
    groups, meta = load_part(chunk.part)
    print(f"chunk {chunk.size}: {time.perf_counter() - started:.2f} s, meta {meta}, "
          f"infgen pool finite: {bool(np.isfinite(groups['infgen']['pool']).all())}")
images = [np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8) for seed in range(4)]
scores = full_reference(images, images[::-1], scorer.models["lpips"])
print("LPIPS of host images on", devices["lpips"], scores["lpips"])
assert np.isfinite(scores["lpips"]).all()
print("PASS: evaluation scorer on CUDA")
EOF
tail -n 8 "$OUT/eval-gpu.log"

# (d) decoder speed, InfGen `paper` only (the stock decoder needs diffusers)
echo "== (d) bench/decode.py"
timeout "$(cap 150 300)" "$PY" bench/decode.py --device cuda --presets paper --decoders infgen \
  --sizes 1024 2048 4096 --repeats 5 --budget-seconds 30 --output "$OUT/decode-gpu.md" \
  > "$OUT/decode-gpu.log" 2>&1 || echo "FAILED: bench/decode.py (exit $?), see decode-gpu.log"
tail -n 12 "$OUT/decode-gpu.log"
# the same with the levers off (64-cell tiles, NCHW weights: the defaults before issue 15), for the before/after
timeout "$(cap 90 300)" "$PY" bench/decode.py --device cuda --presets paper --decoders infgen \
  --sizes 2048 4096 --repeats 5 --budget-seconds 30 --tile-cells 64 --no-channels-last \
  --output "$OUT/decode-gpu-levers-off.md" >> "$OUT/decode-gpu.log" 2>&1 \
  || echo "FAILED: bench/decode.py with the levers off (exit $?)"
tail -n 6 "$OUT/decode-gpu-levers-off.md" 2>/dev/null

# (t) plain vs DeepSpeed training step: paper@1024², batch 4, checkpointing on (as the stage1 preset)
echo "== (t) bench/train.py"
timeout "$(cap 180 150)" "$PY" bench/train.py --device cuda --engines both --checkpointing on --batch 4 \
  --steps 6 --warmup 2 --output "$OUT/train-gpu.md" > "$OUT/train-gpu.log" 2>&1 \
  || echo "FAILED or partial: bench/train.py (exit $?), see train-gpu.log"
tail -n 15 "$OUT/train-gpu.log"

# (w) the reduced demo workflow on CUDA, with what is left
echo "== (w) infgen run bench/gpu_demo.yaml"
missing=$("$PY" - <<'EOF'
import importlib.util
print(" ".join(name for name in ("ray", "mlflow", "img2dataset", "deepspeed", "diffusers", "lpips")
               if importlib.util.find_spec(name) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "SKIPPED: (w) needs the pipeline extra; missing here: $missing" | tee "$OUT/workflow.log"
else
  rm -rf runs/gpu_demo
  timeout "$(cap 400 5)" "$PY" -m jobs.cli run bench/gpu_demo.yaml > "$OUT/workflow.log" 2>&1 \
    && echo "PASS: (w) gpu_demo workflow" || echo "FAILED: (w) gpu_demo workflow (exit $?), see workflow.log"
  tail -n 20 "$OUT/workflow.log"
  # The scorer records the device it ran on in each part file's meta.
  timeout 60 "$PY" - <<'EOF' 2>&1 | tee -a "$OUT/workflow.log"
import collections, glob
from pipelines.evaluation.scoring import load_part
parts = glob.glob("runs/gpu_demo/evaluate/parts/*/*/*.npz")
print("evaluation part files by device:", dict(collections.Counter(load_part(p)[1]["device"] for p in parts)))
EOF
fi
echo "== done in $((SECONDS - START)) s; reports in $OUT"
