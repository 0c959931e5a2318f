#!/usr/bin/env bash
# One prepared check of the CUDA build on a GPU machine that has a driver and CUDA 13 libraries but no Rust and no
# network. It uses only what scripts/build_cuda.sh --tests packed here (out/gpu-bundle/: the release `slm` and the
# golden test executables, built with `--features cuda`) and the default model in models/. Each step runs on cuda
# and on the CPU and the two are compared:
#   1. the golden logits test (transformers, within 1e-3) and the golden lm-eval tests (per-document acc/acc_norm
#      identical, log-likelihoods within 2e-3) on cuda;
#   2. slm depth --method slm-dp (13 layers), slm width --importance element1 (20%), slm lora (20 steps): the depth
#      plan and the width plan equal to the CPU's, the LoRA loss curve within 1e-3 of the CPU's;
#   3. slm eval --tasks avg7 --limit 200 on cuda (and the seven tasks in full when TIME_LEFT allows);
#   4. slm bench on the dense and the depth-pruned model, cuda and CPU.
# It writes gpu_check.log and gpu_check.json (each step's wall seconds on each device, the comparisons, the
# numbers) to $OUT (default out/gpu-check). Exit status 0 only when every comparison holds.
#
# Env: OUT, MODEL (models/SmolLM2-135M-Instruct.Q4_1.gguf), BUNDLE (out/gpu-bundle), FULL=0 (skip the full
#      seven-task suite), BUDGET_S (420: the seconds after which the optional steps are skipped), LIMIT (200),
#      LORA_STEPS (20), DEVICE (cuda; `DEVICE=cpu LIMIT=10 LORA_STEPS=2 FULL=0` is a dry run of the script itself on
#      a machine with no GPU).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-$root/out/gpu-check}"
mkdir -p "$out"
bundle="${BUNDLE:-$root/out/gpu-bundle}"
model="${MODEL:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
budget="${BUDGET_S:-420}"
gpu="${DEVICE:-cuda}"
limit="${LIMIT:-200}"
lora_steps="${LORA_STEPS:-20}"
log="$out/gpu_check.log"
: > "$log"
start=$SECONDS
say() { echo "gpu_check [$((SECONDS - start))s]: $*" | tee -a "$log" >&2; }

# Sent in pieces (scripts/build_cuda.sh --tests writes .gpu-send/): join and unpack them once, checked.
send="$root/.gpu-send"
if [[ ! -x "$bundle/bin/slm" && -f "$send/MANIFEST" ]]; then
  read -r _ parts _ sum < "$send/MANIFEST"
  have="$(ls "$send"/part-* 2>/dev/null | wc -l)"
  [[ "$have" == "$parts" ]] || { say "$send holds $have of $parts pieces"; exit 1; }
  [[ "$(cat "$send"/part-* | sha256sum | cut -d' ' -f1)" == "$sum" ]] || { say "$send: sha256 differs"; exit 1; }
  cat "$send"/part-* | xz -d | tar -x -C "$root" || { say "cannot unpack $send"; exit 1; }
fi
for f in "$bundle/bin/slm" "$bundle/bin/golden_logits" "$bundle/bin/golden_lm_eval" "$model"; do
  [[ -e "$f" ]] || { say "missing $f (run scripts/build_cuda.sh --tests and scripts/setup.sh first)"; exit 1; }
done
chmod +x "$bundle"/bin/*

# CUDA libraries: the toolkit's, else the Python wheels' (nvidia-cublas, nvidia-cuda-runtime, ...), else the system's.
libdirs=""
for d in ${CUDA_HOME:+$CUDA_HOME/lib64 $CUDA_HOME/lib} /usr/local/cuda/lib64 \
  $(python3 -c 'import glob, site, sys
for p in site.getsitepackages() + [site.getusersitepackages()]:
    for d in glob.glob(p + "/nvidia/*/lib") + glob.glob(p + "/nvidia/cu*/lib"):
        print(d)' 2>/dev/null); do
  [[ -d "$d" ]] && libdirs="$libdirs:$d"
