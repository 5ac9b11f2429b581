"""Shared helpers for blockmirror's benchmarks: start servers, run fio, report ratios.

Every benchmark measures blockmirror and its baseline side by side in the same
run, interleaving them round by round, and reports medians and ratios: these
machines are shared and noisy, so absolute figures alone mean little.
"""

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def need(*tools):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        sys.exit(f"missing tools: {', '.join(missing)} (run scripts/install-deps.sh)")


def build_release():
    """Builds the release binary, unless $BLOCKMIRROR_BIN names one to use as it is."""
    if os.environ.get("BLOCKMIRROR_BIN"):
        return
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "blockmirror"], cwd=ROOT, check=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not start listening on {port}")


class Server:
    """A server process exporting one file over NBD on loopback TCP."""

    def __init__(self, name, argv, port, uri, cwd=None, admin_port=None):
        self.name, self.port, self.uri = name, port, uri
        self.admin_port = admin_port
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port, self.proc, name)

    def cpu_seconds(self):
        """User + system CPU time of the server process so far (all threads)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def blockmirror(workdir, image, size, extra=""):
    port, admin = free_port(), free_port()
    cfg = os.path.join(workdir, "bench-node.toml")
    with open(cfg, "w") as f:
        f.write(
            f'node = "bench"\nadmin = "127.0.0.1:{admin}"\n\n[[volume]]\nname = "bench"\n'
            f'path = "{image}"\nsize = {size}\nrole = "primary"\nnbd = "127.0.0.1:{port}"\n{extra}\n'
        )
    env_argv = [release_bin(), "serve", "--config", cfg]
    return Server("blockmirror", env_argv, port, f"nbd://127.0.0.1:{port}/bench", admin_port=admin)


def nbdkit(image):
    port = free_port()
    argv = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", image]
    return Server("nbdkit-file", argv, port, f"nbd://127.0.0.1:{port}/")


def qemu_nbd(image):
    port = free_port()
    argv = ["qemu-nbd", "-f", "raw", "-x", "bench", "-b", "127.0.0.1", "-p", str(port), "-t", "-e", "16",
            "--discard=unmap", "--cache=writeback", image]
    return Server("qemu-nbd", argv, port, f"nbd://127.0.0.1:{port}/bench")


def fio(uri, rw, bs, iodepth, runtime, size, extra=()):
    """Runs one fio job through its nbd engine; returns (iops, MiB/s)."""
    argv = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={iodepth}", f"--size={size}", f"--runtime={runtime}", "--time_based",
            "--ramp_time=1", "--randrepeat=0", "--norandommap", "--output-format=json", *extra]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return side["iops"], side["bw_bytes"] / (1 << 20)


def drop_caches():
    """Starts every run from the same page-cache state (as root). On this
    kernel, after large sequential I/O the page cache holds large folios and
    a 4 KiB write into one costs several times more (measured 51k vs 77k IOPS
    on the same file): whichever server ran after a 1 MiB job lost. Returns
    False when not allowed."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def median(xs):
    return statistics.median(xs)


def http_json(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return json.loads(r.read())


# --- Added for bench/mirror.py (a primary and its mirror as two nodes). ---


def target_dir():
    """Where cargo puts its output: $CARGO_TARGET_DIR if set, else ROOT/target."""
    return os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")


def release_bin():
    """The release `blockmirror` binary that build_release() made (honours CARGO_TARGET_DIR),
    or $BLOCKMIRROR_BIN when set."""
    return os.environ.get("BLOCKMIRROR_BIN") or os.path.join(target_dir(), "release", "blockmirror")


def pinned(cpus, argv):
    """argv run on the CPUs `cpus` (taskset list syntax, e.g. "0" or "1"); unpinned when None."""
    return (["taskset", "-c", cpus] if cpus is not None else []) + list(argv)


def serve_node(cfg, nbd_port, admin_port, export, name, binary=None, cpus=None):
    """Starts `blockmirror serve --config cfg` (with `binary`, default release_bin(), on `cpus`
    when given); returns a Server once NBD and admin listen."""
    srv = Server(name, pinned(cpus, [binary or release_bin(), "serve", "--config", cfg]), nbd_port,
                 f"nbd://127.0.0.1:{nbd_port}/{export}", admin_port=admin_port)
    wait_port(admin_port, srv.proc, name)
    return srv


def wait_for(what, pred, timeout=60.0):
    """Polls pred() until it returns a true value; exits with a message on timeout."""
    deadline = time.monotonic() + timeout
    pause = 0.01
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(pause)
        pause = min(pause * 2, 0.2)
    sys.exit(f"timed out after {timeout}s waiting for {what}")


def fio_job(uri, rw, bs, iodepth, runtime, size, extra=(), cpus=None):
    """Like fio(), but returns fio's whole JSON job record (latencies, percentiles)."""
    argv = pinned(cpus, ["fio"]) + [
            "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={iodepth}", f"--size={size}", f"--runtime={runtime}", "--time_based",
            "--ramp_time=1", "--randrepeat=0", "--norandommap", "--output-format=json", *extra]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]


_ECHO_SERVER = r"""
import socket, sys
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 0))
l.listen(1)
print(l.getsockname()[1], flush=True)
c, _ = l.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while True:
    b = c.recv(64)
    if not b:
        break
    c.sendall(b)
"""


def loopback_rtt_us(n=10000, two_site=False):
    """Median round trip of a 1-byte ping-pong over loopback TCP (TCP_NODELAY) between
    this process and a child process, in microseconds: the floor that a synchronous
    mirror on loopback adds to every write. With two_site, the two ends are pinned to
    CPUs 0 and 1 like the primary and its mirror, so the figure includes waking the
    other CPU."""
    return loopback_rtt_stats(n, two_site)[0]


def loopback_rtt_stats(n=10000, two_site=False):
    """(median, p99) of loopback_rtt_us's ping-pong, in microseconds."""
    echo = subprocess.Popen(pinned("1" if two_site else None, [sys.executable, "-c", _ECHO_SERVER]),
                            stdout=subprocess.PIPE, text=True)
    mask = os.sched_getaffinity(0)
    try:
        if two_site:
            os.sched_setaffinity(0, {0})
        port = int(echo.stdout.readline())
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(200):  # warm up
                s.sendall(b"x")
                s.recv(64)
            rtts = []
            for _ in range(n):
                t0 = time.perf_counter_ns()
                s.sendall(b"x")
                s.recv(64)
                rtts.append(time.perf_counter_ns() - t0)
        rtts.sort()
        return statistics.median(rtts) / 1000.0, rtts[len(rtts) * 99 // 100] / 1000.0
    finally:
        os.sched_setaffinity(0, mask)
        echo.kill()
        echo.wait()
