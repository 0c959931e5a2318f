#!/usr/bin/env bash
# Every command on a synthetic Llama-2-7B (bf16, about 13.5 GB) and then Llama-2-13B (about 26 GB, more than this
# machine's RAM): wall time, peak RSS and peak anonymous memory (scripts/peakmem.py), each as a ratio to the bf16
# model size. One synthetic model and one output exist at a time; each output is deleted once measured.
#   SIZES="7b 13b" WORK=/tmp/slm-scale bash scripts/bench_scale.sh
# Commands (issue 15): inspect; eval (boolq --limit 4, wikitext2-128 --limit 2; 7B only); depth shortgpt and
# slm-dp (--target-layers a third, calibration 8 x 64); similarity (8 x 64); width (element1 --target-ratio 0.2,
# calibration 4 x 64); lora (--max-steps 2 --cutoff 64; 7B only); export.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cargo build --release -q -p slm-cli || exit 1
slm="$root/target/release/slm"
work="${WORK:-/tmp/slm-scale}"
sizes="${SIZES:-7b 13b}"
steps="${STEPS:-inspect eval depth-shortgpt depth-slm-dp similarity width lora export}"
log="$work/bench_scale.jsonl"
mkdir -p "$work"
: > "$log"
measure() { python3 scripts/peakmem.py "$@" | tee -a "$log"; }
for size in $sizes; do
  model="$work/synth-$size"
  out="$work/out"
  rm -rf "$out"
  [[ -f "$model/config.json" ]] || measure "$size synth" -- "$slm" synth --preset "llama2-$size" --out "$model"
  layers="$(python3 -c "import json; print(json.load(open('$model/config.json'))['num_hidden_layers'])")"
  third=$(( layers / 3 ))
  for step in $steps; do
    case "$step" in
      inspect) measure "$size inspect" -- "$slm" inspect "$model" ;;
      eval)
        [[ "$size" == 7b ]] || continue
        measure "$size eval" -- "$slm" eval "$model" --tasks boolq,wikitext2-128 --limit 4 --batch-size 4 ;;
      depth-shortgpt) measure "$size depth shortgpt" -- "$slm" depth "$model" --method shortgpt --target-layers "$third" --samples 8 --seq-len 64 --out "$out" ;;
      depth-slm-dp) measure "$size depth slm-dp" -- "$slm" depth "$model" --method slm-dp --target-layers "$third" --samples 8 --seq-len 64 --out "$out" ;;
      similarity) measure "$size similarity" -- "$slm" similarity "$model" --samples 8 --seq-len 64 --out "$out" ;;
      width) measure "$size width element1" -- "$slm" width "$model" --importance element1 --target-ratio 0.2 --samples 4 --seq-len 64 --out "$out" ;;
      lora)
        [[ "$size" == 7b ]] || continue
        measure "$size lora" -- "$slm" lora "$model" --data data/lambada_openai.test.jsonl --max-steps 2 --cutoff 64 --batch-size 2 --micro-batch-size 2 --val-size 0 --out "$out" ;;
      export) measure "$size export" -- "$slm" export "$model" --out "$out" ;;
    esac
    rm -rf "$out"
  done
  bytes="$(du -sb "$model" | cut -f1)"
  echo "{\"label\": \"$size model bytes\", \"bytes\": $bytes}" >> "$log"
  [[ "${KEEP:-0}" == 1 ]] || rm -rf "$model"
done
python3 - "$log" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
size = {r["label"].split()[0]: r["bytes"] / 2**30 for r in rows if "bytes" in r}
print("\n| command | rc | wall s | peak RSS GiB | peak anon GiB | RSS / bf16 size | anon / bf16 size |\n|---|---|---|---|---|---|---|")
for r in rows:
    if "bytes" in r:
        continue
    s = size.get(r["label"].split()[0], float("nan"))
    print(f"| {r['label']} | {r['rc']} | {r['wall_s']} | {r['peak_rss_gib']} | {r['peak_anon_gib']} | "
          f"{r['peak_rss_gib'] / s:.2f} | {r['peak_anon_gib'] / s:.2f} |")
print("\nbf16 model sizes (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in size.items()))
PY
