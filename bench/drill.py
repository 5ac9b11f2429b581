#!/usr/bin/env python3
"""The disaster drill's RTO, and failback bytes against bytes written while apart.

Each round runs `blockmirror demo --drill` (two real node processes on
loopback: write to A, SIGKILL A, promote B, first write on B, write more on
B, restart A which demotes itself, failback), and reads its summary line:

- RTO: from A's SIGKILL to the first host write acknowledged by B, with its
  parts (B noticing the loss; the promote call returning). Absolute times
  are printed for the record, but the figure to compare is the failback
  time against the baseline below.
- failback: bytes B sent to A, against the bytes written on B while A was
  away and the bytes A reported it may hold (its activity-log extents,
  hashed before sending); and the failback's duration against the
  baseline.

Baseline, in the same round: a full copy of a volume of the same size,
filled with random data (a volume in use; the drill's own image is mostly
holes, which nbdcopy would skip), with nbdcopy between two qemu-nbd servers:
what re-seeding the old primary without a failback by bitmap would cost.
Prints medians and ratios.

    python3 bench/drill.py [--rounds 3] [--size 1G]
"""

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time

import benchlib as b


def drill_round(work, r, size):
    d = os.path.join(work, f"r{r}")
    out = subprocess.run([b.release_bin(), "demo", "--drill", "--dir", d, "--size", size],
                         capture_output=True, text=True, timeout=900)
    line = next((l for l in out.stdout.splitlines() if l.startswith("drill-summary ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"drill failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    vals = dict(kv.split("=", 1) for kv in line.split()[1:])
    if vals["ok"] != "true":
        raise SystemExit(f"drill checks failed:\n{out.stdout}")
    return {k: float(v) for k, v in vals.items() if k != "ok"}, os.path.join(d, "drill", "site-b", "drill.img")


def full_copy_secs(work, r, image, size_bytes):
    """nbdcopy of `image` (random data) to an empty image of the same size."""
    dst = os.path.join(work, f"r{r}-full.img")
    with open(dst, "wb") as f:
        f.truncate(size_bytes)
    a, z = b.qemu_nbd(image), b.qemu_nbd(dst)
    try:
        b.drop_caches()
        t0 = time.monotonic()
        subprocess.run(["nbdcopy", a.uri, z.uri], check=True)
        return time.monotonic() - t0
    finally:
        a.stop()
        z.stop()
        os.unlink(dst)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", default="1G")
    args = ap.parse_args()
    b.need("nbdcopy", "qemu-nbd")
    b.build_release()
    work = tempfile.mkdtemp(prefix="bm-drill-")
    rows = []
    try:
        seed = None
        for r in range(args.rounds):
            v, _ = drill_round(work, r, args.size)
            if seed is None:
                seed = os.path.join(work, "seed.img")
                with open(seed, "wb") as f:
                    left = int(v["size_bytes"])
                    while left:
                        n = min(left, 16 << 20)
                        f.write(os.urandom(n))
                        left -= n
            full = full_copy_secs(work, r, seed, int(v["size_bytes"]))
            v["full_s"] = full
            rows.append(v)
            mib = 1 << 20
            print(f"  round {r + 1}: RTO {v['rto_ms']:6.1f} ms (noticed {v['detect_ms']:.0f} ms, promoted "
                  f"{v['promote_ms']:.0f} ms); failback {v['failback_s']:.2f} s vs full copy {full:.2f} s; "
                  f"sent {v['sent_bytes'] / mib:.1f} MiB, written apart {v['apart_bytes'] / mib:.1f} MiB, "
                  f"reported {v['reported_bytes'] / mib:.1f} MiB", flush=True)
            shutil.rmtree(os.path.join(work, f"r{r}"), ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = lambda k: b.median([x[k] for x in rows])
    print()
    print(f"volume {args.size}, {args.rounds} rounds, medians")
    print(f"  RTO (SIGKILL of A -> first write acknowledged by B): {med('rto_ms'):.1f} ms "
          f"(loss noticed {med('detect_ms'):.0f} ms, promote returned {med('promote_ms'):.0f} ms)")
    print(f"  full copy (nbdcopy) time / failback time:  {b.median([x['full_s'] / x['failback_s'] for x in rows]):.2f}  (>= 1: the failback is faster)")
    print(f"  bytes sent / bytes written while apart:    {b.median([x['sent_bytes'] / x['apart_bytes'] for x in rows]):.3f}")
    print(f"  bytes sent / volume size (a full copy):    {b.median([x['sent_bytes'] / x['size_bytes'] for x in rows]):.4f}")
    print(f"  bytes A reported / volume size:            {b.median([x['reported_bytes'] / x['size_bytes'] for x in rows]):.4f}")


if __name__ == "__main__":
    main()
