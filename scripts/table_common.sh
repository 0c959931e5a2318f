# Sourced by the comparison scripts (depth_table.sh, width_table.sh) after they set `work`: set-up, build, and
# (MODEL=path to run on another model than the default; WORK=dir to put its results elsewhere)
# evaluate_split, which writes WORK/NAME.eval.json (the seven tasks, first DOCS documents) and WORK/NAME.ppl.json
# (WikiText-2 128-token windows, first PPL_WINDOWS), each with its log.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh >/dev/null
cargo build --release -q -p slm-cli
slm="${CARGO_TARGET_DIR:-$root/target}/release/slm"
model="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
work="${WORK:-$work}"
mkdir -p "$work"
dense_params="$("$slm" inspect "$model" --json 2>/dev/null | python3 -c 'import json, sys; print("%.1fM" % (json.load(sys.stdin)["num_parameters"] / 1e6))')"
docs="${DOCS:-200}"
ppl="${PPL_WINDOWS:-40}"

evaluate_split() { # model name
  "$slm" eval "$1" --tasks avg7 --limit "$docs" --output-path "$work/$2.eval.json" > "$work/$2.eval.log" 2>&1
  "$slm" eval "$1" --tasks wikitext2-128 --limit "$ppl" --output-path "$work/$2.ppl.json" > "$work/$2.ppl.log" 2>&1
}

[[ -f "$work/dense.ppl.json" ]] || evaluate_split "$model" dense
