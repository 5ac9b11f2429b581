#!/usr/bin/env bash
# Where a pinned primary's CPU per write goes: the two-site emulation of bench/mirror.py
# (fio and the primary on CPU 0, the mirror alone on CPU 1), one configuration at a time,
# with perf on the primary and the mirror.
#
#   bench/profile-two-site.sh [--standalone] [--allocs] [--bin PATH] [--bs 4k] [--qd 32] [--rw randwrite]
#
# Prints, per write: each node's CPU (task-clock / writes fio completed), its context
# switches and syscalls (writev, recvfrom, epoll_wait, pwrite64, futex), and the primary's CPU
# split by call tree (local pwrite, writev, recv, epoll, context switches, crc32c, loopback
# delivery, user space). Run it once per build or configuration, one after the other, and
# compare: absolute figures move with this machine's load. Needs root (perf, drop_caches).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/blockmirror BS=4k QD=32 RW=randwrite STANDALONE= ALLOCS=
while [ $# -gt 0 ]; do
  case $1 in
    --standalone) STANDALONE=1 ;;
    --allocs) ALLOCS=1 ;;
    --bin) BIN=$2; shift ;;
    --bs) BS=$2; shift ;;
    --qd) QD=$2; shift ;;
    --rw) RW=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
for t in perf fio taskset curl; do command -v $t >/dev/null || { echo "needs $t" >&2; exit 2; }; done
[ -x "$BIN" ] || cargo build --release -p blockmirror
BIN=$(realpath "$BIN")
D=$(mktemp -d /tmp/bm-profile-XXXXXX)
cleanup() {
  kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$D"
  perf probe -q -d 'probe_*:mi_malloc_aligned*' 2>/dev/null || true
}
PIDS=()
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PN=$(port) PA=$(port) ML=$(port) MA=$(port) MN=$(port)
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$D/secret.key"
# Written extents, as in bench/mirror.py (fallocated ones would add extent conversions).
head -c 512M /dev/urandom > "$D/p.img"; cp --sparse=never "$D/p.img" "$D/m.img"
cat > "$D/p.toml" <<T
node = "p"
admin = "127.0.0.1:$PA"
secret_file = "secret.key"
[[volume]]
name = "v"
path = "$D/p.img"
size = "512MiB"
role = "primary"
nbd = "127.0.0.1:$PN"
T
if [ -z "$STANDALONE" ]; then
  printf '[[volume.mirror]]\npeer = "127.0.0.1:%s"\nmode = "sync"\n' "$ML" >> "$D/p.toml"
  cat > "$D/m.toml" <<T
node = "m"
listen = "127.0.0.1:$ML"
admin = "127.0.0.1:$MA"
secret_file = "secret.key"
[[volume]]
name = "v"
path = "$D/m.img"
size = "512MiB"
role = "mirror"
nbd = "127.0.0.1:$MN"
T
  taskset -c 1 "$BIN" serve --config "$D/m.toml" 2>"$D/m.log" & PIDS+=($!); M=$!
  for _ in $(seq 200); do curl -sf "127.0.0.1:$MA/status" >/dev/null && break; sleep 0.05; done
fi
taskset -c 0 "$BIN" serve --config "$D/p.toml" 2>"$D/p.log" & PIDS+=($!); P=$!
want='"size_bytes"'; [ -z "$STANDALONE" ] && want='"in_sync"'
for _ in $(seq 600); do curl -sf "127.0.0.1:$PA/status" | grep -q "$want" && break; sleep 0.1; done
curl -sf "127.0.0.1:$PA/status" | grep -q "$want" || { echo "primary not ready" >&2; exit 1; }
sync; echo 3 > /proc/sys/vm/drop_caches
taskset -c 0 fio --name=b --ioengine=nbd --uri="nbd://127.0.0.1:$PN/v" --rw="$RW" --bs="$BS" \
  --iodepth="$QD" --size=512M --runtime=6 --time_based --randrepeat=0 --norandommap \
  --output-format=json > "$D/fio.json" 2>/dev/null & F=$!
