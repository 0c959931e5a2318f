#!/usr/bin/env bash
# Forward-pass tokens/s of slm and of transformers (f32, CPU, same ids, batch 16 x 128, logits at every
# position), alternating slm / transformers three times in one run so machine noise hits both. Prints a table
# with the ratio of medians.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh >/dev/null
py="$(bash scripts/reference/venv.sh)"
cargo build --release -q -p slm-benches --bin forward_tps -p slm-cli
hf="$root/out/bench-hf-f32"
[[ -f "$hf/model.safetensors" ]] || ./target/release/slm export models/SmolLM2-135M-Instruct.Q4_1.gguf --out "$hf" 2>/dev/null
args=(--batch "${BATCH:-16}" --seq "${SEQ:-128}" --iters "${ITERS:-5}")
log="$(mktemp)"
for round in 1 2 3; do
  ./target/release/forward_tps models/SmolLM2-135M-Instruct.Q4_1.gguf "${args[@]}" 2>/dev/null | tee -a "$log"
  "$py" scripts/reference/forward_tps.py "$hf" "${args[@]}" 2>/dev/null | tee -a "$log"
done
python3 - "$log" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
med = {k: statistics.median(r["tokens_per_s"] for r in rows if r["impl"] == k) for k in ("slm", "transformers")}
print(f"\n| impl | median tokens/s (3 rounds) |\n|---|---|")
for k, v in med.items():
    print(f"| {k} | {v:.0f} |")
print(f"\nratio slm / transformers = {med['slm'] / med['transformers']:.2f}x")
PY
