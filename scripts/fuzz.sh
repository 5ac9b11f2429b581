#!/usr/bin/env bash
# Runs every cargo-fuzz target under fuzz/ for SECONDS each (default 60),
# starting from the seed corpus in fuzz/corpus/<target>/. New inputs go to
# fuzz/work/<target>/ (not committed); a crash leaves its input in
# fuzz/artifacts/<target>/ and fails the script after all targets ran.
# Installs cargo-fuzz if missing; needs the nightly toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH="${1:-60}"
TOOLCHAIN="${FUZZ_TOOLCHAIN:-nightly}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

cd fuzz
start=$(date +%s)
cargo "+$TOOLCHAIN" fuzz build
echo "fuzz: build took $(( $(date +%s) - start ))s"

failed=()
for target in $(cargo "+$TOOLCHAIN" fuzz list); do
  mkdir -p "work/$target" "corpus/$target"
  t0=$(date +%s)
  if cargo "+$TOOLCHAIN" fuzz run "$target" "work/$target" "corpus/$target" -- \
      -max_total_time="$SECONDS_EACH" -timeout=20 -rss_limit_mb=2048 \
      -print_final_stats=1 >"work/$target.log" 2>&1; then
    echo "fuzz: $target ok ($(( $(date +%s) - t0 ))s, $(grep -o 'stat::number_of_executed_units: *[0-9]*' "work/$target.log" | grep -o '[0-9]*$' || echo '?') runs)"
  else
    echo "fuzz: $target FAILED, see fuzz/work/$target.log and fuzz/artifacts/$target/"
    tail -n 40 "work/$target.log"
    failed+=("$target")
  fi
done

if [ ${#failed[@]} -ne 0 ]; then
  echo "fuzz: crashes in ${failed[*]}"
  exit 1
fi
echo "fuzz: every target ran ${SECONDS_EACH}s without a crash (total $(( $(date +%s) - start ))s)"
