#!/usr/bin/env bash
# Installs what blockmirror's tests and benchmarks drive: the real NBD clients
# and the baseline servers. Debian packages; needs root (or sudo).
set -euo pipefail

PACKAGES=(
  qemu-utils      # qemu-img, qemu-io, qemu-nbd (baseline server)
  libnbd-bin      # nbdinfo, nbdcopy
  python3-libnbd  # nbdsh: a libnbd client that can send what qemu will not
  nbdkit          # nbdkit's file plugin (baseline server)
  fio             # load generator with an nbd engine
  iproute2        # ip netns, for multi-host tests
  curl            # an HTTPS client for the admin API test (tests/tls.rs)
  chromium        # headless browser for the status page test (tests/page.rs)
  prometheus      # promtool, which checks deploy/*.rules.yml (tests/deploy.rs)
  systemd         # systemd-analyze, which verifies deploy/blockmirror@.service
  etcd-server     # the coordinator of cluster mode (tests/cluster*.rs, demo --cluster)
  protobuf-compiler # protoc, which the etcd-client crate's build runs
  libprotobuf-dev   # the well-known .proto files protoc needs (google/protobuf/descriptor.proto)
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: everything is installed"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "install-deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
