#!/usr/bin/env python3
"""Async consistency group vs the same two async volumes ungrouped (issue 17:
a group's mirror holds a point both volumes passed through, which costs the
group's links a gate per cross-volume epoch).

    bench/group_async.py [--rounds 3] [--runtime 5] [--bs 4k] [--iodepth 32]

Each round, both configurations, interleaved: a fresh primary node with
volumes `db` and `log` (64 MiB each), both mirrored async to a fresh mirror
node, `consistency_group = "app"` or none; both links in sync, then one fio
randwrite job per volume at the same time for --runtime s. Printed per
configuration: host IOPS (both jobs), how long the mirror took after fio
stopped to acknowledge everything (the lag drained), the mirror-side
rate over fio's run and the drain (writes / (runtime + drain)), the
primary's and the mirror's CPU per host write, and the gates the group's
links waited at. Both images are compared with cmp at the end of each run.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (  # noqa: E402
    build_release, drop_caches, fio, free_port, http_json, median, need, serve_node,
    wait_for,
)

SIZE = 64 << 20


def start(workdir, grouped):
    secret = os.path.join(workdir, "secret.key")
    with open(secret, "w") as f:
        f.write(os.urandom(16).hex() + "\n")
    m_listen, m_admin, p_admin = free_port(), free_port(), free_port()
    vols = ["db", "log"]
    mtext = (f'node = "site-b"\nlisten = "127.0.0.1:{m_listen}"\nadmin = "127.0.0.1:{m_admin}"\n'
             f'secret_file = "secret.key"\n')
    m_nbd = {}
    for v in vols:
        m_nbd[v] = free_port()
        mtext += (f'[[volume]]\nname = "{v}"\npath = "m-{v}.img"\nsize = {SIZE}\nrole = "mirror"\n'
                  f'nbd = "127.0.0.1:{m_nbd[v]}"\n')
    ptext = f'node = "site-a"\nadmin = "127.0.0.1:{p_admin}"\nsecret_file = "secret.key"\n'
    p_nbd = {}
    group = 'consistency_group = "app"\n' if grouped else ""
    for v in vols:
        p_nbd[v] = free_port()
        ptext += (f'[[volume]]\nname = "{v}"\npath = "p-{v}.img"\nsize = {SIZE}\nrole = "primary"\n'
                  f'nbd = "127.0.0.1:{p_nbd[v]}"\n{group}'
                  f'[[volume.mirror]]\npeer = "127.0.0.1:{m_listen}"\nmode = "async"\n')
    for name, text in (("mirror.toml", mtext), ("primary.toml", ptext)):
        with open(os.path.join(workdir, name), "w") as f:
            f.write(text)
    mirror = serve_node(os.path.join(workdir, "mirror.toml"), m_nbd["db"], m_admin, "db", "mirror")
    primary = serve_node(os.path.join(workdir, "primary.toml"), p_nbd["db"], p_admin, "db", "primary")
    uris = [f"nbd://127.0.0.1:{p_nbd[v]}/{v}" for v in vols]
    return primary, mirror, uris


def links(primary):
    return [m for v in http_json(primary.admin_port, "/status")["volumes"] for m in v["mirrors"]]


def metric(primary, name):
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{primary.admin_port}/metrics", timeout=5) as r:
        total = 0.0
        for line in r.read().decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total


def run(kind, args):
    workdir = tempfile.mkdtemp(prefix=f"bm-bench-group-{kind}-")
    try:
        primary, mirror, uris = start(workdir, kind == "grouped")
        try:
            wait_for("both links in sync",
                     lambda: all(m["state"] == "in_sync" for m in links(primary)), 60)
            drop_caches()
            cpu0 = [s.cpu_seconds() for s in (primary, mirror)]
            results = [None, None]

            def job(i):
                results[i] = fio(uris[i], "randwrite", args.bs, args.iodepth, args.runtime, "64M")

            threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            stopped = time.monotonic()
            wait_for("the mirror to acknowledge everything",
                     lambda: all(m["lag_bytes"] == 0 for m in links(primary)), 120)
            drain = time.monotonic() - stopped
            cpu = [s.cpu_seconds() - c for s, c in zip((primary, mirror), cpu0)]
            iops = sum(r[0] for r in results)
            # fio counts after a 1 s ramp: the writes of the whole run are
            # about iops * (runtime + 1).
            writes = iops * (args.runtime + 1)
            rate = writes / (args.runtime + 1 + drain)
            gates = metric(primary, "blockmirror_mirror_group_gates_total")
            out = {"iops": iops, "drain": drain, "rate": rate, "gates": gates,
                   "p_cpu": cpu[0] * 1e6 / writes, "m_cpu": cpu[1] * 1e6 / writes}
        finally:
            primary.stop()
            mirror.stop()
        for v in ("db", "log"):
            subprocess.run(["cmp", os.path.join(workdir, f"p-{v}.img"),
                            os.path.join(workdir, f"m-{v}.img")], check=True)
        return out
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--bs", default="4k")
    ap.add_argument("--iodepth", type=int, default=32)
    args = ap.parse_args()
    need("fio", "cmp")
    build_release()
    res = {"ungrouped": [], "grouped": []}
    for r in range(args.rounds):
        order = ("ungrouped", "grouped") if r % 2 == 0 else ("grouped", "ungrouped")
        for kind in order:
            o = run(kind, args)
            res[kind].append(o)
            print(f"round {r + 1} {kind:9}: {o['iops']:9.0f} IOPS  drain {o['drain']:6.2f} s  "
                  f"mirror {o['rate']:9.0f} writes/s  CPU us/write primary {o['p_cpu']:5.1f} "
                  f"mirror {o['m_cpu']:5.1f}  gates {o['gates']:.0f}", flush=True)
    print(f"\nmedians, {args.bs} randwrite QD{args.iodepth} on both volumes, async:")
    base = {k: median([o[k] for o in res["ungrouped"]]) for k in res["ungrouped"][0]}
    for kind in ("ungrouped", "grouped"):
        m = {k: median([o[k] for o in res[kind]]) for k in res[kind][0]}
        print(f"  {kind:9}: {m['iops']:9.0f} IOPS ({m['iops'] / base['iops']:.2f}x)  drain "
              f"{m['drain']:.2f} s  mirror {m['rate']:9.0f} writes/s ({m['rate'] / base['rate']:.2f}x)  "
              f"CPU us/write primary {m['p_cpu']:.1f} mirror {m['m_cpu']:.1f}  gates {m['gates']:.0f}")


if __name__ == "__main__":
    main()
