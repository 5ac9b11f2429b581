#!/usr/bin/env python3
"""Initial sync of a blank mirror vs nbdcopy copying the same image between two NBD servers.

Each round, on this machine and over loopback TCP, one after the other so
both share the machine's noise:

- blockmirror: a mirror node with a new (blank) volume, then a primary node
  whose image is a copy of a random seed file; timed from the primary's
  start until its link reports `in_sync` (the initial sync of seed 004
  FIG. 2, with no host writes: one pass and a final copy of nothing).
- baseline: two qemu-nbd servers (the same seed copy, and an empty image of
  the same size); `nbdcopy` from one to the other, timed.

The page cache is dropped before each timed copy (as root). Prints medians
and the ratio nbdcopy time / blockmirror time (>= 1.0: blockmirror is as fast).

Then, with --load: one more initial sync while fio writes 4 KiB random blocks
(QD32, --load-iops per second, default 2000) to the primary the whole time;
prints the passes and how long the final copy suspended host writes.

    python3 bench/resync.py [--rounds 3] [--size 2G] [--load]
"""

import argparse
import os
import shutil
import subprocess
import tempfile
import time

import benchlib as b

VOLUME = "bench"


def secret(path):
    with open(path, "w") as f:
        f.write(os.urandom(32).hex() + "\n")


def start_pair(workdir, seed, size_bytes, extra=""):
    """A blank mirror node, then a primary with a copy of seed. Returns (primary, mirror, t_start)."""
    os.makedirs(workdir)
    primary_img = os.path.join(workdir, "primary.img")
    subprocess.run(["cp", "--sparse=never", seed, primary_img], check=True)
    mirror_img = os.path.join(workdir, "mirror.img")
    secret(os.path.join(workdir, "secret.key"))
    m_nbd, m_admin, m_listen = b.free_port(), b.free_port(), b.free_port()
    mcfg = os.path.join(workdir, "mirror.toml")
    with open(mcfg, "w") as f:
        f.write(f'node = "bench-mirror"\nlisten = "127.0.0.1:{m_listen}"\nadmin = "127.0.0.1:{m_admin}"\n'
                f'secret_file = "secret.key"\n\n[[volume]]\nname = "{VOLUME}"\npath = "{mirror_img}"\n'
                f'size = {size_bytes}\nrole = "mirror"\nnbd = "127.0.0.1:{m_nbd}"\n')
    mirror = b.serve_node(mcfg, m_nbd, m_admin, VOLUME, "mirror")
    p_nbd, p_admin = b.free_port(), b.free_port()
    pcfg = os.path.join(workdir, "primary.toml")
    with open(pcfg, "w") as f:
        f.write(f'node = "bench-primary"\nadmin = "127.0.0.1:{p_admin}"\nsecret_file = "secret.key"\n\n'
                f'[[volume]]\nname = "{VOLUME}"\npath = "{primary_img}"\nsize = {size_bytes}\n'
                f'role = "primary"\nnbd = "127.0.0.1:{p_nbd}"\n{extra}\n'
                f'[[volume.mirror]]\npeer = "127.0.0.1:{m_listen}"\nmode = "sync"\n')
    b.drop_caches()
    t0 = time.monotonic()
    primary = b.serve_node(pcfg, p_nbd, p_admin, VOLUME, "primary")
    return primary, mirror, t0, primary_img, mirror_img


def link(primary):
    return b.http_json(primary.admin_port, "/status")["volumes"][0]["mirrors"][0]


def blockmirror_round(work, r, seed, size_bytes, check):
    workdir = os.path.join(work, f"r{r}-blockmirror")
    primary, mirror, t0, pimg, mimg = start_pair(workdir, seed, size_bytes)
    try:
        st = b.wait_for("the mirror to be in sync", lambda: (lambda l: l if l["state"] == "in_sync" else None)(link(primary)),
                        timeout=600)
        secs = time.monotonic() - t0
    finally:
        primary.stop()
        mirror.stop()
    if check:
        subprocess.run(["cmp", pimg, mimg], check=True)
    shutil.rmtree(workdir, ignore_errors=True)
    return secs, st


def nbdcopy_round(work, r, seed, size_bytes):
    workdir = os.path.join(work, f"r{r}-nbdcopy")
    os.makedirs(workdir)
    src = os.path.join(workdir, "src.img")
    dst = os.path.join(workdir, "dst.img")
    subprocess.run(["cp", "--sparse=never", seed, src], check=True)
    with open(dst, "wb") as f:
        f.truncate(size_bytes)
    a, z = b.qemu_nbd(src), b.qemu_nbd(dst)
    try:
        b.drop_caches()
        t0 = time.monotonic()
        subprocess.run(["nbdcopy", a.uri, z.uri], check=True)
        secs = time.monotonic() - t0
    finally:
        a.stop()
        z.stop()
    shutil.rmtree(workdir, ignore_errors=True)
    return secs


