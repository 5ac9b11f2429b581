#!/usr/bin/env python3
"""NBD front end, no mirror: blockmirror vs nbdkit's file plugin vs qemu-nbd.

Each serves the same kind of file (a 1 GiB image filled with random data,
one copy per server) on loopback TCP; fio's nbd engine drives each in turn,
round by round, so the servers share the machine's noise. Prints the median
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
    args = ap.parse_args()
    b.need("fio", "nbdkit", "qemu-nbd")
    b.build_release()

    size_bytes = int(subprocess.run(["numfmt", "--from=iec", args.size.rstrip("B")], check=True,
                                    capture_output=True, text=True).stdout)
    with tempfile.TemporaryDirectory(prefix="bm-bench-", dir=os.environ.get("BENCH_DIR")) as work:
        images = {}
        seed = os.path.join(work, "seed.img")
        subprocess.run(["dd", "if=/dev/urandom", f"of={seed}", "bs=1M", f"count={size_bytes >> 20}",
                        "status=none"], check=True)
        for name in ("blockmirror", "nbdkit-file", "qemu-nbd"):
            images[name] = os.path.join(work, f"{name}.img")
            subprocess.run(["cp", "--sparse=never", seed, images[name]], check=True)
        os.unlink(seed)
        starters = {
            "blockmirror": lambda: b.blockmirror(work, images["blockmirror"], size_bytes),
            "nbdkit-file": lambda: b.nbdkit(images["nbdkit-file"]),
            "qemu-nbd": lambda: b.qemu_nbd(images["qemu-nbd"]),
        }
        results = {(w[0], s): [] for w in WORKLOADS for s in starters}
        for r in range(args.rounds):
            for wname, rw, bs, qd in WORKLOADS:
                for sname, start in starters.items():
                    srv = start()
                    try:
                        iops, mibs = b.fio(srv.uri, rw, bs, qd, args.runtime, args.size)
                    finally:
                        srv.stop()
                    results[(wname, sname)].append((iops, mibs))
                    print(f"  round {r + 1} {wname:18} {sname:12} {iops:10.0f} IOPS {mibs:8.1f} MiB/s", flush=True)

    print()
    print(f"fio nbd engine, loopback TCP, {args.size} image, {args.runtime}s x {args.rounds} rounds, medians")
    print(f"{'workload':18} {'blockmirror':>14} {'nbdkit-file':>14} {'qemu-nbd':>14} {'vs nbdkit':>10} {'vs qemu-nbd':>12}")
    for wname, *_ in WORKLOADS:
        med = {s: b.median([x[0] for x in results[(wname, s)]]) for s in starters}
        unit = "IOPS"
        print(f"{wname:18} {med['blockmirror']:>9.0f} {unit} {med['nbdkit-file']:>9.0f} {unit} "
              f"{med['qemu-nbd']:>9.0f} {unit} {med['blockmirror'] / med['nbdkit-file']:>9.2f}x "
              f"{med['blockmirror'] / med['qemu-nbd']:>11.2f}x")


if __name__ == "__main__":
    main()
