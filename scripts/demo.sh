#!/usr/bin/env bash
# The README's first command: set everything up and run the main job on the default model.
# Fetch the model, build, then `slm run schedules/demo.toml`: dense vs SLM-only vs width-only vs SLM+width at the
# same parameter budget (80% of dense), evaluated on the first 100 documents of each task; prints the report table
# (also in out/demo/report.md, with report.json and plots).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
cargo build --release -p slm-cli
slm="${CARGO_TARGET_DIR:-$root/target}/release/slm"
"$slm" run schedules/demo.toml "$@"
