#!/usr/bin/env python3
"""Async vs sync mirroring vs a standalone primary, with and without WAN delay.

Each round starts every configuration afresh (new folder, new images copied
from one random seed file, new processes) and runs the workloads one
configuration after the other, so they share the machine's noise:

- standalone: a primary with no mirror (the baseline),
- sync: one sync mirror, the link through testkit's delay proxy,
- async: one async mirror (default lag bounds), through the same proxy.

`--delay` sets the proxy's one-way delay; each value is its own set of runs
(0 still goes through the proxy, so sync and async pay the same hop). While
fio runs, the primary's /status is sampled every 20 ms for the async link's
lag (bytes and the age of the oldest unacknowledged write), and the largest
values are printed: the lag the async figure ran at. The page cache is
dropped before every fio run (as root).

With --durable, a fourth configuration runs beside them: async with
`durable_barriers = true` (every epoch flushed on the mirror).

    python3 bench/async.py [--rounds 2] [--runtime 5] [--delay 0 --delay 5ms] [--max-lag 2GiB] [--durable]
"""

import argparse
import os
import shutil
import subprocess
import tempfile
import threading

import benchlib as b

WORKLOADS = [
    # name, rw, bs, iodepth
    ("4k randwrite QD32", "randwrite", "4k", 32),
    ("1M seqwrite QD8", "write", "1M", 8),
]
CONFIGS = ["standalone", "sync", "async"]
VOLUME = "bench"


def secret(path):
    with open(path, "w") as f:
        f.write(os.urandom(32).hex() + "\n")


def testkit_bin():
    return os.path.join(b.target_dir(), "release", "blockmirror-testkit")


