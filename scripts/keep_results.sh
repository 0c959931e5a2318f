#!/usr/bin/env bash
# Copies what recovery-study runs measured into the repository, so that the numbers outlive the runs' output
# directory (models and logged samples stay behind: they are large and can be remade). For each NAME, the
# results files of OUT/eval-NAME/ (or of OUT/full-NAME/TASK/) and, when it exists, OUT/NAME/slm_lora.json
# (settings, training and validation history) go to the same places under results/recovery/, so that
# `python3 scripts/recovery_table.py results/recovery NAME...` prints their rows (without BoolQ's "yes" share,
# which needs the samples).
#   bash scripts/keep_results.sh out/i18c slm-dp-13 slm-dp-13-head3-distill-t1-s300 full-slm-dp-13
set -euo pipefail
(($# >= 2)) || { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1%/}"; shift
for name in "$@"; do
  if [[ "$name" == full-* ]]; then found=("$out/$name"/*/*/results_*.json); else found=("$out/eval-$name"/*/results_*.json); fi
  [[ -f "${found[0]}" ]] || { echo "$name: no results file under $out" >&2; exit 1; }
  for f in "${found[@]}" "$out/${name#full-}/slm_lora.json"; do
    [[ -f "$f" ]] || continue
    dest="$root/results/recovery/${f#"$out/"}"
    mkdir -p "$(dirname "$dest")"
    cp "$f" "$dest"
  done
  echo "$name -> results/recovery"
done
