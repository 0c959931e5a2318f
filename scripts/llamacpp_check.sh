#!/usr/bin/env bash
# Reference check of slm's GGUF exports against llama.cpp itself (issue 19; a script, not a test): for each model
# (dense, ShortGPT-13, slm-dp-13, LLM-Pruner element1 at 20% and 35% of the parameters, each with and without
# `--round-to 64`) and each type (f32, f16, q8_0): `slm export` writes the GGUF; llama.cpp (node-llama-cpp 3.22.1,
# prebuilt, see scripts/reference/llamacpp_setup.sh) loads it and gives the logits of every position of the four
# golden prompts (f32 KV cache), compared with slm's logits of the same file (`slm logits`) and of the source
# model; then llama.cpp's prompt and decode tokens/s at batch 1 (128-token prompt, 128 new tokens, 2 threads,
# median of RUNS) and the file size, beside `slm bench` (f32) of the same model. Prints a Markdown table, also
# written to $WORK/report.md. Steps whose output exists are kept.
#
# Env: WORK (out/llamacpp-check), SLM_BIN (target/release/slm), PARTS ("logits timing"), RUNS (3),
#      MODELS (names among: dense shortgpt-13 slm-dp-13 element1-0.2 element1-0.2-r64 element1-0.35
#      element1-0.35-r64), TYPES ("f32 f16 q8_0"). Timing wants an idle machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
work="${WORK:-$root/out/llamacpp-check}" slm="${SLM_BIN:-$root/target/release/slm}"
parts="${PARTS:-logits timing}" runs="${RUNS:-3}" types="${TYPES:-f32 f16 q8_0}"
models="${MODELS:-dense shortgpt-13 slm-dp-13 element1-0.2 element1-0.2-r64 element1-0.35 element1-0.35-r64}"
base="${SLM_MODEL:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
bash scripts/setup.sh >/dev/null
bash scripts/reference/llamacpp_setup.sh >/dev/null
[[ -n "${SLM_BIN:-}" ]] || cargo build --release -q -p slm-cli
lc() { node "$root/scripts/reference/llamacpp.mjs" "$@"; }
mkdir -p "$work/gguf" "$work/logits" "$work/timing"

source_of() { # NAME -> the slm model (built when missing)
  local n=$1 dir="$work/$1"
  case $n in
    dense) echo "$base"; return ;;
    shortgpt-13) [[ -f $dir/slm_plan.json ]] || "$slm" depth "$base" --method shortgpt --target-layers 13 --out "$dir" >&2 ;;
    slm-dp-13) [[ -f $dir/slm_plan.json ]] || "$slm" depth "$base" --method slm-dp --target-layers 13 --out "$dir" >&2 ;;
    element1-*-r64) local t=${n#element1-}; t=${t%-r64}
      [[ -f $dir/slm_plan.json ]] || "$slm" width "$base" --target-ratio "$t" --round-to 64 --out "$dir" >&2 ;;
    element1-*) [[ -f $dir/slm_plan.json ]] || "$slm" width "$base" --target-ratio "${n#element1-}" --out "$dir" >&2 ;;
    *) echo "unknown model $n" >&2; exit 2 ;;
  esac
  echo "$dir"
}