sleep 1.5
EV=task-clock,context-switches,syscalls:sys_enter_writev,syscalls:sys_enter_recvfrom,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_pwrite64,syscalls:sys_enter_futex
# --allocs: allocations per write, with a uprobe on mimalloc's mi_malloc_aligned (the mimalloc
# crate's GlobalAlloc: every Rust allocation). A uprobe traps on every call, so the run is much
# slower and its other figures are not comparable; allocations are counted per local pwrite.
if [ -n "$ALLOCS" ] && perf probe -q -x "$BIN" --add mi_malloc_aligned 2>/dev/null || perf probe -l 2>/dev/null | grep -q "mi_malloc_aligned.*$(basename "$BIN")"; then
  PROBE=$(perf probe -l 2>/dev/null | grep "mi_malloc_aligned.*$BIN" | awk '{print $1}' | head -1)
  [ -n "$PROBE" ] && EV="$EV,$PROBE"
fi
perf stat -x, -e "$EV" -p "$P" -- sleep 3 2> "$D/p.stat" &
[ -z "$STANDALONE" ] && perf stat -x, -e "$EV" -p "$M" -- sleep 3 2> "$D/m.stat" &
perf record -F 2999 -g -p "$P" -o "$D/p.perf" -- sleep 3 >/dev/null 2>&1
wait "$F"
perf report -i "$D/p.perf" --children --sort sym --stdio -g none 2>/dev/null | grep -E "^ +[0-9]" > "$D/p.children" || true
perf report -i "$D/p.perf" --no-children --sort dso --stdio -g none 2>/dev/null | grep -E "^ +[0-9]" > "$D/p.dso" || true
python3 - "$D" "$BS" "$QD" "$RW" "${STANDALONE:+standalone}" <<'PY'
import json, re, sys, os
d, bs, qd, rw, kind = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] or "sync mirror"
s = open(f"{d}/fio.json").read()
w = json.loads(s[s.index("{"):])["jobs"][0]["write"]
ops = w["iops"] * 3
print(f"{kind}, {bs} {rw} QD{qd}: {w['iops']:.0f} IOPS, {w['bw_bytes'] / 2**20:.1f} MiB/s")
cpu = {}
for who in ("p", "m"):
    if not os.path.exists(f"{d}/{who}.stat"):
        continue
    out = []
    counts = {}
    for line in open(f"{d}/{who}.stat"):
        f = line.strip().split(",")
        if len(f) < 3 or not f[0].replace(".", "").isdigit():
            continue
        v, name = float(f[0]), f[2].replace("syscalls:sys_enter_", "")
        counts[name] = v
        if "mi_malloc_aligned" in name:
            out.append(f"allocations per pwrite {v / max(counts.get('pwrite64', 1), 1):.2f}")
            continue
        if name == "task-clock":
            cpu[who] = v * 1000 / ops
            out.append(f"cpu {cpu[who]:.2f} us")
        else:
            out.append(f"{name} {v / ops:.3f}")
    print(f"  {'primary' if who == 'p' else 'mirror':8} per write: " + ", ".join(out))
ch = {}
for l in open(f"{d}/p.children"):
    m = re.match(r"\s+([\d.]+)%\s+([\d.]+)%\s+\[(.)\]\s+(.*)", l)
    if m:
        ch.setdefault(m.group(4).strip(), float(m.group(1)))
us = cpu.get("p", 0)
print("  primary's CPU per write by call tree (us):")
for label, sym in [("local pwrite", "__libc_pwrite"), ("writev", "__GI___writev"), ("recv", "__libc_recv"),
                   ("epoll_wait", "epoll_wait"), ("context switches", "finish_task_switch.isra.0"),
                   ("crc32c", "crc32c::hw_x86_64::crc_u64_parallel3"),
                   ("memmove (copies in user space)", "__memmove_avx512_unaligned_erms"),
                   ("loopback delivery (tcp_v4_rcv)", "tcp_v4_rcv"), ("waking a reader", "sock_def_readable")]:
    print(f"    {label:32} {ch.get(sym, 0) * us / 100:8.2f}")
for l in open(f"{d}/p.dso"):
    p, name = l.split("%", 1)
    name = name.strip()
    if "blockmirror" in name or "kernel" in name:
        print(f"    {'in ' + name:32} {float(p) * us / 100:8.2f}")
PY
