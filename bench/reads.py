#!/usr/bin/env python3
"""Read balancing (seed 004 FIG. 9): read_policy = "primary" vs "balanced".

Two pairs run side by side on loopback, each a primary and one sync mirror,
identical but for the primary's `read_policy`; both primaries have
`fault_injection = true`. Both images of both pairs start as copies of one
file of random data, and each mirror is in sync before anything is measured.
Each round runs every workload on both pairs, one after the other, in two
scenarios:

- healthy: nothing injected (the local reads hit the page cache: the best
  case for the local disk, so balancing can only lose a little, to probes),
- slow disk: every read of the primaries' backends sleeps `--latency-us`
  (2000 us by default; `POST /volumes/bench/faults`), the case balancing is
  for: a local disk slower than the mirror over the network.

Page caches stay warm (nothing is dropped): both pairs see the same state;
which policy runs first alternates from round to round.
Prints median IOPS per configuration, the median over rounds of the ratio
balanced / primary measured in the same round (above 1: balancing is
faster; robust against load that comes and goes between rounds) and the
share of the balanced pair's reads its mirror served (from /metrics).

    python3 bench/reads.py [--rounds 3] [--runtime 5] [--size 512M] [--latency-us 2000]
"""

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import urllib.request

import benchlib as b

VOLUME = "bench"
WORKLOADS = [
    # name, rw, bs, iodepth
    ("4k randread QD32", "randread", "4k", 32),
    ("1M seqread QD8", "read", "1M", 8),
]
POLICIES = ["primary", "balanced"]


def parse_size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)


def post(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        r.read()


def metric_sum(port, name, label):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def start_pair(policy, work, seed, size):
    """One pair in a fresh folder; returns (primary Server, mirror Server)."""
    d = os.path.join(work, policy)
    os.makedirs(d)
    pimg, mimg = os.path.join(d, "primary.img"), os.path.join(d, "mirror.img")
    subprocess.run(["cp", "--sparse=never", seed, pimg], check=True)
    subprocess.run(["cp", "--sparse=never", seed, mimg], check=True)
    with open(os.path.join(d, "secret.key"), "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    m_nbd, m_admin, m_listen = b.free_port(), b.free_port(), b.free_port()
    p_nbd, p_admin = b.free_port(), b.free_port()
    mcfg, pcfg = os.path.join(d, "mirror.toml"), os.path.join(d, "primary.toml")
    with open(mcfg, "w") as f:
        f.write(f'node = "mirror-{policy}"\nlisten = "127.0.0.1:{m_listen}"\nadmin = "127.0.0.1:{m_admin}"\n'
                f'secret_file = "secret.key"\n\n[[volume]]\nname = "{VOLUME}"\npath = "{mimg}"\n'
                f'size = {size}\nrole = "mirror"\nnbd = "127.0.0.1:{m_nbd}"\n')
    with open(pcfg, "w") as f:
        f.write(f'node = "primary-{policy}"\nadmin = "127.0.0.1:{p_admin}"\nsecret_file = "secret.key"\n\n'
                f'[[volume]]\nname = "{VOLUME}"\npath = "{pimg}"\nsize = {size}\nrole = "primary"\n'
                f'nbd = "127.0.0.1:{p_nbd}"\nread_policy = "{policy}"\nfault_injection = true\n'
                f'resync_checksum = true\n\n'
                f'[[volume.mirror]]\npeer = "127.0.0.1:{m_listen}"\nmode = "sync"\n')
    mirror = b.serve_node(mcfg, m_nbd, m_admin, VOLUME, f"mirror-{policy}")
    primary = b.serve_node(pcfg, p_nbd, p_admin, VOLUME, f"primary-{policy}")
    return primary, mirror


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--size", default="512M")
    ap.add_argument("--latency-us", type=int, default=2000)
    args = ap.parse_args()
    size = parse_size(args.size)
    b.need("fio")
    b.build_release()
    work = tempfile.mkdtemp(prefix="bm-reads-bench-")
    seed = os.path.join(work, "seed.img")
    with open(seed, "wb") as f:
        left = size
        while left:
            n = min(64 << 20, left)
            f.write(os.urandom(n))
            left -= n
    servers = []
    try:
        pairs = {}
        for policy in POLICIES:
            primary, mirror = start_pair(policy, work, seed, size)
            servers += [mirror, primary]
            pairs[policy] = primary
        for policy, p in pairs.items():
            b.wait_for(f"the {policy} pair's mirror to be in sync",
                       lambda p=p: b.http_json(p.admin_port, "/status")["volumes"][0]["mirrors"][0]["state"]
                       == "in_sync", timeout=600)
        peer = {pol: b.http_json(p.admin_port, "/status")["volumes"][0]["mirrors"][0]["peer"]
                for pol, p in pairs.items()}
        scenarios = [("healthy", {}), (f"slow disk ({args.latency_us} us reads)",
                                      {"read_latency_us": args.latency_us})]
        iops = {(s, w[0], pol): [] for s, _ in scenarios for w in WORKLOADS for pol in POLICIES}
        share = {(s, w[0]): [] for s, _ in scenarios for w in WORKLOADS}
        for r in range(args.rounds):
            for sname, faults in scenarios:
                for p in pairs.values():
                    post(p.admin_port, f"/volumes/{VOLUME}/faults", faults)
                for wname, rw, bs, qd in WORKLOADS:
                    # Alternate which policy runs first, so neither always
                    # gets the page cache the other left.
                    for pol in (POLICIES if r % 2 == 0 else POLICIES[::-1]):
                        p = pairs[pol]
                        m0 = metric_sum(p.admin_port, "blockmirror_reads_total", f'path="{peer[pol]}"')
                        l0 = metric_sum(p.admin_port, "blockmirror_reads_total", 'path="local"')
                        v, _ = b.fio(p.uri, rw, bs, qd, args.runtime, args.size)
                        m1 = metric_sum(p.admin_port, "blockmirror_reads_total", f'path="{peer[pol]}"')
                        l1 = metric_sum(p.admin_port, "blockmirror_reads_total", 'path="local"')
                        iops[(sname, wname, pol)].append(v)
                        frac = (m1 - m0) / max(1.0, (m1 - m0) + (l1 - l0))
                        if pol == "balanced":
                            share[(sname, wname)].append(frac)
                        print(f"round {r + 1}: {sname:24s} {wname:18s} {pol:8s} {v:9.0f} IOPS"
                              f"  mirror share {frac:5.1%}", flush=True)
        print(f"\n{args.rounds} rounds x {args.runtime} s per run, {args.size} per volume, medians:")
        print("| scenario | workload | primary IOPS | balanced IOPS | balanced / primary (per round) "
              "| median ratio | reads on the mirror (balanced) |")
        print("|---|---|---|---|---|---|---|")
        for sname, _ in scenarios:
            for wname, *_ in WORKLOADS:
                a, c = iops[(sname, wname, "primary")], iops[(sname, wname, "balanced")]
                ratios = [y / x for x, y in zip(a, c)]
                print(f"| {sname} | {wname} | {b.median(a):.0f} | {b.median(c):.0f} | "
                      f"{' '.join(f'{r:.2f}' for r in ratios)} | {b.median(ratios):.2f}x | "
                      f"{b.median(share[(sname, wname)]):.1%} |")
    finally:
        for s in reversed(servers):
            s.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