prompts=$(python3 -c "import json; [print(json.dumps(p['ids'])) for p in json.load(open('golden/smollm2_logits.json'))['prompts']]")
for n in $models; do
  src=$(source_of "$n")
  for t in $types; do
    g="$work/gguf/$n-$t.gguf"
    [[ -f $g ]] || "$slm" export "$src" --out "$g" --outtype "$t" >&2
    if [[ " $parts " == *" logits "* && ! -f $work/logits/$n-$t.json ]]; then
      k=0 rows=()
      while read -r ids; do
        p="$work/logits/$n-$t-p$k"
        "$slm" logits "$g" --ids "$ids" --out "$p.slm-gguf.npy" >/dev/null 2>&1
        [[ -f $p.slm-src.npy ]] || "$slm" logits "$src" --ids "$ids" --out "$p.slm-src.npy" >/dev/null 2>&1
        lc logits "$g" "$ids" "$p.llamacpp.npy" --kv-f32
        rows+=("{\"same_file\": $(lc compare "$p.llamacpp.npy" "$p.slm-gguf.npy"), \"vs_source\": $(lc compare "$p.llamacpp.npy" "$p.slm-src.npy")}")
        k=$((k + 1))
      done <<< "$prompts"
      (IFS=,; echo "[${rows[*]}]") > "$work/logits/$n-$t.json"
      rm -f "$work/logits/$n-$t"-p*.npy
    fi
    if [[ " $parts " == *" timing "* && ! -f $work/timing/$n-$t.json ]]; then
      for _ in $(seq "$runs"); do
        /usr/bin/time -f "%M" -o "$work/timing/$n-$t.rss" node "$root/scripts/reference/llamacpp.mjs" timing "$g" \
          --prompt 128 --gen 128 --threads 2
      done > "$work/timing/$n-$t.jsonl"
      mv "$work/timing/$n-$t.jsonl" "$work/timing/$n-$t.json"
    fi
  done
  if [[ " $parts " == *" timing "* && ! -f $work/timing/$n-slm.json ]]; then
    "$slm" bench "$src" --prompt-tokens 128 --new-tokens 128 --runs "$runs" --json "$work/timing/$n-slm.json" >/dev/null
  fi
done

python3 - "$work" "$models" "$types" <<'PY' | tee "$work/report.md"
import json, os, statistics, sys
work, models, types = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
def load(p):
    return json.load(open(p)) if os.path.exists(p) else None
print("| model | type | GGUF MiB | max abs diff llama.cpp vs slm, same file | argmax agree | max abs diff vs slm f32 source | llama.cpp prompt tok/s | llama.cpp decode tok/s | llama.cpp peak RSS MiB | slm prompt tok/s | slm decode tok/s | slm peak RSS MiB |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for n in models:
    sb = load(f"{work}/timing/{n}-slm.json")
    sr = (sb.get("results") or [sb])[0] if sb else None
    for t in types:
        g = f"{work}/gguf/{n}-{t}.gguf"
        size = f"{os.path.getsize(g) / 2**20:.1f}" if os.path.exists(g) else ""
        lg = load(f"{work}/logits/{n}-{t}.json")
        same = f"{max(r['same_file']['max_abs_diff'] for r in lg):.2e}" if lg else ""
        agree = f"{statistics.mean(r['same_file']['argmax_agreement'] for r in lg):.3f}" if lg else ""
        src = f"{max(r['vs_source']['max_abs_diff'] for r in lg):.3f}" if lg else ""
        tm = None
        if os.path.exists(f"{work}/timing/{n}-{t}.json"):
            tm = [json.loads(l) for l in open(f"{work}/timing/{n}-{t}.json") if l.strip()]
        pp = f"{statistics.median(r['prompt_tok_s'] for r in tm):.1f}" if tm else ""
        dd = f"{statistics.median(r['decode_tok_s'] for r in tm):.1f}" if tm else ""
        rss_file = f"{work}/timing/{n}-{t}.rss"
        rss = f"{int(open(rss_file).read().split()[-1]) / 1024:.0f}" if os.path.exists(rss_file) else ""
        srss = f"{sr['peak_rss_mib']:.0f}" if sr and sr.get("peak_rss_mib") and t == types[0] else ""
        sp = f"{sr['prefill_tokens_per_s']:.1f}" if sr and t == types[0] else ""
        sd = f"{sr['decode_tokens_per_s']:.1f}" if sr and t == types[0] else ""
        print(f"| {n} | {t} | {size} | {same} | {agree} | {src} | {pp} | {dd} | {rss} | {sp} | {sd} | {srss} |")
PY
