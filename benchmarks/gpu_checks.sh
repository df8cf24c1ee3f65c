#!/usr/bin/env bash
# The GPU checks of docs/GPU.md in one call, for a lent GPU with a short lease.
#
#   OUT=/tmp/gpu_out bash benchmarks/gpu_checks.sh [WHEEL_DIR]
#
# WHEEL_DIR (optional): wheels to install first with --no-index (megatron-core, Transformer
# Engine and its torch extension built for the machine's torch, where the image lacks them).
# Each check has its own time limit (540 s in all, inside one 600 s device command), so one that
# hangs does not take the others' time. Each writes its output to $OUT/<name>.out and .err; the
# rollout and LoRA summaries and the table of exit codes and seconds print last.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_checks.sh: no CUDA GPU visible to $PY" >&2
    exit 2
fi
if [ $# -ge 1 ]; then
    "$PY" -m pip install --quiet --no-index --no-deps "$1"/*.whl >"$OUT/install.log" 2>&1 ||
        echo "wheel install failed: see $OUT/install.log"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv >"$OUT/gpu.csv" 2>&1
"$PY" - >"$OUT/versions.json" 2>&1 <<'EOF'
import json, importlib.util, torch
te = None
if importlib.util.find_spec("transformer_engine"):
    import transformer_engine
    te = transformer_engine.__version__
import megatron.core
print(json.dumps({"torch": torch.__version__, "transformer_engine": te,
                  "megatron_core": megatron.core.__version__}))
EOF

# name, time limit (s), command
run() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"
    printf '%-24s rc=%-4s %4ss\n' "$name" "$?" "$((SECONDS - t0))" | tee -a "$OUT/summary.txt"
}

IMPL=$("$PY" -c "from rspo_mega.models.llada.spec import resolve_transformer_impl as r; print(r('auto'))")
ROLLOUT=(benchmarks/bench_rollout.py --model llada8b --layers 4 --impl "$IMPL" --dtype bfloat16
         --batch 32 --prompt 64 --gen 256 --block 32 --steps 128 --repeats 2)

run tests_gpu 130 "$PY" -m pytest -q tests/gpu --ignore=tests/gpu/test_gpu_lora.py
run lora_te 40 "$PY" -m pytest -q -s tests/gpu/test_gpu_lora.py
run bench_gpu 90 "$PY" benchmarks/bench_gpu.py --variants local_bf16,te_bf16,te_fp8
run rollout_dual 60 "$PY" "${ROLLOUT[@]}" --cache dual
run rollout_dual_thr 60 "$PY" "${ROLLOUT[@]}" --cache dual --threshold 0.9
run rollout_prefix 60 "$PY" "${ROLLOUT[@]}" --cache prefix
run train_step 100 "$PY" benchmarks/bench_train_step.py --sizes tiny,50m --cache none,dual \
    model.transformer_impl="$IMPL" model.params_dtype=bfloat16

"$PY" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
for name in ("rollout_dual", "rollout_dual_thr", "rollout_prefix"):
    try:
        d = json.load(open(os.path.join(out, name + ".out")))
    except (OSError, ValueError):
        print(f"{name}: no result")
        continue
    print(f"{name}: exact {d['exact']['tokens_per_s']} tok/s, {d['variant']['name']} "
          f"{d['variant']['tokens_per_s']} tok/s, speedup {d['speedup_vs_exact']}x, "
          f"agreement {d['token_agreement']:.3f}, cache {d['cache_bytes'] / 2**20:.0f} MiB")
try:  # LoRA on TE bf16 / FP8: one JSON line per case (tests/gpu/test_gpu_lora.py)
    lines = open(os.path.join(out, "lora_te.out")).read().splitlines()
except OSError:
    lines = []
cases = [json.loads(s[s.index("{"):]) for s in lines if '{"case"' in s]
for d in cases:
    print(f"lora {d['case']}: step 0 vs base {d['step0_vs_base']:.2e}, reference vs base "
          f"{d['reference_vs_base']:.2e}, merged vs adapted {d['merged_vs_adapted']:.2e}, "
          f"adapted vs base {d['adapted_vs_base']:.3f}, adapter grad norm "
          f"{d['adapter_grad_norm']:.3g}")
if not cases:
    print("lora_te: no result")
EOF
cat "$OUT/summary.txt"
