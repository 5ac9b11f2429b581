#!/usr/bin/env python3
"""Many volumes on one node (issue 17): memory, threads and sockets of a
primary node and its mirror node with N volumes each, against the same pair
with 1 volume in the same run, in cluster mode on a 3-member loopback etcd.

    bench/many_volumes.py [--volumes 100] [--size-mib 64] [--no-cluster]

For each configuration: both nodes started, every volume's link in sync,
then, after 12 s idle (tokio lets an idle blocking-pool thread go after
10 s), /proc/PID/status (VmRSS, Threads) and the open descriptors of each
process. Printed: the figures per configuration and the cost per extra
volume ((N-volume figure - 1-volume figure) / (N - 1)). Images are sparse
files, so the volume size costs no disk.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import ROOT, build_release, free_port, need  # noqa: E402

_USED = set()


def unique_port():
    """free_port, never the same one twice in a run (hundreds are taken at once)."""
    while True:
        p = free_port()
        if p not in _USED and p + 1 not in _USED and p - 1 not in _USED:
            _USED.add(p)
            return p


BIN = os.environ.get("BLOCKMIRROR_BIN", os.path.join(ROOT, "target/release/blockmirror"))


def proc_figures(pid):
    rss = threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return {"rss": rss, "threads": threads, "fds": fds}


def status(admin):
    with urllib.request.urlopen(f"http://{admin}/status", timeout=5) as r:
        return json.load(r)


def start_etcd(d):
    ports = [unique_port() for _ in range(3)]
    # Peer ports are client + 1 in scripts/etcd.sh; pick ports whose + 1 is free too.
    env = dict(os.environ, BM_ETCD_PORTS=" ".join(str(p) for p in ports))
    subprocess.run([os.path.join(ROOT, "scripts/etcd.sh"), "start", d], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return [f"http://127.0.0.1:{p}" for p in ports]


def run_pair(n, size_mib, etcd, work):
    secret = os.path.join(work, "secret.key")
    with open(secret, "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    nodes = {}
    listen = {name: f"127.0.0.1:{unique_port()}" for name in ("p", "m")}
    for name, other, role in (("p", "m", "primary"), ("m", "p", "mirror")):
        admin = f"127.0.0.1:{unique_port()}"
        text = [f'node = "{name}"', f'listen = "{listen[name]}"', f'admin = "{admin}"',
                f'secret_file = "{secret}"']
        if etcd:
            eps = ", ".join(f'"{e}"' for e in etcd)
            # A prefix per configuration: each starts from an empty cluster.
            text += ["[cluster]", f"etcd = [{eps}]", 'lease_ttl = "5s"', f'prefix = "/bm-n{n}"']
        for i in range(n):
            text += ["[[volume]]", f'name = "v{i}"', f'path = "{work}/{name}/v{i}.img"',
                     f"size = {size_mib << 20}", f'role = "{role}"', f'nbd = "127.0.0.1:{unique_port()}"',
                     "[[volume.mirror]]", f'peer = "{listen[other]}"']
        cfg = os.path.join(work, f"{name}.toml")
        with open(cfg, "w") as f:
            f.write("\n".join(text) + "\n")
        log = open(os.path.join(work, f"{name}.log"), "w")
        proc = subprocess.Popen([BIN, "serve", "-c", cfg], stdout=log, stderr=log)
        nodes[name] = (proc, admin)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                vols = status(nodes["p"][1])["volumes"]
                if len(vols) == n and all(v["mirrors"] and v["mirrors"][0]["state"] == "in_sync" for v in vols):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                with open(os.path.join(work, "p.log")) as f:
                    tail = f.readlines()[-15:]
                sys.exit(f"{n} volumes: not all in sync within 300 s; the primary's log ends:\n" + "".join(tail))
            time.sleep(0.2)
        # Idle in sync: tokio's blocking pool lets an idle thread go after 10 s.
        time.sleep(12)
        return {name: proc_figures(proc.pid) for name, (proc, _) in nodes.items()}
    finally:
        for proc, _ in nodes.values():
            proc.terminate()
        for proc, _ in nodes.values():
            proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=100)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--no-cluster", action="store_true")
    a = ap.parse_args()
    need("etcd") if not a.no_cluster else None
    build_release()
    top = tempfile.mkdtemp(prefix="bm-many-")
    etcd = None
    try:
        if not a.no_cluster:
            etcd = start_etcd(os.path.join(top, "etcd"))
        res = {}
        for n in (1, a.volumes):
            work = os.path.join(top, f"n{n}")
            os.makedirs(work)
            res[n] = run_pair(n, a.size_mib, etcd, work)
        mode = "static roles" if a.no_cluster else "cluster mode, 3-member etcd"
        print(f"{a.volumes} volumes of {a.size_mib} MiB per node against 1, {mode}:")
        print(f"{'node':<8} {'volumes':>7} {'RSS MiB':>8} {'threads':>7} {'fds':>5}")
        for n, r in res.items():
            for name, f in r.items():
                role = "primary" if name == "p" else "mirror"
                print(f"{role:<8} {n:>7} {f['rss'] / 2**20:>8.1f} {f['threads']:>7} {f['fds']:>5}")
        for name, role in (("p", "primary"), ("m", "mirror")):
            one, many = res[1][name], res[a.volumes][name]
            per = (many["rss"] - one["rss"]) / (a.volumes - 1)
            print(f"{role}: {per / 1024:.0f} KiB of RSS and "
                  f"{(many['fds'] - one['fds']) / (a.volumes - 1):.1f} descriptors per extra volume; "
                  f"threads {one['threads']} -> {many['threads']}")
    finally:
        if etcd:
            subprocess.run([os.path.join(ROOT, "scripts/etcd.sh"), "stop", os.path.join(top, "etcd")],
                           stdout=subprocess.DEVNULL)
        if not os.environ.get("BM_KEEP"):
            shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
