#!/usr/bin/env python3
"""Replication with compression on vs off, for compressible data.

A primary with one sync mirror, both on this machine, with the mirror link's
`compression` set to none, lz4 or zstd. Two links are measured:

- loopback: the nodes talk directly. Bandwidth is plentiful, so this shows
  what compression costs in CPU (the machine is CPU-bound).
- a bandwidth-limited link: the replication connection goes through a small
  relay (a child process) that passes at most --link-mibs MiB/s from the
  primary to the mirror (acknowledgements flow back freely), standing in
  for a WAN link. This kernel has no netem.

Workload: fio 1 MiB sequential writes, QD8, of data that compresses about
2:1 (`--buffer_compress_percentage=50 --refill_buffers`: every buffer new).
Every configuration starts afresh (new nodes, zeroed images) and rounds are
interleaved (none, lz4, zstd, then again), so all share the machine's noise.
Prints medians, the ratio of each codec to `none` on the same link, and the
bytes on the wire per byte of data (from the primary's metrics).

    python3 bench/compression.py [--rounds 3] [--runtime 5] [--link-mibs 50]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request

import benchlib as b

VOLUME = "bench"
CODECS = ["none", "lz4", "zstd"]
FIO_DATA = ["--buffer_compress_percentage=50", "--refill_buffers"]

_RELAY = r"""
import socket, sys, threading, time
rate = float(sys.argv[1]) * (1 << 20)
upstream = int(sys.argv[2])
BURST = 0.005  # seconds of credit a quiet link may build up

l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 0))
l.listen(8)
print(l.getsockname()[1], flush=True)

def pump(src, dst, limited):
    t = time.monotonic()
    try:
        while True:
            d = src.recv(65536)
            if not d:
                break
            dst.sendall(d)
            if limited:
                now = time.monotonic()
                t = max(t, now - BURST) + len(d) / rate
                if t > now:
                    time.sleep(t - now)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

while True:
    c, _ = l.accept()
    try:
        u = socket.create_connection(("127.0.0.1", upstream))
    except OSError:
        c.close()
        continue
    for s in (c, u):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=pump, args=(c, u, True), daemon=True).start()
    threading.Thread(target=pump, args=(u, c, False), daemon=True).start()
