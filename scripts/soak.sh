#!/usr/bin/env bash
# The soak (issue 20): CYCLES seeded fault cycles (default 20) in sync mode,
# then in async mode, each run with its own blockmirror nodes on loopback.
# SOAK_SEED fixes the seed (default: the clock; every run prints it, and
# every violation prints the command that replays its cycle).
set -euo pipefail
cd "$(dirname "$0")/.."
cycles=${1:-20}
seed=${SOAK_SEED:-$(date +%s)}
cargo build -p blockmirror -p blockmirror-testkit
bin="${CARGO_TARGET_DIR:-target}/debug"
for mode in sync async; do
    "$bin/blockmirror-soak" --mode "$mode" --cycles "$cycles" --seed "$seed" \
        --bin "$bin/blockmirror"
done
