#!/usr/bin/env python3
"""Automatic failover in cluster mode (issue 17), N cycles: three nodes
(each volume configured with the other two as sync mirrors) on a 3-member
loopback etcd. Each cycle freezes the primary (SIGSTOP: to the others, a
partition), measures the time from then to the first write acknowledged by
the node promoted in its place, thaws the old primary and waits until it
has stepped down and every mirror of the new primary is in sync again.

    bench/failover.py [--cycles 10] [--lease-ttl 2s]

Throughout, every 20 ms, each node's /status is read: a node "acts as
primary" while its volume is primary, its lease trusted and its epoch held
(blockmirror_volume_epoch_held); two at once is a dual-primary window.
Printed: failover time min/median/max over the cycles, the lease TTL beside
it (the time is bounded below by the lease), and the dual-primary windows
seen.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import ROOT, build_release, free_port, need  # noqa: E402

BIN = os.environ.get("BLOCKMIRROR_BIN", os.path.join(ROOT, "target/release/blockmirror"))


def get(admin, path):
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=2) as r:
        return r.read().decode()


def acting(admin):
    """(role is primary, lease ok, epoch held) of the node at admin."""
    try:
        st = json.loads(get(admin, "/status"))
        held = any(
            line.startswith("blockmirror_volume_epoch_held") and line.rstrip().endswith(" 1")
            for line in get(admin, "/metrics").splitlines()
        )
    except OSError:
        return False
    v = st["volumes"][0]
    return v["role"] == "primary" and st.get("cluster", {}).get("lease_ok") and held


def write_ok(uri, offset):
    out = subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 0x5a {offset} 64k", uri],
                         capture_output=True, text=True, timeout=30)
    return out.returncode == 0 and "failed" not in out.stdout + out.stderr


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--lease-ttl", default="2s")
    a = ap.parse_args()
    need("etcd", "qemu-io")
    build_release()
    top = tempfile.mkdtemp(prefix="bm-failover-")
    ports = [free_port() for _ in range(3)]
    env = dict(os.environ, BM_ETCD_PORTS=" ".join(str(p) for p in ports))
    subprocess.run([os.path.join(ROOT, "scripts/etcd.sh"), "start", f"{top}/etcd"], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    eps = ", ".join(f'"http://127.0.0.1:{p}"' for p in ports)
    with open(f"{top}/secret.key", "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    names = ["a", "b", "c"]
    listen = [free_port() for _ in names]
    nodes = []
    for i, n in enumerate(names):
        admin, nbd = f"127.0.0.1:{free_port()}", free_port()
        mirrors = "".join(f'[[volume.mirror]]\npeer = "127.0.0.1:{p}"\n' for j, p in enumerate(listen) if j != i)
        cfg = f"{top}/{n}.toml"
        with open(cfg, "w") as f:
            f.write(f'node = "{n}"\nlisten = "127.0.0.1:{listen[i]}"\nadmin = "{admin}"\n'
                    f'secret_file = "{top}/secret.key"\n[cluster]\netcd = [{eps}]\nlease_ttl = "{a.lease_ttl}"\n'
                    f'[[volume]]\nname = "vol"\npath = "{top}/{n}.img"\nsize = "64MiB"\n'
                    f'role = "{"primary" if i == 0 else "mirror"}"\nnbd = "127.0.0.1:{nbd}"\n'
                    f'mirror_timeout = "2s"\n{mirrors}')
        log = open(f"{top}/{n}.log", "w")
        p = subprocess.Popen([BIN, "serve", "-c", cfg], stdout=log, stderr=log)
        nodes.append({"name": n, "admin": admin, "uri": f"nbd://127.0.0.1:{nbd}/vol", "proc": p})

    stop = threading.Event()
    dual = []

    def watch():
        while not stop.is_set():
            now = [n["name"] for n in nodes if acting(n["admin"])]
            if len(now) > 1:
                dual.append((time.monotonic(), now))
            time.sleep(0.02)

    def wait(what, f, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = f()
            if r is not None:
                return r
            time.sleep(0.02)
        sys.exit(f"timed out waiting for {what} (logs in {top})")

    def in_sync(n):
        try:
            v = json.loads(get(n["admin"], "/status"))["volumes"][0]
        except OSError:
            return False
        return v["role"] == "primary" and len(v["mirrors"]) == 2 and all(m["state"] == "in_sync" for m in v["mirrors"])

    times = []
    try:
        primary = wait("a primary in sync", lambda: next((n for n in nodes if in_sync(n)), None))
        t = threading.Thread(target=watch, daemon=True)
        t.start()
        for cycle in range(a.cycles):
            assert write_ok(primary["uri"], 0), "the primary takes writes"
            primary["proc"].send_signal(signal.SIGSTOP)
            lost = time.monotonic()
            others = [n for n in nodes if n is not primary]
            new = wait("a new primary", lambda: next((n for n in others if acting(n["admin"])), None))
            wait("a write acknowledged by it", lambda: True if write_ok(new["uri"], 1 << 20) else None)
            times.append(time.monotonic() - lost)
            primary["proc"].send_signal(signal.SIGCONT)
            wait("the old primary back in sync", lambda: True if in_sync(new) else None)
            print(f"cycle {cycle + 1}: {primary['name']} -> {new['name']}: {times[-1] * 1000:.0f} ms")
            primary = new
    finally:
        stop.set()
        for n in nodes:
            n["proc"].send_signal(signal.SIGCONT)
            n["proc"].terminate()
        for n in nodes:
            n["proc"].wait()
        subprocess.run([os.path.join(ROOT, "scripts/etcd.sh"), "stop", f"{top}/etcd"], stdout=subprocess.DEVNULL)
    ms = [x * 1000 for x in times]
    print(f"failover over {len(ms)} cycles (lease_ttl {a.lease_ttl}): min {min(ms):.0f} ms, "
          f"median {statistics.median(ms):.0f} ms, max {max(ms):.0f} ms")
    print(f"dual-primary windows observed: {len(dual)}" + (f" {dual[:3]}" if dual else ""))
    shutil.rmtree(top, ignore_errors=True)
    sys.exit(1 if dual else 0)


if __name__ == "__main__":
    main()
