#!/usr/bin/env bash
# LoRA training tokens/s of slm and of PEFT + PyTorch (f32, CPU) in the same configuration: the same HF model
# directory, r/alpha/dropout, sequence length, micro-batch (one optimiser step per micro-batch), steps, data
# (LAMBADA windows), AdamW and clipping. Alternates slm / PEFT three times in one run so machine noise hits both,
# and prints the medians, their ratio and each side's peak RSS (/usr/bin/time). Both exclude the first step. Run on an otherwise idle machine.
#   MODEL=out/d-slm-35 STEPS=6 SEQ=256 MICRO=4 RANK=8 bash scripts/bench_lora.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="$(bash scripts/reference/venv.sh)"
cargo build --release -q -p slm-cli
model="${MODEL:-out/d-slm-35}"
if [[ ! -f "$model/config.json" ]]; then
  model="out/bench-hf-f32"
  [[ -f "$model/model.safetensors" ]] || ./target/release/slm export models/SmolLM2-135M-Instruct.Q4_1.gguf --out "$model" 2>/dev/null
fi
steps="${STEPS:-6}" seq="${SEQ:-256}" micro="${MICRO:-4}" rank="${RANK:-8}" alpha="${ALPHA:-16}" dropout="${DROPOUT:-0.05}"
data="data/lambada_openai.test.jsonl"
log="$(mktemp)"
tmp="$(mktemp -d)"
echo "model $model, r $rank, alpha $alpha, dropout $dropout, seq $seq, micro-batch $micro, $steps steps per run"
for round in 1 2 3; do
  /usr/bin/time -f "%M" -o "$tmp/rss" ./target/release/slm lora "$model" --data "$data" --out "$tmp/a" --cutoff "$seq" --batch-size "$micro" \
    --micro-batch-size "$micro" --max-steps "$steps" --val-size 0 --warmup-steps 0 --rank "$rank" --alpha "$alpha" \
    --dropout "$dropout" >/dev/null 2>&1
  python3 - "$tmp/a/slm_lora.json" "$tmp/rss" <<'PY' | tee -a "$log"
import json, sys
h = json.load(open(sys.argv[1]))["report"]["history"]
tok = h[-1]["tokens"] - h[0]["tokens"]; sec = h[-1]["seconds"] - h[0]["seconds"]
rss = int(open(sys.argv[2]).read().split()[-1])
print(json.dumps({"impl": "slm", "steps": len(h), "last_loss": round(h[-1]["loss"], 4), "tokens_per_s": round(tok / sec, 1), "peak_rss_kib": rss}))
PY
  /usr/bin/time -f "%M" -o "$tmp/rss" "$py" scripts/reference/peft_train_tps.py "$model" --data "$data" \
    --rank "$rank" --alpha "$alpha" --dropout "$dropout" --seq "$seq" --micro-batch "$micro" --steps "$steps" \
    2>/dev/null > "$tmp/peft.json"
  python3 - "$tmp/peft.json" "$tmp/rss" <<'PY' | tee -a "$log"
import json, sys
row = json.loads([l for l in open(sys.argv[1]) if l.startswith("{")][-1])
row["peak_rss_kib"] = int(open(sys.argv[2]).read().split()[-1])
print(json.dumps(row))
PY
done
rm -rf "$tmp"
python3 - "$log" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
med = {k: statistics.median(r["tokens_per_s"] for r in rows if r["impl"] == k) for k in ("slm", "peft")}
peak = {k: max(r["peak_rss_kib"] for r in rows if r["impl"] == k) for k in ("slm", "peft")}
print(f"\n| impl | median training tokens/s (3 rounds) | peak RSS (MiB) |\n|---|---|---|")
for k, v in med.items():
    print(f"| {k} | {v:.0f} | {peak[k] / 1024:.0f} |")
print(f"\nratio slm / PEFT = {med['slm'] / med['peft']:.2f}x")
PY