def load_round(work, seed, size_bytes, runtime, iops):
    workdir = os.path.join(work, "load")
    primary, mirror, t0, pimg, mimg = start_pair(workdir, seed, size_bytes)
    try:
        fio = subprocess.Popen(["fio", "--name=load", "--ioengine=nbd", f"--uri={primary.uri}", "--rw=randwrite",
                                "--bs=4k", "--iodepth=32", f"--size={size_bytes}", "--time_based",
                                f"--runtime={runtime}", f"--rate_iops={iops}", "--randrepeat=0", "--norandommap",
                                "--output-format=json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        st = b.wait_for("the mirror to be in sync under load",
                        lambda: (lambda l: l if l["state"] == "in_sync" else None)(link(primary)), timeout=900)
        secs = time.monotonic() - t0
        out, err = fio.communicate()
        if fio.returncode != 0:
            raise SystemExit(f"fio failed: {err}")
        b.wait_for("in sync after the load", lambda: link(primary)["state"] == "in_sync", timeout=120)
        subprocess.run(["qemu-io", "-f", "raw", "-c", "flush", primary.uri], check=True, capture_output=True)
    finally:
        primary.stop()
        mirror.stop()
    subprocess.run(["cmp", pimg, mimg], check=True)
    shutil.rmtree(workdir, ignore_errors=True)
    return secs, st


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", default="2G")
    ap.add_argument("--load", action="store_true", help="also measure the final-copy suspension under fio")
    ap.add_argument("--load-runtime", type=int, default=60, help="seconds fio writes during the loaded sync")
    ap.add_argument("--load-iops", type=int, default=2000,
                    help="fio's write rate: above what the copy can outrun, passes never converge "
                         "and the sync goes live instead (reported as 0 ms suspension)")
    args = ap.parse_args()
    b.need("nbdcopy", "qemu-nbd", "fio", "qemu-io")
    b.build_release()
    size_bytes = int(subprocess.run(["numfmt", "--from=iec", args.size.rstrip("B")], check=True,
                                    capture_output=True, text=True).stdout)
    bm, nc = [], []
    with tempfile.TemporaryDirectory(prefix="bm-bench-resync-", dir=os.environ.get("BENCH_DIR")) as work:
        seed = os.path.join(work, "seed.img")
        subprocess.run(["dd", "if=/dev/urandom", f"of={seed}", "bs=1M", f"count={size_bytes >> 20}",
                        "status=none"], check=True)
        for r in range(args.rounds):
            secs, st = blockmirror_round(work, r, seed, size_bytes, check=(r == 0))
            bm.append(secs)
            print(f"  round {r + 1} blockmirror initial sync {secs:7.2f} s "
                  f"({size_bytes / secs / (1 << 20):7.1f} MiB/s, {st['resync_passes']} passes, "
                  f"final copy suspended {st.get('resync_suspension_us', 0)} us)", flush=True)
            secs = nbdcopy_round(work, r, seed, size_bytes)
            nc.append(secs)
            print(f"  round {r + 1} nbdcopy qemu-nbd->qemu-nbd {secs:7.2f} s "
                  f"({size_bytes / secs / (1 << 20):7.1f} MiB/s)", flush=True)
        m_bm, m_nc = b.median(bm), b.median(nc)
        print()
        print(f"initial sync of a blank {args.size} mirror (random data, loopback), medians of {args.rounds}")
        print(f"{'blockmirror':>14} {'nbdcopy':>10} {'nbdcopy/blockmirror':>20} {'target':>8}")
        verdict = "ok" if m_nc / m_bm >= 1.0 else "BELOW TARGET"
        print(f"{m_bm:>12.2f} s {m_nc:>8.2f} s {m_nc / m_bm:>19.2f}x {'>= 1.0':>8}  {verdict}")
        if args.load:
            secs, st = load_round(work, seed, size_bytes, args.load_runtime, args.load_iops)
            print()
            print(f"initial sync under fio 4k randwrite QD32 at {args.load_iops} IOPS over the whole {args.size}: "
                  f"{secs:.2f} s, {st['resync_passes']} passes, host writes suspended "
                  f"{st.get('resync_suspension_us', 0)} us by the final copy; images identical (cmp)")
            print(f"  link at in_sync: {st}")


if __name__ == "__main__":
    main()
