#!/usr/bin/env python3
"""Benchmark of s3backer-rs against C s3backer 1.5.4 and the S3 server's raw limit.

Run through scripts/bench.sh (it builds the release binaries first). Everything runs on one
loopback s3s-fs server; every mount, loop device, process and temp dir is undone on exit.
Python 3.11 standard library only.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OURS = REPO / "target/release/s3backer"
PROXY = REPO / "target/release/s3proxy"
RAW = REPO / "target/release/s3raw"
C_BIN = Path("/usr/bin/s3backer")
S3S_FS = Path.home() / ".cache/s3backer-rs/s3s-fs/bin/s3s-fs"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1 << 20
GIB = 1 << 30

# Identical for both programs. 1 MiB blocks: a 1 MiB O_DIRECT dd request (the kernel's FUSE cap)
# is one whole block, so sequential I/O needs no read-modify-write, and per-request latency is
# amortised over 1 MiB as in real deployments. C 1.5.4 enables its MD5 cache and a 500 ms
# minimum write delay by default (spec 10); both are switched off so both run the same stack.
# Everything else (cache size 1000 blocks, threads, read-ahead, write delay) is each program's
# default, i.e. what a user gets.
COMMON_FLAGS = [
    "--blockSize=1m",
    "--md5CacheSize=0",
    "--md5CacheTime=0",
    "--minWriteDelay=0",
    "--timeout=60",
]
VARIANTS = {
    "plain": [],
    "compress": ["--compress"],
    "encrypt": ["--encrypt", "--password=bench-password"],
}


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="s3b-bench-"))
        self.procs = []  # Popen objects we started, killed by PID on exit
        self.mounts = []  # mount points, unmounted in reverse order on exit
        self.server = None
        self.base_url = None
        self.seq_bytes = args.seq_mib * MIB
        self.log = open(self.tmp / "bench.log", "w")

    # ---- processes and mounts -------------------------------------------------------------

    def say(self, msg):
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)
        self.log.write(msg + "\n")

    def run(self, cmd, **kw):
        self.log.write("$ " + " ".join(map(str, cmd)) + "\n")
        self.log.flush()
        return subprocess.run(cmd, check=True, stdout=kw.pop("stdout", self.log),
                              stderr=kw.pop("stderr", self.log), **kw)

    def spawn(self, cmd, log_name, **kw):
        out = open(self.tmp / log_name, "a")
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=kw.pop("stdout", out),
                             stderr=out, **kw)
        self.procs.append(p)
        return p

    def stop_proc(self, p, sig=signal.SIGTERM, wait=30):
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(wait)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p in self.procs:
            self.procs.remove(p)

    @staticmethod
    def is_mounted(path):
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == str(path) for line in f)

    def wait_for(self, what, cond, limit):
        end = time.monotonic() + limit
        while time.monotonic() < end:
            if cond():
                return
            time.sleep(0.05)
        if not cond():
            raise RuntimeError(f"timed out waiting for {what}")

    def umount(self, path):
        if self.is_mounted(path):
            self.run(["umount", str(path)])
        if path in self.mounts:
            self.mounts.remove(path)

    def cleanup(self):
        for m in reversed(list(self.mounts)):
            if self.is_mounted(m):
                subprocess.run(["umount", str(m)], capture_output=True)
                if self.is_mounted(m):
                    subprocess.run(["umount", "-l", str(m)], capture_output=True)
        for p in list(self.procs):
            if p.poll() is None:
                p.kill()
                p.wait()
        if self.args.keep:
            self.say(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- the S3 server and the proxy ------------------------------------------------------

    @staticmethod
    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def start_server(self):
        data = self.tmp / "s3data"
        data.mkdir()
        port = self.free_port()
        self.server = self.spawn([S3S_FS, "--host", "127.0.0.1", "--port", str(port),
                                  "--access-key", "testkey", "--secret-key", "testsecret",
                                  data], "s3s-fs.log")
        self.wait_for("s3s-fs", lambda: self.connectable(port), 20)
        self.server_addr = f"127.0.0.1:{port}"
        self.base_url = f"http://{self.server_addr}/"
        self.data = data

    @staticmethod
    def connectable(port):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    def start_proxy(self, delay_ms):
        """Returns (process, base URL, stats file); stats are written when it stops."""
        stats = self.tmp / f"proxy-{time.monotonic_ns()}.stats"
        p = self.spawn([PROXY, "--upstream", self.server_addr, "--delay-ms", str(delay_ms),
                        "--stats-file", stats], "s3proxy.log", stdout=subprocess.PIPE)
        addr = p.stdout.readline().decode().strip()
        if not addr:
            raise RuntimeError("s3proxy did not start")
        return p, f"http://{addr}/", stats

    def stop_proxy(self, proxy):
        p, _, stats = proxy
        self.stop_proc(p)
        counts = {}
        for line in stats.read_text().splitlines():
            k, v = line.split()
            counts[k] = int(v)
        return counts

    def new_bucket(self, name):
        path = self.data / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir()
        return name

    def drop_bucket(self, name):
        shutil.rmtree(self.data / name, ignore_errors=True)

    # ---- s3backer mounts ------------------------------------------------------------------

    def mount(self, prog, bucket, base_url, size, extra):
        binary = OURS if prog == "ours" else C_BIN
        mnt = self.tmp / f"mnt-{prog}-{bucket}"
        mnt.mkdir(exist_ok=True)
        args = [binary, f"--baseURL={base_url}", "--accessId=testkey",
                "--accessKey=testsecret", *COMMON_FLAGS, *extra]
        if size:
            args.append(f"--size={size}")
        args += ["-f", bucket, str(mnt)]
        p = self.spawn(args, f"{prog}-{bucket}.log")
        self.mounts.append(mnt)
        self.wait_for(f"{prog} mount", lambda: self.is_mounted(mnt) or p.poll() is not None, 60)
        if not self.is_mounted(mnt):
            raise RuntimeError(f"{prog} did not mount; see {self.tmp}/{prog}-{bucket}.log")
        return p, mnt

    def unmount(self, m):
        """Unmounts and reaps the process; returns its whole-life CPU seconds (wait4 rusage)."""
        p, mnt = m
        self.umount(mnt)
        end = time.monotonic() + 600
        cpu = 0.0
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid == p.pid:
                p.returncode = os.waitstatus_to_exitcode(status)
                cpu = ru.ru_utime + ru.ru_stime
                break
            if time.monotonic() > end:
                p.kill()
                p.wait()
                break
            time.sleep(0.05)
        if p in self.procs:
            self.procs.remove(p)
        if p.returncode != 0:
            raise RuntimeError(f"s3backer exited with {p.returncode} at unmount; see {self.tmp}")
        return cpu

    @staticmethod
    def cpu_seconds(p):
        with open(f"/proc/{p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    @staticmethod
    def peak_rss_mib(p):
        with open(f"/proc/{p.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def timed(self, m, fn):
        """Runs fn(); returns (wall seconds, CPU seconds of the s3backer process, result)."""
        # The server's files of earlier phases go to disk first, not during this one.
        os.sync()
        cpu0 = self.cpu_seconds(m[0])
        t0 = time.monotonic()
        result = fn()
        wall = time.monotonic() - t0
        return wall, self.cpu_seconds(m[0]) - cpu0, result

    # ---- workloads ------------------------------------------------------------------------

    def source_file(self):
        src = self.tmp / "random.bin"
        if not src.exists():
            self.run(["dd", "if=/dev/urandom", f"of={src}", "bs=1M",
                      f"count={self.args.seq_mib}", "status=none"])
        return src

    def small_tree(self):
        tree = self.tmp / "tree"
        if not tree.exists():
            import random
            rng = random.Random(42)
            for i in range(self.args.tree_files):
                d = tree / f"d{i % 64:02d}"
                d.mkdir(parents=True, exist_ok=True)
                (d / f"f{i:05d}").write_bytes(rng.randbytes(rng.randint(512, 16384)))
        size = sum(f.stat().st_size for f in tree.rglob("*") if f.is_file())
        return tree, size

    def seq_rows(self, prog, base_url, variant, label, out):
        """Sequential write with dd oflag=direct conv=fsync, then a cold read after remount."""
        bucket = self.new_bucket(f"seq-{prog}-{variant}")
        extra = VARIANTS[variant]
        src = self.source_file()
        m = self.mount(prog, bucket, base_url, f"{self.args.seq_mib}m", extra)
        wall, cpu, _ = self.timed(m, lambda: self.run(
            ["dd", f"if={src}", f"of={m[1]}/file", "bs=1M", f"count={self.args.seq_mib}",
             "oflag=direct", "conv=fsync,notrunc", "status=none"]))
        rss = self.peak_rss_mib(m[0])
        # The process is timed until its unmount flush is done: C answers fsync at once, so
        # its upload finishes only at close/unmount; both pay for it here.
        t0 = time.monotonic()
        cpu_before = self.cpu_seconds(m[0])
        cpu += self.unmount(m) - cpu_before
        wall += time.monotonic() - t0
        gib = self.seq_bytes / GIB
        out[f"{label}seq write MiB/s"] = self.seq_bytes / MIB / wall
        out[f"{label}seq write CPU s/GiB"] = cpu / gib
        m = self.mount(prog, bucket, base_url, None, extra)
        wall, cpu, _ = self.timed(m, lambda: self.run(
            ["dd", f"if={m[1]}/file", "of=/dev/null", "bs=1M", f"count={self.args.seq_mib}",
             "iflag=direct", "status=none"]))
        rss = max(rss, self.peak_rss_mib(m[0]))
        self.unmount(m)
        out[f"{label}cold seq read MiB/s"] = self.seq_bytes / MIB / wall
        out[f"{label}cold seq read CPU s/GiB"] = cpu / gib
        out[f"{label}peak RSS MiB"] = rss
        self.drop_bucket(bucket)

    def ext4_mount(self, fuse_mnt, name):
        ext4 = self.tmp / f"ext4-{name}"
        ext4.mkdir(exist_ok=True)
        self.run(["mount", "-o", "loop", f"{fuse_mnt}/file", str(ext4)])
        self.mounts.append(ext4)
        return ext4

    def fio(self, ext4, rw):
        f = ext4 / "fio.dat"
        cmd = ["fio", "--name=bench", f"--filename={f}", f"--size={self.args.fio_mib}M",
               "--bs=4k", f"--rw={rw}", "--direct=1", "--ioengine=libaio", "--iodepth=32",
               f"--runtime={self.args.fio_secs}", "--time_based", "--end_fsync=1",
               "--output-format=json"]
        t0 = time.monotonic()
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        wall = time.monotonic() - t0
        job = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
        ios = job["read" if rw == "randread" else "write"]["total_ios"]
        # IOPS over the whole run, the final fsync included (fio's own figure leaves it out).
        return ios / wall, ios * 4096

    def ext4_rows(self, prog, base_url, label, out, with_tree=True):
        bucket = self.new_bucket(f"ext4-{prog}")
        m = self.mount(prog, bucket, base_url, self.args.ext4_size, [])
        self.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", f"{m[1]}/file"])
        ext4 = self.ext4_mount(m[1], prog)
        if with_tree:
            tree, size = self.small_tree()
            wall, cpu, _ = self.timed(m, lambda: (
                self.run(["cp", "-a", str(tree), str(ext4 / "tree")]),
                self.run(["sync", "-f", str(ext4)])))
            out[f"{label}small-file copy+sync s"] = wall
            out[f"{label}small-file copy CPU s/GiB"] = cpu / (size / GIB)
        # Lay the fio file out first, untimed.
        self.run(["fio", "--name=layout", f"--filename={ext4}/fio.dat",
                  f"--size={self.args.fio_mib}M", "--create_only=1"])
        self.run(["sync", "-f", str(ext4)])
        wall, cpu, (iops, moved) = self.timed(m, lambda: self.fio(ext4, "randwrite"))
        out[f"{label}fio 4k randwrite IOPS"] = iops
        out[f"{label}fio randwrite CPU s/GiB"] = cpu / (moved / GIB)
        self.umount(ext4)
        self.unmount(m)
        # Cold: remount so the reads come from the bucket.
        m = self.mount(prog, bucket, base_url, None, [])
        ext4 = self.ext4_mount(m[1], prog)
        wall, cpu, (iops, moved) = self.timed(m, lambda: self.fio(ext4, "randread"))
        out[f"{label}fio 4k randread IOPS (cold)"] = iops
        out[f"{label}fio randread CPU s/GiB"] = cpu / (moved / GIB)
        out[f"{label}ext4 peak RSS MiB"] = self.peak_rss_mib(m[0])
        self.umount(ext4)
        self.unmount(m)
        self.drop_bucket(bucket)

    def mkfs_rows(self, prog, out):
        """mkfs.ext4 of a fresh 100 GiB disk; requests counted by a zero-delay proxy."""
        proxy = self.start_proxy(0)
        bucket = self.new_bucket(f"mkfs-{prog}")
        m = self.mount(prog, bucket, proxy[1], "100g", ["--listBlocks"])
        t0 = time.monotonic()
        self.run(["mkfs.ext4", "-q", "-F", f"{m[1]}/file"])
        self.run(["sync", "-f", f"{m[1]}/file"])
        self.unmount(m)
        out["mkfs.ext4 100 GiB s (incl. unmount flush)"] = time.monotonic() - t0
        counts = self.stop_proxy(proxy)
        # s3proxy counts a GET of the bucket (a --listBlocks listing) as LIST.
        for meth in ("GET", "PUT", "DELETE", "HEAD", "LIST"):
            out[f"mkfs requests {meth}"] = counts.get(f"requests_{meth}", 0)
        out["mkfs requests total"] = counts.get("requests", 0)
        self.drop_bucket(bucket)

    def raw_rows(self, base_url, label, out):
        bucket = self.new_bucket("raw")
        res = subprocess.run([RAW, "--base-url", base_url, "--bucket", bucket,
                              "--total-mib", str(self.args.seq_mib),
                              "--threads", str(self.args.raw_threads)],
                             check=True, capture_output=True, text=True)
        for line in res.stdout.splitlines():
            k, v = line.split()
            name = {"put_mib_s": "seq write MiB/s", "get_mib_s": "cold seq read MiB/s"}[k]
            out[f"{label}{name}"] = float(v)
        self.drop_bucket(bucket)

    def nbd_serve(self, bucket, base_url, size):
        """Our binary serving `bucket` over NBD on a Unix socket (foreground)."""
        sock = self.tmp / f"nbd-{bucket}.sock"
        args = [OURS, f"--baseURL={base_url}", "--accessId=testkey", "--accessKey=testsecret",
                *COMMON_FLAGS, f"--nbd-socket={sock}", "-f"]
        if size:
            args.append(f"--size={size}")
        p = self.spawn([*args, bucket], f"nbd-{bucket}.log")
        self.wait_for("NBD socket", lambda: sock.exists() or p.poll() is not None, 60)
        if not sock.exists():
            raise RuntimeError(f"NBD server did not start; see {self.tmp}/nbd-{bucket}.log")
        return p, f"nbd+unix:///?socket={sock}"

    def nbd_stop(self, p):
        """SIGTERM (flush, then exit); returns the whole-life CPU seconds."""
        os.kill(p.pid, signal.SIGTERM)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        self.procs.remove(p)
        if p.returncode != 0:
            raise RuntimeError(f"NBD server exited with {p.returncode}; see {self.tmp}")
        return ru.ru_utime + ru.ru_stime

    def nbd_fio(self, uri, rw):
        sock = uri.split("socket=", 1)[1]
        cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}",
               f"--size={self.args.fio_mib}M", "--bs=4k", f"--rw={rw}", "--iodepth=32",
               f"--runtime={self.args.fio_secs}", "--time_based", "--output-format=json"]
        del sock
        t0 = time.monotonic()
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        wall = time.monotonic() - t0
        job = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
        return job["read" if rw == "randread" else "write"]["total_ios"] / wall

    def nbd_rows(self, base_url, label, out):
        """The NBD frontend (ours only): nbdcopy in (with a final flush) and out, fio's nbd
        engine for 4 KiB random I/O on the raw export."""
        bucket = self.new_bucket("nbd-seq")
        src = self.source_file()
        gib = self.seq_bytes / GIB
        p, uri = self.nbd_serve(bucket, base_url, f"{self.args.seq_mib}m")
        t0 = time.monotonic()
        self.run(["nbdcopy", "--flush", str(src), uri])
        cpu = self.nbd_stop(p)
        out[f"{label}NBD nbdcopy write MiB/s"] = self.seq_bytes / MIB / (time.monotonic() - t0)
        out[f"{label}NBD nbdcopy write CPU s/GiB"] = cpu / gib
        p, uri = self.nbd_serve(bucket, base_url, None)
        t0 = time.monotonic()
        self.run(["nbdcopy", uri, "null:"])
        wall = time.monotonic() - t0
        cpu = self.nbd_stop(p)
        out[f"{label}NBD nbdcopy cold read MiB/s"] = self.seq_bytes / MIB / wall
        out[f"{label}NBD nbdcopy cold read CPU s/GiB"] = cpu / gib
        self.drop_bucket(bucket)
        bucket = self.new_bucket("nbd-fio")
        p, uri = self.nbd_serve(bucket, base_url, f"{self.args.fio_mib}m")
        out[f"{label}NBD fio 4k randwrite IOPS"] = self.nbd_fio(uri, "randwrite")
        self.nbd_stop(p)
        p, uri = self.nbd_serve(bucket, base_url, None)
        out[f"{label}NBD fio 4k randread IOPS (cold)"] = self.nbd_fio(uri, "randread")
        self.nbd_stop(p)
        self.drop_bucket(bucket)

    # ---- one run --------------------------------------------------------------------------

    def one_run(self, n):
        results = {"ours": {}, "c": {}, "raw": {}}
        self.say(f"run {n}: raw limit")
        self.raw_rows(self.base_url, "", results["raw"])
        proxy = self.start_proxy(self.args.delay_ms)
        self.raw_rows(proxy[1], "+25ms ", results["raw"])
        self.stop_proxy(proxy)
        for prog in ("ours", "c"):
            out = results[prog]
            for variant in VARIANTS:
                if variant != "plain" and self.args.skip_variants:
                    continue
                self.say(f"run {n}: {prog} sequential ({variant})")
                label = "" if variant == "plain" else f"[{variant}] "
                self.seq_rows(prog, self.base_url, variant, label, out)
            if prog == "ours":
                self.say(f"run {n}: ours over NBD")
                self.nbd_rows(self.base_url, "", out)
            self.say(f"run {n}: {prog} ext4")
            self.ext4_rows(prog, self.base_url, "", out)
            self.say(f"run {n}: {prog} mkfs 100 GiB")
            self.mkfs_rows(prog, out)
            proxy = self.start_proxy(self.args.delay_ms)
            self.say(f"run {n}: {prog} with {self.args.delay_ms} ms per request")
            self.seq_rows(prog, proxy[1], "plain", "+25ms ", out)
            self.ext4_rows(prog, proxy[1], "+25ms ", out, with_tree=False)
            if prog == "ours":
                self.nbd_rows(proxy[1], "+25ms ", out)
            self.stop_proxy(proxy)
        return results

    def main(self):
        self.start_server()
        runs = []
        t0 = time.monotonic()
        for n in range(1, self.args.runs + 1):
            runs.append(self.one_run(n))
        wall = time.monotonic() - t0
        # Raw figures first: a failing report must not cost the run.
        (self.tmp.parent / "s3b-bench-runs.json").write_text(json.dumps(runs, indent=1))
        med = {p: {k: statistics.median(r[p][k] for r in runs) for k in runs[0][p]}
               for p in runs[0]}
        write_report(self.args, med, runs, wall)
        self.say(f"wrote {self.args.output} ({wall:.0f} s)")


# ---- report ---------------------------------------------------------------------------------

def version(cmd):
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
    except OSError:
        return "?"
    lines = (res.stdout + res.stderr).strip().splitlines()
    return lines[0].strip() if lines else "?"


def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) // 1024} MiB"
    load = open("/proc/loadavg").read().split()[:3]
    return cpu, mem, " ".join(load)


HIGHER_IS_BETTER = ("MiB/s", "IOPS")


def fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def ratio(a, b):
    return f"{a / b:.2f}" if b else "n/a"


def targets(med):
    ours, c, raw = med["ours"], med["c"], med["raw"]
    rows = []

    def check(name, ok, detail):
        rows.append(f"| {name} | {'met' if ok else '**missed**'} | {detail} |")

    for key in ("seq write MiB/s", "cold seq read MiB/s"):
        rc, rr = ours[key] / c[key], ours[key] / raw[key]
        check(f"{key.split(' MiB')[0]}: >= 2x C and >= 85% of raw", rc >= 2 and rr >= 0.85,
              f"ours/C {rc:.2f}, ours/raw {rr:.2f}")
    for key in ("fio 4k randread IOPS (cold)", "fio 4k randwrite IOPS"):
        r = ours[key] / c[key]
        check(f"{key}: >= 2x C", r >= 2, f"ours/C {r:.2f}")
    for key in ("+25ms seq write MiB/s", "+25ms cold seq read MiB/s"):
        r = ours[key] / c[key]
        check(f"{key}: >= 3x C", r >= 3, f"ours/C {r:.2f}")
    for key in [k for k in ours if "CPU s/GiB" in k and k in c
                and ("[" not in k or "[encrypt]" in k)]:
        r = ours[key] / c[key] if c[key] else float("inf")
        check(f"{key}: <= 0.5x C", r <= 0.5, f"ours/C {r:.2f}")
    cache_mib = 1000  # default --blockCacheSize 1000 x 1 MiB blocks
    for key in [k for k in ours if "RSS" in k]:
        check(f"{key}: < cache ({cache_mib} MiB) + 64 MiB", ours[key] < cache_mib + 64,
              f"{ours[key]:.0f} MiB")
    return rows


def write_report(args, med, runs, wall):
    cpu, mem, load = machine()
    ours, c, raw = med["ours"], med["c"], med["raw"]
    lines = [
        "# Benchmarks",
        "",
        "Written by `scripts/bench.sh`; do not edit by hand. Medians of "
        f"{len(runs)} run(s); ratios are ours/C and ours/raw (higher is better for MiB/s and "
        "IOPS, lower for seconds and CPU).",
        "",
        f"- Command: `{' '.join(['scripts/bench.sh'] + sys.argv[1:])}`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, total wall time "
        f"{wall / 60:.1f} min",
        f"- Machine: {os.cpu_count()} CPUs ({cpu}), {mem} RAM, kernel {platform.release()}, "
        f"load average at the end {load}",
        f"- Ours: `{version([str(OURS), '--version'])}` (release build); C: "
        f"`{version([str(C_BIN), '--version'])}` (Debian); server: s3s-fs 0.14.1 on loopback; "
        f"`{version(['fio', '--version'])}`",
        f"- Flags for both programs: `{' '.join(COMMON_FLAGS)}`, defaults otherwise; "
        f"sequential size {args.seq_mib} MiB, ext4 disk {args.ext4_size}, "
        f"{args.tree_files} small files, fio file {args.fio_mib} MiB for {args.fio_secs} s at "
        f"iodepth 32, delay proxy {args.delay_ms} ms per request, raw client "
        f"{args.raw_threads} threads of whole 1 MiB objects",
    ]
    if args.noisy:
        lines.append("- **Noisy**: the machine was shared with other builds during the run; "
                     "treat the figures as indicative.")
    if args.quick:
        lines.append("- **Quick mode** (small sizes, one run): for development, not for claims.")
    lines += ["", "## Targets", "", "| Target | Status | Figures |", "|---|---|---|"]
    lines += targets(med)
    lines += ["", "## Figures", "", "| Row | ours | C 1.5.4 | raw | ours/C | ours/raw |",
              "|---|---|---|---|---|---|"]
    for key in [k for k in ours if "NBD" not in k]:
        r = raw.get(key.replace("[compress] ", "").replace("[encrypt] ", ""))
        if "CPU" in key or "RSS" in key or "mkfs" in key or "small-file" in key:
            r = None
        lines.append(f"| {key} | {fmt(ours[key])} | {fmt(c.get(key, 0))} | "
                     f"{fmt(r) if r else ''} | {ratio(ours[key], c.get(key, 0))} | "
                     f"{ratio(ours[key], r) if r else ''} |")
    nbd = [k for k in ours if "NBD" in k]
    if nbd:
        lines += ["", "## NBD (ours only) beside our FUSE rows", "",
                  "| Row | NBD | FUSE | NBD/FUSE |", "|---|---|---|---|"]
        for key in nbd:
            fuse_key = (key.replace("NBD nbdcopy write", "seq write")
                        .replace("NBD nbdcopy cold read", "cold seq read")
                        .replace("NBD fio", "fio"))
            f = ours.get(fuse_key)
            lines.append(f"| {key} | {fmt(ours[key])} | {fmt(f) if f else ''} | "
                         f"{ratio(ours[key], f) if f else ''} |")
    analysis = REPO / "bench/analysis.md"
    if analysis.exists():
        lines += ["", analysis.read_text().rstrip()]
    lines += ["", "## Every run", "", "```", json.dumps(runs, indent=1), "```", ""]
    lines += [
        "## How it is measured",
        "",
        "- Sequential write: `dd if=<random file> of=<fuse file> bs=1M oflag=direct conv=fsync`, "
        "timed until the s3backer process has exited after `umount` (C answers `fsync` at once "
        "and uploads at close/unmount; the clock stops when the data is in the bucket for both).",
        "- Cold sequential read: remount, `dd ... iflag=direct bs=1M` to /dev/null.",
        "- ext4: `mkfs.ext4 -E nodiscard`, loop mount, `cp -a` of the small-file tree then "
        "`sync -f`; fio 4 KiB `randwrite` (direct, libaio, iodepth 32, `end_fsync`) and, after "
        "a remount, `randread`; IOPS = completed I/Os / wall time including the final fsync.",
        "- C s3backer answers `fsync` before uploading (spec 6.2; ours waits for the upload), "
        "so C's ext4 `sync` and fio randwrite figures leave out uploads that ours include.",
        "- CPU: user+sys ticks of the s3backer process from `/proc/PID/stat` over the phase, "
        "per GiB moved by the workload. RSS: `VmHWM` of the process.",
        "- mkfs: `mkfs.ext4` of a fresh 100 GiB disk mounted with `--listBlocks`, then `sync` "
        "and unmount; requests counted by `s3proxy` (zero delay) between s3backer and the "
        "server.",
        "- +25ms rows: the same workloads through `s3proxy --delay-ms 25` (the delay is added "
        "to every request, concurrently).",
        "- Raw: `s3raw` PUTs then GETs the same number of 1 MiB objects with parallel threads.",
        "- NBD (ours only): `s3backer --nbd-socket`; `nbdcopy --flush` of the random file in, "
        "timed until the server has exited after SIGTERM (its final flush); after a restart "
        "`nbdcopy` out to `null:`; fio's `nbd` engine 4 KiB randwrite/randread (iodepth 32) on "
        "the raw export (no ext4 and no loop device, unlike the FUSE fio rows).",
        "",
    ]
    Path(args.output).write_text("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes, one run")
    ap.add_argument("--noisy", action="store_true", help="mark the figures as noisy")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir and logs")
    ap.add_argument("--skip-variants", action="store_true",
                    help="no --compress/--encrypt rows")
    ap.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    ap.add_argument("--seq-mib", type=int, default=1024)
    ap.add_argument("--ext4-size", default="4g")
    ap.add_argument("--tree-files", type=int, default=5000)
    ap.add_argument("--fio-mib", type=int, default=512)
    ap.add_argument("--fio-secs", type=int, default=20)
    ap.add_argument("--delay-ms", type=int, default=25)
    ap.add_argument("--raw-threads", type=int, default=32)
    args = ap.parse_args()
    if args.quick:
        args.runs = 1
        args.seq_mib, args.ext4_size, args.tree_files = 64, "512m", 300
        args.fio_mib, args.fio_secs = 64, 3
    if os.geteuid() != 0:
        sys.exit("bench: needs root (FUSE and loop mounts)")
    for tool in (OURS, PROXY, RAW, C_BIN, S3S_FS):
        if not tool.exists():
            sys.exit(f"bench: {tool} is missing (scripts/bench.sh builds and installs it)")
    bench = Bench(args)
    # SIGTERM/SIGINT unwind through the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        bench.main()
    finally:
        bench.cleanup()


if __name__ == "__main__":
    main()