done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
missing="$(ldd "$bundle/bin/slm" | grep 'not found' || true)"
[[ -z "$missing" ]] || { say "libraries not found: $missing"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$log" >&2
slm="$bundle/bin/slm"
export SLM_WORKSPACE="$root" RUST_LOG="${RUST_LOG:-info}"
results="$out/steps.jsonl"
: > "$results"

# step NAME DEVICE CMD...: runs CMD, records its wall seconds and exit status.
step() {
  local name="$1" dev="$2"; shift 2
  local t0=$SECONDS rc
  say "$name on $dev: $*"
  "$@" >> "$log" 2>&1
  rc=$?
  echo "{\"step\": \"$name\", \"device\": \"$dev\", \"wall_s\": $((SECONDS - t0)), \"rc\": $rc}" >> "$results"
  [[ $rc -eq 0 ]] || say "$name on $dev FAILED (exit $rc)"
  return $rc
}
time_left() { (( SECONDS - start < budget )); }

# 1. golden tests on cuda (the test executables take the device from SLM_TEST_DEVICE)
SLM_TEST_DEVICE=$gpu step golden_logits "$gpu" "$bundle/bin/golden_logits" --exact gguf_logits_and_token_ids_match_transformers --nocapture
SLM_TEST_DEVICE=$gpu step golden_lm_eval "$gpu" "$bundle/bin/golden_lm_eval" --test-threads 1 --skip gemma3 _matches_lm_eval --nocapture

# 2. depth, width, LoRA on both devices (outputs named gpu-* and cpu-*, whatever DEVICE is)
w="$out/work"
rm -rf "$w" && mkdir -p "$w"
for side in gpu cpu; do
  dev="$gpu" && [[ $side == cpu ]] && dev=cpu
  step depth_slm_dp "$dev" "$slm" --device "$dev" depth "$model" --method slm-dp --target-layers 13 --out "$w/depth-$side"
  step width_element1 "$dev" "$slm" --device "$dev" width "$model" --importance element1 --pruning-ratio 0.2 --out "$w/width-$side"
  step lora "$dev" "$slm" --device "$dev" lora "$w/depth-$side" --max-steps "$lora_steps" --out "$w/lora-$side"
done

# 3. evaluation (CPU: the same documents, for the acc comparison and the wall-time ratio)
for side in gpu cpu; do
  dev="$gpu" && [[ $side == cpu ]] && dev=cpu
  step eval_avg7 "$dev" "$slm" --device "$dev" eval "$model" --tasks avg7 --limit "$limit" --output-path "$w/eval-$side.json"
done
if [[ "${FULL:-1}" != 0 ]] && time_left; then
  step eval_avg7_full "$gpu" "$slm" --device "$gpu" eval "$model" --tasks avg7 --output-path "$w/eval-full-gpu.json"
fi

# 4. bench: dense against the depth-pruned model (the CPU's only while time is left)
for side in gpu cpu; do
  dev="$gpu" && [[ $side == cpu ]] && dev=cpu
  [[ $side == gpu ]] || time_left || break
  step bench "$dev" "$slm" --device "$dev" bench "$model" --compare "$w/depth-$side" --json "$w/bench-$side.json"
done

# ---- comparisons and the results JSON ----
python3 - "$w" "$results" "$out/gpu_check.json" <<'PY' 2>&1 | tee -a "$log"
import json, sys, pathlib
w, steps_file, dest = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
gpu = "gpu"
steps = [json.loads(l) for l in open(steps_file)]
checks = {}

def load(p):
    try:
        return json.loads(pathlib.Path(p).read_text())
    except Exception as e:
        return None

for name, rel, key in [("depth plan equal", "depth-{}/slm_plan.json", "kept_layers"),
                       ("width plan equal", "width-{}/slm_plan.json", "plan")]:
    a, b = load(w / rel.format(gpu)), load(w / rel.format("cpu"))
    checks[name] = bool(a and b and a.get(key) == b.get(key))
la, lb = load(w / f"lora-{gpu}/slm_lora.json"), load(w / "lora-cpu/slm_lora.json")
if la and lb:
    ca = [s["loss"] for s in la["report"]["history"]]
    cb = [s["loss"] for s in lb["report"]["history"]]
    worst = max((abs(x - y) for x, y in zip(ca, cb)), default=float("inf"))
    checks["lora loss curve within 1e-3"] = len(ca) == len(cb) > 0 and worst <= 1e-3
    checks["lora worst |loss gpu - cpu|"] = worst
    checks["lora tokens/s gpu, cpu"] = [la["report"]["tokens_per_s"], lb["report"]["tokens_per_s"]]
else:
    checks["lora loss curve within 1e-3"] = False
ea, eb = load(w / f"eval-{gpu}.json"), load(w / "eval-cpu.json")
if ea and eb:
    same = True
    for task, r in eb["results"].items():
        for m in ("acc,none", "acc_norm,none"):
            if m in r and ea["results"].get(task, {}).get(m) != r[m]:
                same = False
    checks["eval avg7 --limit: acc/acc_norm equal to cpu"] = same
    checks["eval throughput"] = ea.get("throughput")
else:
    checks["eval avg7 --limit: acc/acc_norm equal to cpu"] = False
full = load(w / f"eval-full-{gpu}.json")
if full:
    checks["eval avg7 full: throughput"] = full.get("throughput")
for dev in (gpu, "cpu"):
    b = load(w / f"bench-{dev}.json")
    if b:
        checks[f"bench {dev}"] = b
ok = all(v for k, v in checks.items() if isinstance(v, bool)) and all(s["rc"] == 0 for s in steps)
report = {"ok": ok, "steps": steps, "checks": checks}
pathlib.Path(dest).write_text(json.dumps(report, indent=2))
for s in steps:
    print(f"{s['step']:>16} {s['device']:>5} {s['wall_s']:>5} s  exit {s['rc']}")
for k, v in checks.items():
    if not isinstance(v, (dict, list)) or k.startswith("lora tokens"):
        print(f"{k}: {v}")
print("gpu_check:", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY
