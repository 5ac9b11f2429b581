#!/usr/bin/env python3
"""Verify of a volume pair vs `qemu-img compare` of the same two images over NBD.

One primary node and one sync mirror node on loopback, both images a copy of
one file of random data (so neither tool can skip zeroes or holes), the mirror
in sync. Each round runs, one after the other on the same warm page cache:

- baseline: `qemu-img compare -f raw -F raw PRIMARY_NBD MIRROR_NBD` (both
  exports of the running nodes; it reads every byte of both over NBD),
- `blockmirror verify VOLUME` (checksum mode: each side hashes its own
  data, only digests cross the link),
- `blockmirror verify VOLUME --full` (data compare: the primary reads its
  image and the mirror's over a job connection).

Prints median wall times and the ratio baseline / verify (above 1: verify is
faster). All three must report "identical" (exit 0), else the run fails.

    python3 bench/verify.py [--rounds 3] [--size 2G] [--jobs 8 ...]
"""

import argparse
import os
import resource
import subprocess
import tempfile
import time

import benchlib as b

VOLUME = "bench"


def write_random(path, size):
    chunk = 64 << 20
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


def warm(*paths):
    for p in paths:
        subprocess.run(["cat", p], stdout=subprocess.DEVNULL, check=True)


def child_cpu():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed(argv):
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {r.returncode}:\n{r.stdout}{r.stderr}")
    return dt, r.stdout.strip()


def parse_size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", default="2G")
    ap.add_argument("--jobs", type=int, action="append", default=[],
                    help="also run verify with --jobs N (repeatable), to compare parallelism")
    args = ap.parse_args()
    size = parse_size(args.size)
    b.need("qemu-img")
    b.build_release()
    work = tempfile.mkdtemp(prefix="bm-verify-bench-")
    pimg, mimg = os.path.join(work, "primary.img"), os.path.join(work, "mirror.img")
    write_random(pimg, size)
    subprocess.run(["cp", "--sparse=never", pimg, mimg], check=True)
    with open(os.path.join(work, "secret.key"), "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    m_nbd, m_admin, m_listen = b.free_port(), b.free_port(), b.free_port()
    p_nbd, p_admin = b.free_port(), b.free_port()
    mcfg, pcfg = os.path.join(work, "mirror.toml"), os.path.join(work, "primary.toml")
    with open(mcfg, "w") as f:
        f.write(f'node = "bench-mirror"\nlisten = "127.0.0.1:{m_listen}"\nadmin = "127.0.0.1:{m_admin}"\n'
                f'secret_file = "secret.key"\n\n[[volume]]\nname = "{VOLUME}"\npath = "{mimg}"\n'
                f'size = {size}\nrole = "mirror"\nnbd = "127.0.0.1:{m_nbd}"\n')
    with open(pcfg, "w") as f:
        f.write(f'node = "bench-primary"\nadmin = "127.0.0.1:{p_admin}"\nsecret_file = "secret.key"\n\n'
                f'[[volume]]\nname = "{VOLUME}"\npath = "{pimg}"\nsize = {size}\nrole = "primary"\n'
                f'nbd = "127.0.0.1:{p_nbd}"\n\n[[volume.mirror]]\npeer = "127.0.0.1:{m_listen}"\nmode = "sync"\n')
    servers = []
    try:
        mirror = b.serve_node(mcfg, m_nbd, m_admin, VOLUME, "mirror")
        servers.append(mirror)
        primary = b.serve_node(pcfg, p_nbd, p_admin, VOLUME, "primary")
        servers.append(primary)
        # A new mirror is copied whole first.
        b.wait_for("the mirror to be in sync",
                   lambda: b.http_json(p_admin, "/status")["volumes"][0]["mirrors"][0]["state"] == "in_sync",
                   timeout=600)
        bin_ = b.release_bin()
        runs = {
            "qemu-img compare": ["qemu-img", "compare", "-f", "raw", "-F", "raw", primary.uri, mirror.uri],
            "verify (checksums)": [bin_, "verify", VOLUME, "--admin", f"127.0.0.1:{p_admin}"],
            "verify --full": [bin_, "verify", VOLUME, "--admin", f"127.0.0.1:{p_admin}", "--full"],
        }
        for j in args.jobs:
            runs[f"verify --jobs {j}"] = [bin_, "verify", VOLUME, "--admin", f"127.0.0.1:{p_admin}",
                                          "--jobs", str(j)]
            runs[f"verify --full --jobs {j}"] = [bin_, "verify", VOLUME, "--admin", f"127.0.0.1:{p_admin}",
                                                 "--full", "--jobs", str(j)]
        times = {k: [] for k in runs}
        cpus = {k: [] for k in runs}
        for r in range(args.rounds):
            for name, argv in runs.items():
                warm(pimg, mimg)
                c0 = primary.cpu_seconds() + mirror.cpu_seconds() + child_cpu()
                dt, out = timed(argv)
                cpu = primary.cpu_seconds() + mirror.cpu_seconds() + child_cpu() - c0
                if "identical" not in out.lower():
                    raise SystemExit(f"{name} did not report identical images: {out}")
                times[name].append(dt)
                cpus[name].append(cpu)
                print(f"round {r + 1}: {name:20s} {dt:7.2f} s  CPU {cpu:6.2f} s", flush=True)
        base = b.median(times["qemu-img compare"])
        base_cpu = b.median(cpus["qemu-img compare"])
        gib = size / (1 << 30)
        print(f"\n{gib:.1f} GiB pair, {args.rounds} rounds, medians "
              f"(CPU: both nodes plus the client, user+system):")
        print("| run | wall s | GiB/s | CPU s | qemu-img compare / run (wall) | (CPU) |")
        print("|---|---|---|---|---|---|")
        for name in runs:
            t, c = b.median(times[name]), b.median(cpus[name])
            print(f"| {name} | {t:.2f} | {gib / t:.2f} | {c:.2f} | {base / t:.2f}x | {base_cpu / c:.2f}x |")
    finally:
        for s in reversed(servers):
            s.stop()
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