"""


def secret(path):
    with open(path, "w") as f:
        f.write(os.urandom(32).hex() + "\n")


def start(workdir, seed, size_bytes, codec, link_mibs):
    """A mirror, an optional relay, and a primary whose link uses `codec`;
    returns (primary, [nodes], relay or None) once the mirror is in sync."""
    os.makedirs(workdir)
    pimg, mimg = os.path.join(workdir, "primary.img"), os.path.join(workdir, "mirror.img")
    for img in (pimg, mimg):
        subprocess.run(["cp", "--sparse=never", seed, img], check=True)
    secret(os.path.join(workdir, "secret.key"))
    m_nbd, m_admin, m_listen = b.free_port(), b.free_port(), b.free_port()
    mcfg = os.path.join(workdir, "mirror.toml")
    with open(mcfg, "w") as f:
        f.write(f'node = "bench-mirror"\nlisten = "127.0.0.1:{m_listen}"\nadmin = "127.0.0.1:{m_admin}"\n'
                f'secret_file = "secret.key"\n\n[[volume]]\nname = "{VOLUME}"\npath = "{mimg}"\n'
                f'size = {size_bytes}\nrole = "mirror"\nnbd = "127.0.0.1:{m_nbd}"\n')
    mirror = b.serve_node(mcfg, m_nbd, m_admin, VOLUME, "mirror")
    relay, peer = None, m_listen
    if link_mibs:
        relay = subprocess.Popen([sys.executable, "-c", _RELAY, str(link_mibs), str(m_listen)],
                                 stdout=subprocess.PIPE, text=True)
        peer = int(relay.stdout.readline())
    p_nbd, p_admin = b.free_port(), b.free_port()
    pcfg = os.path.join(workdir, "primary.toml")
    with open(pcfg, "w") as f:
        f.write(f'node = "bench-primary"\nadmin = "127.0.0.1:{p_admin}"\nsecret_file = "secret.key"\n\n'
                f'[[volume]]\nname = "{VOLUME}"\npath = "{pimg}"\nsize = {size_bytes}\nrole = "primary"\n'
                f'nbd = "127.0.0.1:{p_nbd}"\nmirror_timeout = "30s"\n\n'
                f'[[volume.mirror]]\npeer = "127.0.0.1:{peer}"\nmode = "sync"\ncompression = "{codec}"\n')
    primary = b.serve_node(pcfg, p_nbd, p_admin, VOLUME, "primary")
    b.wait_for("the mirror to be in sync", lambda: link(primary)["state"] == "in_sync", timeout=300)
    return primary, [mirror, primary], relay


def link(primary):
    return b.http_json(primary.admin_port, "/status")["volumes"][0]["mirrors"][0]


def metric(primary, name):
    with urllib.request.urlopen(
            f"http://127.0.0.1:{primary.admin_port}/metrics", timeout=5) as r:
        body = r.read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio run")
    ap.add_argument("--size", default="256M", help="image size (fio addresses all of it)")
    ap.add_argument("--link-mibs", type=float, default=50.0,
                    help="bandwidth of the limited link, MiB/s (0: measure loopback only)")
    args = ap.parse_args()
    b.need("fio")
    b.build_release()
    size_bytes = int(subprocess.run(["numfmt", "--from=iec", args.size.rstrip("B")], check=True,
                                    capture_output=True, text=True).stdout)
    links = [0.0] + ([args.link_mibs] if args.link_mibs else [])
    results = {(l, c): [] for l in links for c in CODECS}
    with tempfile.TemporaryDirectory(prefix="bm-bench-compress-", dir=os.environ.get("BENCH_DIR")) as work:
        seed = os.path.join(work, "seed.img")
        subprocess.run(["dd", "if=/dev/zero", f"of={seed}", "bs=1M", f"count={size_bytes >> 20}",
                        "status=none"], check=True)
        for r in range(args.rounds):
            for lk in links:
                for codec in CODECS:
                    workdir = os.path.join(work, f"r{r}-{lk}-{codec}")
                    primary, nodes, relay = start(workdir, seed, size_bytes, codec, lk)
                    try:
                        b.drop_caches()
                        cpu0 = [n.cpu_seconds() for n in nodes]
                        data0 = metric(primary, "blockmirror_replication_data_bytes_total")
                        wire0 = metric(primary, "blockmirror_replication_wire_bytes_total")
                        job = b.fio_job(primary.uri, "write", "1M", 8, args.runtime, args.size, FIO_DATA)
                        cpu = [n.cpu_seconds() - c for n, c in zip(nodes, cpu0)]
                        data = metric(primary, "blockmirror_replication_data_bytes_total") - data0
                        wire = metric(primary, "blockmirror_replication_wire_bytes_total") - wire0
                        st = link(primary)
                        if st["state"] != "in_sync" or st["connection"] != "connected":
                            raise SystemExit(f"the mirror left sync: {st}")
                        mibs = job["write"]["bw_bytes"] / (1 << 20)
                        ops = job["write"]["iops"] * (args.runtime + 1)
                        cpu_us = [c * 1e6 / ops for c in cpu]
                        ratio = wire / data if data else float("nan")
                        results[(lk, codec)].append((mibs, ratio, cpu_us[1], cpu_us[0]))
                        name = "loopback" if not lk else f"{lk:g} MiB/s"
                        print(f"  round {r + 1} {name:>10} {codec:5} {mibs:8.1f} MiB/s  wire/data {ratio:5.3f}  "
                              f"CPU us/op primary={cpu_us[1]:.0f} mirror={cpu_us[0]:.0f}", flush=True)
                    finally:
                        for n in reversed(nodes):
                            n.stop()
                        if relay:
                            relay.kill()
                            relay.wait()
                    shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"sync mirror, 1 MiB seqwrite QD8 of 2:1 compressible data, {args.size} image, "
          f"{args.runtime}s x {args.rounds} rounds, medians")
    print(f"{'link':>12} {'codec':>6} {'MiB/s':>9} {'vs none':>8} {'wire/data':>10} "
          f"{'primary us/op':>14} {'mirror us/op':>13}")
    for lk in links:
        base = b.median([x[0] for x in results[(lk, "none")]])
        for codec in CODECS:
            rs = results[(lk, codec)]
            mibs = b.median([x[0] for x in rs])
            name = "loopback" if not lk else f"{lk:g} MiB/s"
            print(f"{name:>12} {codec:>6} {mibs:>9.1f} {mibs / base:>7.2f}x {b.median([x[1] for x in rs]):>10.3f} "
                  f"{b.median([x[2] for x in rs]):>14.0f} {b.median([x[3] for x in rs]):>13.0f}")


if __name__ == "__main__":
    main()
