#!/usr/bin/env python3
"""Cost of synchronous mirroring: a standalone primary vs a primary with one sync mirror.

Both nodes of the mirrored setup run on this machine and talk over loopback
TCP, so the figures are the mirror's software overhead plus one loopback
round trip per write, not a WAN. Each round starts every configuration
afresh (new directory, new images copied from one random seed file, new
processes; the mirrored primary is measured only once its mirror is in
sync), and runs the workloads one configuration after the other, so both
share the machine's noise. The page cache is dropped before every fio run
(as root). Prints medians and mirrored/standalone ratios.

The QD1 4 KiB write latency is shown beside a loopback TCP round trip
measured in the same run (a 1-byte ping-pong between two processes, median
of 10000): a synchronous mirror cannot add less than one such round trip.

With --unsplit, a third configuration runs beside them: the same mirrored
setup with `track_size = "32MiB"`, so no host write is split into track
subtasks (every write takes the direct path, as before the pipeline), which
isolates what the ordered subtask pipeline (64 KiB tracks) gains or costs.

With --two-site, the two sites of a real deployment are emulated on this
machine: fio and the primary pinned to CPU 0, the mirror alone on CPU 1 (as
on its own machine); the standalone primary is on CPU 0 too. Run it beside
the unpinned figure: pinned, the primary's CPU per write is what limits it.

With --baseline-bin PATH, a fourth runs the mirrored setup with another
build of blockmirror (e.g. the commit before a change), both nodes, for an
A/B of the change in the same run.

    python3 bench/mirror.py [--rounds 3] [--runtime 10] [--size 512M] [--unsplit] [--two-site] [--baseline-bin PATH]
"""

import argparse
import os
import shutil
import subprocess
import tempfile

import benchlib as b

WORKLOADS = [
    # name, rw, bs, iodepth, target ratio (mirrored / standalone)
    ("4k randwrite QD32", "randwrite", "4k", 32, 0.6),
    ("1M seqwrite QD8", "write", "1M", 8, 0.8),
    ("4k randwrite QD1", "randwrite", "4k", 1, None),
]
CONFIGS = ["standalone", "mirrored"]
VOLUME = "bench"



def secret(path):
    with open(path, "w") as f:
        f.write(os.urandom(32).hex() + "\n")


def start_config(kind, workdir, seed, size_bytes, baseline_bin=None, two_site=False):
    """Starts one configuration in a fresh folder; returns (primary Server, [all Servers])."""
    os.makedirs(workdir)
    primary_img = os.path.join(workdir, "primary.img")
    subprocess.run(["cp", "--sparse=never", seed, primary_img], check=True)
    p_nbd, p_admin = b.free_port(), b.free_port()
    servers = []
    head, tail = "", ""  # the primary's secret_file line and its [[volume.mirror]] table
    if kind != "standalone":
        mirror_img = os.path.join(workdir, "mirror.img")
        subprocess.run(["cp", "--sparse=never", seed, mirror_img], check=True)
        secret(os.path.join(workdir, "secret.key"))
        m_nbd, m_admin, m_listen = b.free_port(), b.free_port(), b.free_port()
        mcfg = os.path.join(workdir, "mirror.toml")
        with open(mcfg, "w") as f:
            f.write(f'node = "bench-mirror"\nlisten = "127.0.0.1:{m_listen}"\nadmin = "127.0.0.1:{m_admin}"\n'
                    f'secret_file = "secret.key"\n\n[[volume]]\nname = "{VOLUME}"\npath = "{mirror_img}"\n'
                    f'size = {size_bytes}\nrole = "mirror"\nnbd = "127.0.0.1:{m_nbd}"\n')
        binary = baseline_bin if kind == "baseline" else None
        servers.append(b.serve_node(mcfg, m_nbd, m_admin, VOLUME, "mirror", binary,
                                    cpus="1" if two_site else None))
        head = 'secret_file = "secret.key"\n'
        if kind == "unsplit":
            tail += 'track_size = "32MiB"\n'
        tail += f'\n[[volume.mirror]]\npeer = "127.0.0.1:{m_listen}"\nmode = "sync"\n'
    pcfg = os.path.join(workdir, "primary.toml")
    with open(pcfg, "w") as f:
        f.write(f'node = "bench-primary"\nadmin = "127.0.0.1:{p_admin}"\n{head}\n[[volume]]\nname = "{VOLUME}"\n'
                f'path = "{primary_img}"\nsize = {size_bytes}\nrole = "primary"\nnbd = "127.0.0.1:{p_nbd}"\n{tail}')
    primary = b.serve_node(pcfg, p_nbd, p_admin, VOLUME, "primary",
                           baseline_bin if kind == "baseline" else None,
                           cpus="0" if two_site else None)
    servers.append(primary)
    if kind != "standalone":
        b.wait_for("the mirror to be in sync", lambda: link(primary)["state"] == "in_sync", timeout=120)
    return primary, servers


