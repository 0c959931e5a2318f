#!/usr/bin/env bash
# Width-pruning comparison on the default model: for each parameter target and each importance, run `slm width
# --target-ratio`, then `slm eval` (WikiText-2 128-token windows, first PPL_WINDOWS; the seven tasks, first DOCS
# documents), and print one Markdown table. Results accumulate in out/width-table/ (a finished row is not re-run).
#   TARGETS="0.2 0.35" IMPORTANCES="element1 element2 vector l2 random" DOCS=200 PPL_WINDOWS=40 bash scripts/width_table.sh
set -euo pipefail
work=out/width-table
source "$(dirname "${BASH_SOURCE[0]}")/table_common.sh"
for t in ${TARGETS:-0.2 0.35}; do
  for imp in ${IMPORTANCES:-element1 element2 vector l2 random}; do
    name="$imp-$t"
    [[ -f "$work/$name.ppl.json" ]] && continue
    echo "== $name" >&2
    "$slm" width "$model" --out "$work/$name" --target-ratio "$t" --importance "$imp" > "$work/$name.width.log" 2>&1 || { tail -3 "$work/$name.width.log" >&2; continue; }
    evaluate_split "$work/$name" "$name"
    rm -f "$work/$name/model.safetensors"   # keep config + plan; the weights are cheap to recompute
  done
done
python3 - "$work" "$dense_params" <<'PY'
import glob, json, os, sys
work, dense_params = sys.argv[1], sys.argv[2]
key = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc", "arc_easy": "acc", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
print("| model | pruning ratio | params | reduction | W2 PPL (128) | avg-7 | boolq | piqa | hellaswag(n) | winogrande | arc_e | arc_c(n) | obqa(n) | gradient pass s | peak RSS MiB |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for p in sorted(glob.glob(os.path.join(work, "*.ppl.json"))):
    name = os.path.basename(p)[:-len(".ppl.json")]
    ppl = json.load(open(p))["results"]["wikitext2-128"]["perplexity,none"]
    ev = json.load(open(os.path.join(work, name + ".eval.json")))
    avg = ev["avg-7"]["value"]
    cells = [f"{100 * ev['results'][t][m + ',none']:.1f}" for t, m in key.items()]
    plan_path = os.path.join(work, name, "slm_plan.json")
    if os.path.exists(plan_path):
        plan = json.load(open(plan_path))
        g = plan.get("gradient_pass") or {}
        r = plan['pruning_ratio']
        rs = f"{r:.4f}" if isinstance(r, (int, float)) else (f"{r['attention']:.4f}" if r['attention'] == r['mlp'] else f"{r['attention']:.4f}/{r['mlp']:.4f}")
        head = [name, rs, f"{plan['parameters_after'] / 1e6:.1f}M", f"{100 * plan['parameter_reduction']:.1f}%"]
        tail = [f"{g['seconds']:.1f}" if g else "", f"{g['peak_rss_mib']:.0f}" if g else ""]
    else:
        head, tail = [name, "0", dense_params, "0%"], ["", ""]
    print("| " + " | ".join(head + [f"{ppl:.1f}", f"{100 * avg:.2f}"] + cells + tail) + " |")
PY
