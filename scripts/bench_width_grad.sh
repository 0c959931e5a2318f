#!/usr/bin/env bash
# The width gradient pass (element1: one backward pass; element2 adds one per window) on the default model,
# layer by layer (slm's default) against the whole graph at once (the earlier path, kept as the reference):
# wall time and peak RSS, each pass in its own process, alternated three rounds so that machine noise hits both;
# prints medians and ratios. Calibration as `slm width`'s default: N=10 windows of LEN=128 LAMBADA tokens.
#   N=10 LEN=128 FISHER=0 bash scripts/bench_width_grad.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
model="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
n="${N:-10}" len="${LEN:-128}" fisher=""
[[ "${FISHER:-0}" == 1 ]] && fisher=fisher
cargo build --release -q -p slm-width --example grad_memory
bin=target/release/examples/grad_memory
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
echo "model $model, $n x $len tokens, layers: width's default range, fisher: ${fisher:-no}"
for round in 1 2 3; do
  for how in layerwise whole; do
    "$bin" "$model" "$how" "$n" "$len" $fisher | tee -a "$log"
  done
done
python3 - "$log" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
med = {h: {k: statistics.median(r[k] for r in rows if r["how"] == h) for k in ("seconds", "peak_rss_mib")}
       for h in ("layerwise", "whole")}
loss = {h: [r["loss"] for r in rows if r["how"] == h][0] for h in med}
print("\n| gradient pass | median wall s (3 runs) | median peak RSS MiB | loss |\n|---|---|---|---|")
for h, m in med.items():
    print(f"| {h} | {m['seconds']:.2f} | {m['peak_rss_mib']:.0f} | {loss[h]:.6f} |")
w, g = med["whole"], med["layerwise"]
print(f"\nlayerwise / whole: time {g['seconds'] / w['seconds']:.2f}x, peak RSS {g['peak_rss_mib'] / w['peak_rss_mib']:.2f}x")
PY
