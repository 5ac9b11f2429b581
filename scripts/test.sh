#!/usr/bin/env bash
# The test command: installs the client tools, then runs every test in the
# workspace (unit, property and integration tests with real NBD clients).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo test --workspace --all-targets "$@"