def link(primary):
    return b.http_json(primary.admin_port, "/status")["volumes"][0]["mirrors"][0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio run")
    ap.add_argument("--size", default="512M", help="image size (fio addresses all of it)")
    ap.add_argument("--only", default="", help="run only workloads whose name contains this")
    ap.add_argument("--unsplit", action="store_true",
                    help="also run the mirrored setup with no write split into track subtasks")
    ap.add_argument("--two-site", action="store_true",
                    help="emulate two sites: fio and the primary pinned to CPU 0, the mirror alone on CPU 1")
    ap.add_argument("--baseline-bin", default="",
                    help="also run the mirrored setup with this blockmirror binary (A/B of a change)")
    args = ap.parse_args()
    ap_bin = args.baseline_bin and os.path.abspath(args.baseline_bin)
    configs = CONFIGS + (["unsplit"] if args.unsplit else []) + (["baseline"] if ap_bin else [])
    b.need("fio")
    workloads = [w for w in WORKLOADS if args.only in w[0]]
    b.build_release()
    size_bytes = int(subprocess.run(["numfmt", "--from=iec", args.size.rstrip("B")], check=True,
                                    capture_output=True, text=True).stdout)

    results = {(w[0], c): [] for w in workloads for c in configs}
    rtts = []
    with tempfile.TemporaryDirectory(prefix="bm-bench-mirror-", dir=os.environ.get("BENCH_DIR")) as work:
        seed = os.path.join(work, "seed.img")
        subprocess.run(["dd", "if=/dev/urandom", f"of={seed}", "bs=1M", f"count={size_bytes >> 20}",
                        "status=none"], check=True)
        for r in range(args.rounds):
            rtts.append(b.loopback_rtt_us())
            print(f"  round {r + 1} loopback TCP round trip {rtts[-1]:.1f} us (median of 10000)", flush=True)
            # Alternate the order round by round, so that no configuration
            # always runs first (or last) on a machine whose speed drifts.
            for kind in (configs if r % 2 == 0 else configs[::-1]):
                workdir = os.path.join(work, f"r{r}-{kind}")
                primary, servers = start_config(kind, workdir, seed, size_bytes, ap_bin, args.two_site)
                try:
                    for wname, rw, bs, qd, _ in workloads:
                        if not b.drop_caches() and r == 0 and kind == configs[0]:
                            print("  (not root: page cache not dropped between runs)")
                        cpu0 = [s.cpu_seconds() for s in servers]
                        job = b.fio_job(primary.uri, rw, bs, qd, args.runtime, args.size,
                                        cpus="0" if args.two_site else None)
                        cpu = [s.cpu_seconds() - c for s, c in zip(servers, cpu0)]
                        w = job["write"]
                        iops, mibs = w["iops"], w["bw_bytes"] / (1 << 20)
                        # fio ramps for 1 s before it measures; count the nodes' CPU over the whole run.
                        ops = iops * (args.runtime + 1)
                        cpu_us = {s.name: c * 1e6 / ops for s, c in zip(servers, cpu)}
                        clat_p50_us = w["clat_ns"]["percentile"]["50.000000"] / 1000.0
                        lat_mean_us = w["lat_ns"]["mean"] / 1000.0
                        if kind != "standalone":
                            st = link(primary)
                            if st["state"] != "in_sync" or st["connection"] != "connected":
                                raise SystemExit(f"the mirror left sync during {wname}: {st}")
                        results[(wname, kind)].append((iops, mibs, clat_p50_us, lat_mean_us, cpu_us))
                        cpu_text = " ".join(f"{n}={v:.1f}" for n, v in cpu_us.items())
                        print(f"  round {r + 1} {wname:18} {kind:10} {iops:9.0f} IOPS {mibs:8.1f} MiB/s "
                              f"p50 {clat_p50_us:7.1f} us mean {lat_mean_us:7.1f} us  CPU us/op {cpu_text}",
                              flush=True)
                finally:
                    for s in reversed(servers):
                        s.stop()
                shutil.rmtree(workdir, ignore_errors=True)

    rtt = b.median(rtts)
    print()
    print(f"sync mirror on loopback vs standalone primary: fio nbd engine, {args.size} image, "
          f"{args.runtime}s x {args.rounds} rounds, medians")
    extra = [c for c in configs if c not in CONFIGS]
    print(f"{'workload':18} {'standalone':>16} {'mirrored':>16} {'mirrored/standalone':>20} {'target':>8}"
          + "".join(f" {c:>16} {c + '/standalone':>19}" for c in extra))
    for wname, rw, bs, qd, target in workloads:
        med = {c: b.median([x[0] for x in results[(wname, c)]]) for c in configs}
        mibs = {c: b.median([x[1] for x in results[(wname, c)]]) for c in configs}
        fig = mibs if bs == "1M" else med
        unit = "MiB/s" if bs == "1M" else "IOPS"
        cells = {c: f"{fig[c]:>10.0f} {unit}" for c in configs}
        ratio = fig["mirrored"] / fig["standalone"]
        tgt = f">= {target}" if target else ""
        verdict = "" if target is None else ("  ok" if ratio >= target else "  BELOW TARGET")
        line = f"{wname:18} {cells['standalone']:>16} {cells['mirrored']:>16} {ratio:>19.2f}x {tgt:>8}{verdict}"
        for c in extra:
            line += f" {cells[c]:>16} {fig[c] / fig['standalone']:>18.2f}x"
        print(line)
    print()
    print("node CPU per operation (us, medians; the mirrored setup's primary and mirror separately)")
    for wname, *_ in workloads:
        cells = []
        for c in configs:
            names = results[(wname, c)][0][4].keys()
            for n in names:
                cells.append(f"{c}:{n}={b.median([x[4][n] for x in results[(wname, c)]]):.1f}")
        print(f"{wname:18} " + "  ".join(cells))
    qd1 = [w for w in workloads if w[3] == 1]
    if qd1:
        wname = qd1[0][0]
        p50 = {c: b.median([x[2] for x in results[(wname, c)]]) for c in CONFIGS}
        mean = {c: b.median([x[3] for x in results[(wname, c)]]) for c in CONFIGS}
        added = p50["mirrored"] - p50["standalone"]
        print()
        print("QD1 4 KiB write latency (us; fio completion latency p50, and mean total latency)")
        print(f"{'':18} {'standalone':>12} {'mirrored':>12} {'added':>10} {'loopback RTT':>14} {'added/RTT':>10}")
        print(f"{'p50':18} {p50['standalone']:>12.1f} {p50['mirrored']:>12.1f} {added:>10.1f} {rtt:>14.1f} "
              f"{added / rtt:>10.1f}")
        added_mean = mean["mirrored"] - mean["standalone"]
        print(f"{'mean':18} {mean['standalone']:>12.1f} {mean['mirrored']:>12.1f} {added_mean:>10.1f} "
              f"{rtt:>14.1f} {added_mean / rtt:>10.1f}")


if __name__ == "__main__":
    main()
