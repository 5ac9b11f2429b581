#!/usr/bin/env bash
# A/B of 4 KiB random writes (QD32) between blockmirror builds and nbdkit's
# file plugin, on one image, interleaved round by round, page cache dropped
# before every run (run as root on a quiet machine).
#
#   bench/ab-randwrite.sh [--rounds N] [--runtime S] BINARY [BINARY ...]
#
# Each BINARY is a blockmirror executable (e.g. two builds of different
# commits copied aside). Prints every run and the median per server.
set -euo pipefail
rounds=4 runtime=6
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[[ $# -ge 1 ]] || { echo "usage: $0 [--rounds N] [--runtime S] BINARY [BINARY ...]" >&2; exit 2; }
command -v fio nbdkit >/dev/null || { echo "needs fio and nbdkit (scripts/install-deps.sh)" >&2; exit 2; }

work=$(mktemp -d /tmp/bm-ab-XXXXXX)
trap 'rm -rf "$work"' EXIT
img=$work/img
dd if=/dev/urandom of="$img" bs=1M count=512 status=none
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
admin=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/node.toml" <<T
node = "ab"
admin = "127.0.0.1:$admin"
[[volume]]
name = "b"
path = "$img"
size = "512MiB"
role = "primary"
nbd = "127.0.0.1:$port"
T

wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && return; sleep 0.05; done; echo "server did not start" >&2; exit 1; }
declare -A results
servers=("$@" nbdkit)
for r in $(seq "$rounds"); do
  for s in "${servers[@]}"; do
    sync; echo 1 > /proc/sys/vm/drop_caches 2>/dev/null || true
    if [[ $s == nbdkit ]]; then
      nbdkit -f -i 127.0.0.1 -p "$port" file "$img" & pid=$!; uri=nbd://127.0.0.1:$port/
    else
      "$s" serve --config "$work/node.toml" 2>/dev/null & pid=$!; uri=nbd://127.0.0.1:$port/b
    fi
    wait_port
    iops=$(fio --name=t --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=32 --size=512M \
      --runtime="$runtime" --time_based --ramp_time=1 --norandommap --output-format=terse 2>/dev/null \
      | awk -F';' '$49 != "" {printf "%d", $49}')
    kill "$pid"; wait "$pid" 2>/dev/null || true
    echo "round $r  $s  $iops IOPS"
    results[$s]+="$iops "
  done
done
echo
for s in "${servers[@]}"; do
  med=$(echo "${results[$s]}" | tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}')
  echo "median  $s  $med IOPS"
done
