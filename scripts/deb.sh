#!/usr/bin/env bash
# Builds the Debian package (target/debian/blockmirror_*.deb) with cargo-deb:
# the release binary, the systemd unit, man pages and shell completions; then
# unpacks it with `dpkg -x` into a clean directory and runs its --version
# (crates/blockmirror/tests/tooling.rs, the_debian_package_unpacks_and_runs).
# Not part of scripts/test.sh: installing cargo-deb compiles it (minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
cargo build --release -p blockmirror
assets=target/deb-assets
rm -rf "$assets"
mkdir -p "$assets/man" "$assets/completions"
target/release/blockmirror man "$assets/man" >/dev/null
gzip -9n "$assets"/man/*.1
target/release/blockmirror completions bash >"$assets/completions/blockmirror"
target/release/blockmirror completions zsh >"$assets/completions/_blockmirror"
target/release/blockmirror completions fish >"$assets/completions/blockmirror.fish"
deb=$(cargo deb -p blockmirror --no-build --strip | tail -n 1)
case "$deb" in /*) ;; *) deb="$PWD/$deb" ;; esac
echo "deb.sh: built $deb"
BLOCKMIRROR_DEB="$deb" cargo test -p blockmirror --test tooling -- the_debian_package_unpacks_and_runs --nocapture