def start(kind, workdir, seed, size_bytes, delay, max_lag):
    """Starts one configuration; returns (primary, [processes to stop], proxy or None)."""
    os.makedirs(workdir)
    primary_img = os.path.join(workdir, "primary.img")
    subprocess.run(["cp", "--sparse=never", seed, primary_img], check=True)
    p_nbd, p_admin = b.free_port(), b.free_port()
    servers, head, tail, proxy = [], "", "", None
    if kind != "standalone":
        mirror_img = os.path.join(workdir, "mirror.img")
        subprocess.run(["cp", "--sparse=never", seed, mirror_img], check=True)
        secret(os.path.join(workdir, "secret.key"))
        m_nbd, m_admin, m_listen, p_port = b.free_port(), b.free_port(), b.free_port(), b.free_port()
        mcfg = os.path.join(workdir, "mirror.toml")
        with open(mcfg, "w") as f:
            f.write(f'node = "bench-mirror"\nlisten = "127.0.0.1:{m_listen}"\nadmin = "127.0.0.1:{m_admin}"\n'
                    f'secret_file = "secret.key"\n\n[[volume]]\nname = "{VOLUME}"\npath = "{mirror_img}"\n'
                    f'size = {size_bytes}\nrole = "mirror"\nnbd = "127.0.0.1:{m_nbd}"\n')
        servers.append(b.serve_node(mcfg, m_nbd, m_admin, VOLUME, "mirror"))
        proxy = subprocess.Popen([testkit_bin(), "delay-proxy", "--listen", f"127.0.0.1:{p_port}",
                                  "--to", f"127.0.0.1:{m_listen}", "--delay", delay],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        b.wait_port(p_port, proxy, "delay proxy")
        head = 'secret_file = "secret.key"\n'
        mode = "sync" if kind == "sync" else "async"
        tail = f'mirror_timeout = "30s"\n\n[[volume.mirror]]\npeer = "127.0.0.1:{p_port}"\nmode = "{mode}"\n'
        if mode == "async" and max_lag:
            tail += f'max_lag_bytes = "{max_lag}"\n'
        if kind == "async-durable":
            tail += "durable_barriers = true\n"
    pcfg = os.path.join(workdir, "primary.toml")
    with open(pcfg, "w") as f:
        f.write(f'node = "bench-primary"\nadmin = "127.0.0.1:{p_admin}"\n'
                f'{head}\n[[volume]]\nname = "{VOLUME}"\n'
                f'path = "{primary_img}"\nsize = {size_bytes}\nrole = "primary"\nnbd = "127.0.0.1:{p_nbd}"\n'
                f'{tail}')
    primary = b.serve_node(pcfg, p_nbd, p_admin, VOLUME, "primary")
    servers.append(primary)
    if kind != "standalone":
        b.wait_for("the mirror to be in sync", lambda: link(primary)["state"] == "in_sync", timeout=300)
    return primary, servers, proxy


def link(primary):
    return b.http_json(primary.admin_port, "/status")["volumes"][0]["mirrors"][0]


class LagSampler(threading.Thread):
    """Samples the link's lag while a run goes on; keeps the largest."""

    def __init__(self, primary):
        super().__init__(daemon=True)
        self.primary, self.stop, self.bytes, self.seconds = primary, threading.Event(), 0, 0.0

    def run(self):
        while not self.stop.wait(0.02):
            try:
                st = link(self.primary)
            except Exception:
                continue
            self.bytes = max(self.bytes, st.get("lag_bytes", 0))
            self.seconds = max(self.seconds, st.get("lag_seconds", 0.0))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio run")
    ap.add_argument("--size", default="512M", help="image size (fio addresses all of it)")
    ap.add_argument("--delay", action="append", help="one-way delay of the link (repeatable; default 0 and 5ms)")
    ap.add_argument("--only", default="", help="run only workloads whose name contains this")
    ap.add_argument("--max-lag", default="", help="the async mirror's max_lag_bytes (default: the node's, 64MiB)")
    ap.add_argument("--durable", action="store_true", help="also run async with durable_barriers = true")
    args = ap.parse_args()
    configs = CONFIGS + (["async-durable"] if args.durable else [])
    delays = args.delay or ["0", "5ms"]
    workloads = [w for w in WORKLOADS if args.only in w[0]]
    b.need("fio")
    b.build_release()
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "blockmirror-testkit"], cwd=b.ROOT, check=True)
    size_bytes = int(subprocess.run(["numfmt", "--from=iec", args.size.rstrip("B")], check=True,
                                    capture_output=True, text=True).stdout)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bm-bench-async-", dir=os.environ.get("BENCH_DIR")) as work:
        seed = os.path.join(work, "seed.img")
        subprocess.run(["dd", "if=/dev/urandom", f"of={seed}", "bs=1M", f"count={size_bytes >> 20}",
                        "status=none"], check=True)
        for r in range(args.rounds):
            for delay in delays:
                for kind in configs:
                    if kind == "standalone" and delay != delays[0]:
                        continue  # the baseline has no link: once per round
                    workdir = os.path.join(work, f"r{r}-{delay}-{kind}")
                    primary, servers, proxy = start(kind, workdir, seed, size_bytes, delay, args.max_lag)
                    try:
                        for wname, rw, bs, qd in workloads:
                            b.drop_caches()
                            sampler = LagSampler(primary) if kind.startswith("async") else None
                            if sampler:
                                sampler.start()
                            job = b.fio_job(primary.uri, rw, bs, qd, args.runtime, args.size)
                            if sampler:
                                sampler.stop.set()
                                sampler.join()
                            w = job["write"]
                            fig = w["bw_bytes"] / (1 << 20) if bs == "1M" else w["iops"]
                            lag = (sampler.bytes, sampler.seconds) if sampler else None
                            key = (wname, "-" if kind == "standalone" else delay, kind)
                            results.setdefault(key, []).append((fig, lag))
                            lag_text = f" max lag {lag[0] / (1 << 20):.1f} MiB / {lag[1] * 1000:.0f} ms" if lag else ""
                            print(f"  round {r + 1} delay {delay:>4} {wname:18} {kind:10} {fig:10.0f} "
                                  f"{'MiB/s' if bs == '1M' else 'IOPS'}{lag_text}", flush=True)
                    finally:
                        for s in reversed(servers):
                            s.stop()
                        if proxy:
                            proxy.terminate()
                            proxy.wait()
                    shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(f"async vs sync vs standalone: fio nbd engine, {args.size} image, {args.runtime}s x {args.rounds} "
          f"rounds, medians; mirror link through testkit's delay proxy; "
          f"async max_lag_bytes {args.max_lag or '64MiB (default)'}")
    print(f"{'workload':18} {'delay':>6} {'standalone':>12} {'sync':>12} {'async':>12} {'sync/st':>8} "
          f"{'async/st':>9} {'target':>7}  max async lag")
    for wname, rw, bs, qd in workloads:
        base = b.median([x[0] for x in results[(wname, "-", "standalone")]])
        for delay in delays:
            s = b.median([x[0] for x in results[(wname, delay, "sync")]])
            a = b.median([x[0] for x in results[(wname, delay, "async")]])
            lags = [x[1] for x in results[(wname, delay, "async")]]
            lag_b = max(x[0] for x in lags) / (1 << 20)
            lag_s = max(x[1] for x in lags) * 1000
            verdict = "ok" if a / base >= 0.9 else "BELOW"
            print(f"{wname:18} {delay:>6} {base:12.0f} {s:12.0f} {a:12.0f} {s / base:7.2f}x {a / base:8.2f}x "
                  f"{'>= 0.9':>7} {verdict:5} {lag_b:.1f} MiB / {lag_s:.0f} ms")
            if args.durable:
                d = b.median([x[0] for x in results[(wname, delay, "async-durable")]])
                print(f"{'':18} {delay:>6} async with durable_barriers: {d:.0f} ({d / base:.2f}x standalone, "
                      f"{d / a:.2f}x async)")


if __name__ == "__main__":
    main()
