#!/usr/bin/env python3
"""NBD front end, no mirror: blockmirror vs nbdkit's file plugin vs qemu-nbd.

Each serves the same kind of file (a 1 GiB image filled with random data,
one copy per server) on loopback TCP; fio's nbd engine drives each in turn,
round by round, so the servers share the machine's noise. The page cache is
dropped before every run (as root), so each starts from the same state; for
read workloads the image is then read once, so reads hit the page cache for
every server alike. Prints the median
of each and blockmirror's ratio to each baseline (>= 1.0 means at least as fast).

    python3 bench/frontend.py [--rounds 3] [--runtime 10]
"""

import argparse
import os
import subprocess
import tempfile

import benchlib as b


WORKLOADS = [
    # name, rw, bs, iodepth
    ("4k randwrite QD32", "randwrite", "4k", 32),
    ("4k randread QD32", "randread", "4k", 32),
    ("1M seqwrite QD8", "write", "1M", 8),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio run")
    ap.add_argument("--size", default="1G", help="image size (fio addresses all of it)")
    ap.add_argument("--only", default="", help="run only workloads whose name contains this")
    ap.add_argument("--servers", default="blockmirror,nbdkit-file,qemu-nbd")
    args = ap.parse_args()
    b.need("fio", "nbdkit", "qemu-nbd")
    workloads = [w for w in WORKLOADS if args.only in w[0]]
    servers = args.servers.split(",")
    b.build_release()

    size_bytes = int(subprocess.run(["numfmt", "--from=iec", args.size.rstrip("B")], check=True,
                                    capture_output=True, text=True).stdout)
    with tempfile.TemporaryDirectory(prefix="bm-bench-", dir=os.environ.get("BENCH_DIR")) as work:
        images = {}
        seed = os.path.join(work, "seed.img")
        subprocess.run(["dd", "if=/dev/urandom", f"of={seed}", "bs=1M", f"count={size_bytes >> 20}",
                        "status=none"], check=True)
        for name in servers:
            images[name] = os.path.join(work, f"{name}.img")
            subprocess.run(["cp", "--sparse=never", seed, images[name]], check=True)
        os.unlink(seed)
        all_starters = {
            "blockmirror": lambda: b.blockmirror(work, images["blockmirror"], size_bytes),
            "nbdkit-file": lambda: b.nbdkit(images["nbdkit-file"]),
            "qemu-nbd": lambda: b.qemu_nbd(images["qemu-nbd"]),
        }
        starters = {s: all_starters[s] for s in servers}
        results = {(w[0], s): [] for w in workloads for s in starters}
        for r in range(args.rounds):
            for wname, rw, bs, qd in workloads:
                for sname, start in starters.items():
                    if not b.drop_caches() and r == 0:
                        print("  (cannot drop the page cache: not root; runs may differ in cache state)")
                    if "read" in rw:
                        # Reads measure the server, not the disk: every server
                        # starts with its whole image in the page cache.
                        with open(images[sname], "rb") as f:
                            while f.read(8 << 20):
                                pass
                    srv = start()
                    try:
                        cpu0 = srv.cpu_seconds()
                        iops, mibs = b.fio(srv.uri, rw, bs, qd, args.runtime, args.size)
                        # fio ramps for 1 s before it measures; count the server's CPU over the whole run.
                        cpu_us_per_op = (srv.cpu_seconds() - cpu0) * 1e6 / (iops * (args.runtime + 1))
                    finally:
                        srv.stop()
                    results[(wname, sname)].append((iops, mibs, cpu_us_per_op))
                    print(f"  round {r + 1} {wname:18} {sname:12} {iops:10.0f} IOPS {mibs:8.1f} MiB/s "
                          f"{cpu_us_per_op:6.1f} server-CPU-us/op", flush=True)

    print()
    print(f"fio nbd engine, loopback TCP, {args.size} image, {args.runtime}s x {args.rounds} rounds, medians")
    others = [s for s in starters if s != "blockmirror"]
    print(f"{'workload':18}" + "".join(f" {s:>16}" for s in starters) + "".join(f" {'vs ' + s:>16}" for s in others))
    for wname, rw, bs, _ in workloads:
        med = {s: b.median([x[0] for x in results[(wname, s)]]) for s in starters}
        mibs = {s: b.median([x[1] for x in results[(wname, s)]]) for s in starters}
        cell = (lambda s: f"{mibs[s]:>11.0f} MiB/s") if bs == "1M" else (lambda s: f"{med[s]:>12.0f} IOPS")
        print(f"{wname:18}" + "".join(f" {cell(s)}" for s in starters)
              + "".join(f" {med['blockmirror'] / med[s]:>15.2f}x" for s in others))
    print()
    print("server CPU per operation (us, medians; lower is better)")
    for wname, *_ in workloads:
        cpu = {s: b.median([x[2] for x in results[(wname, s)]]) for s in starters}
        print(f"{wname:18}" + "".join(f" {s}={cpu[s]:.1f}" for s in starters))


if __name__ == "__main__":
    main()
