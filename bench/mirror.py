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

With --qemu, the peer a user would otherwise pick runs beside them: QEMU's
active mirror, `qemu-storage-daemon` exporting the image over NBD with a
`blockdev-mirror` job (`copy-mode=write-blocking`, `sync=full`, driven over
its QMP socket) to a `qemu-nbd` target; measured once the job is ready (the
target in sync). With --two-site the daemon is on CPU 0 and qemu-nbd on CPU 1,
like blockmirror's primary and mirror.

After every mirrored configuration the processes are stopped and the two
images compared byte for byte (`cmp`): a benchmark run that loses a write fails.

With --tls, the mirrored setup also runs with `[tls]` on both nodes (certificates
from `blockmirror certs init`): the replication link is mutual TLS (rustls), the
HMAC handshake inside it; the host's NBD connection stays plaintext, as in the
other configurations. Printed as tls/mirrored, with each node's CPU per write.

With --baseline-bin PATH, a fourth runs the mirrored setup with another
build of blockmirror (e.g. the commit before a change), both nodes, for an
A/B of the change in the same run.

    python3 bench/mirror.py [--rounds 3] [--runtime 10] [--size 512M] [--unsplit] [--two-site] [--qemu] [--tls] [--baseline-bin PATH]
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time

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


class Qmp:
    """A minimal QMP client on a unix socket: one command at a time, events skipped."""

    def __init__(self, path, proc, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"qemu-storage-daemon's QMP socket {path} did not open")
                time.sleep(0.05)
        self.f = self.sock.makefile("rw")
        json.loads(self.f.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "error" in r:
                raise SystemExit(f"QMP {name}: {r['error']}")
            if "return" in r:
                return r["return"]


def start_qemu(workdir, primary_img, mirror_img, two_site):
    """QEMU's active mirror: qemu-nbd serving the target, qemu-storage-daemon exporting the
    primary image with a write-blocking blockdev-mirror job to it. Returns (Server, [Servers])."""
    t_port, s_port = b.free_port(), b.free_port()
    target = b.Server("mirror", b.pinned("1" if two_site else None,
                      ["qemu-nbd", "-f", "raw", "-x", "tgt", "-b", "127.0.0.1", "-p", str(t_port), "-t",
                       mirror_img]), t_port, f"nbd://127.0.0.1:{t_port}/tgt")
    qmp_path = os.path.join(workdir, "qmp.sock")
    qsd = b.Server("primary", b.pinned("0" if two_site else None, [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=file0,filename={primary_img}",
        "--blockdev", "driver=raw,node-name=src,file=file0",
        "--blockdev", f"driver=nbd,node-name=tgt,server.type=inet,server.host=127.0.0.1,"
                      f"server.port={t_port},export=tgt",
        "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={s_port}",
        "--export", f"type=nbd,id=exp0,node-name=src,name={VOLUME},writable=on",
        "--chardev", f"socket,path={qmp_path},server=on,wait=off,id=qmp0",
        "--monitor", "chardev=qmp0"]), s_port, f"nbd://127.0.0.1:{s_port}/{VOLUME}")
    qsd.qmp = Qmp(qmp_path, qsd.proc)
    qsd.qmp.cmd("blockdev-mirror", **{"job-id": "m0", "device": "src", "target": "tgt",
                                      "sync": "full", "copy-mode": "write-blocking"})
    b.wait_for("QEMU's mirror job to be ready",
               lambda: any(j.get("ready") for j in qsd.qmp.cmd("query-block-jobs")), timeout=120)
    return qsd, [target, qsd]


def stop_qemu(qsd):
    """Ends the mirror job in sync (cancel of a ready job completes without a pivot), then quits."""
    qsd.qmp.cmd("block-job-cancel", device="m0")
    b.wait_for("QEMU's mirror job to end", lambda: not qsd.qmp.cmd("query-block-jobs"), timeout=60)
    qsd.qmp.cmd("quit")
    qsd.proc.wait(timeout=30)


def tls_table(certs, node):
    return (f'\n[tls]\nca = "{certs}/ca.pem"\ncert = "{certs}/{node}.pem"\nkey = "{certs}/{node}.key"\n'
            f'admin_https = false\n')


def start_config(kind, workdir, seed, size_bytes, baseline_bin=None, two_site=False, certs=None):
    """Starts one configuration in a fresh folder; returns (primary Server, [all Servers])."""
    os.makedirs(workdir)
    if kind == "qemu":
        primary_img = os.path.join(workdir, "primary.img")
        mirror_img = os.path.join(workdir, "mirror.img")
        subprocess.run(["cp", "--sparse=never", seed, primary_img], check=True)
        subprocess.run(["cp", "--sparse=never", seed, mirror_img], check=True)
        return start_qemu(workdir, primary_img, mirror_img, two_site)
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
            if kind == "tls":
                f.write(tls_table(certs, "bench-mirror"))
        binary = baseline_bin if kind == "baseline" else None
        servers.append(b.serve_node(mcfg, m_nbd, m_admin, VOLUME, "mirror", binary,
                                    cpus="1" if two_site else None))
        head = 'secret_file = "secret.key"\n'
        if kind == "unsplit":
            tail += 'track_size = "32MiB"\n'
        tail += f'\n[[volume.mirror]]\npeer = "127.0.0.1:{m_listen}"\nmode = "sync"\n'
        if kind == "tls":
            tail += 'peer_name = "bench-mirror"\n' + tls_table(certs, "bench-primary")
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
    ap.add_argument("--qemu", action="store_true",
                    help="also run QEMU's active mirror (qemu-storage-daemon blockdev-mirror "
                         "copy-mode=write-blocking to qemu-nbd)")
    ap.add_argument("--tls", action="store_true",
                    help="also run the mirrored setup with mutual TLS on the replication link")
    ap.add_argument("--baseline-bin", default="",
                    help="also run the mirrored setup with this blockmirror binary (A/B of a change)")
    args = ap.parse_args()
    ap_bin = args.baseline_bin and os.path.abspath(args.baseline_bin)
    configs = (CONFIGS + (["unsplit"] if args.unsplit else []) + (["tls"] if args.tls else [])
               + (["baseline"] if ap_bin else [])
               + (["qemu"] if args.qemu else []))
    b.need("fio", *(["qemu-storage-daemon", "qemu-nbd"] if args.qemu else []))
    workloads = [w for w in WORKLOADS if args.only in w[0]]
    b.build_release()
    size_bytes = int(subprocess.run(["numfmt", "--from=iec", args.size.rstrip("B")], check=True,
                                    capture_output=True, text=True).stdout)

    results = {(w[0], c): [] for w in workloads for c in configs}
    rtts = []
    with tempfile.TemporaryDirectory(prefix="bm-bench-mirror-", dir=os.environ.get("BENCH_DIR")) as work:
        certs = os.path.join(work, "certs")
        if args.tls:
            subprocess.run([b.release_bin(), "certs", "init", certs, "--nodes", "bench-primary,bench-mirror"],
                           check=True, capture_output=True)
        seed = os.path.join(work, "seed.img")
        subprocess.run(["dd", "if=/dev/urandom", f"of={seed}", "bs=1M", f"count={size_bytes >> 20}",
                        "status=none"], check=True)
        for r in range(args.rounds):
            rtt, rtt99 = b.loopback_rtt_stats(two_site=args.two_site)
            rtts.append(rtt)
            where = ", CPU 0 to CPU 1" if args.two_site else ""
            print(f"  round {r + 1} loopback TCP round trip {rtt:.1f} us, p99 {rtt99:.0f} us "
                  f"(10000 ping-pongs{where}; the machine's wake-up latency)", flush=True)
            # Alternate the order round by round, so that no configuration
            # always runs first (or last) on a machine whose speed drifts.
            for kind in (configs if r % 2 == 0 else configs[::-1]):
                workdir = os.path.join(work, f"r{r}-{kind}")
                primary, servers = start_config(kind, workdir, seed, size_bytes, ap_bin, args.two_site, certs)
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
                        if kind not in ("standalone", "qemu"):
                            st = link(primary)
                            if st["state"] != "in_sync" or st["connection"] != "connected":
                                raise SystemExit(f"the mirror left sync during {wname}: {st}")
                        results[(wname, kind)].append((iops, mibs, clat_p50_us, lat_mean_us, cpu_us))
                        cpu_text = " ".join(f"{n}={v:.1f}" for n, v in cpu_us.items())
                        print(f"  round {r + 1} {wname:18} {kind:10} {iops:9.0f} IOPS {mibs:8.1f} MiB/s "
                              f"p50 {clat_p50_us:7.1f} us mean {lat_mean_us:7.1f} us  CPU us/op {cpu_text}",
                              flush=True)
                finally:
                    if kind == "qemu" and primary.proc.poll() is None:
                        stop_qemu(primary)
                    for s in reversed(servers):
                        s.stop()
                if kind != "standalone":
                    same = subprocess.run(["cmp", "-s", os.path.join(workdir, "primary.img"),
                                           os.path.join(workdir, "mirror.img")]).returncode == 0
                    if not same:
                        raise SystemExit(f"round {r + 1} {kind}: the mirror differs from the primary")
                    print(f"  round {r + 1} {kind:10} mirror image identical to the primary's (cmp)", flush=True)
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
    if "tls" in configs:
        print()
        print("sync mirror with mutual TLS on the link / without (same run, medians; target >= 0.85 at 4 KiB, "
              ">= 0.75 at 1 MiB)")
        for wname, rw, bs, qd, target in workloads:
            key = 1 if bs == "1M" else 0
            plain = b.median([x[key] for x in results[(wname, "mirrored")]])
            tls = b.median([x[key] for x in results[(wname, "tls")]])
            print(f"{wname:18} {tls / plain:>6.2f}x")
    if "qemu" in configs:
        print()
        print("blockmirror's sync mirror / QEMU's active mirror (same emulation, medians)")
        for wname, rw, bs, qd, target in workloads:
            key = 1 if bs == "1M" else 0
            ours = b.median([x[key] for x in results[(wname, "mirrored")]])
            theirs = b.median([x[key] for x in results[(wname, "qemu")]])
            print(f"{wname:18} {ours / theirs:>6.2f}x")
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
