#!/usr/bin/env python3
"""wal-push and wal-fetch called the way PostgreSQL calls them, beside `cp`, in one run.

Makes a backlog of real WAL segments with pgbench on a throwaway PostgreSQL 15 cluster whose
archive_command fails (so every segment stays in pg_wal with its .ready file, as behind a slow
archiver), then, serially and one process per segment:

  push  cp        pg_wal/X -> a local directory
  push  walship   wal-push pg_wal/X, with the .ready files present; X.ready -> X.done after each
                  successful call, as PostgreSQL's archiver does
  fetch cp        archived copy -> pg_wal/RECOVERYXLOG, then consumed (deleted, as recovery
                  does before it restores the next segment)
  fetch walship   wal-fetch X pg_wal/RECOVERYXLOG from a data directory with a postmaster.pid,
                  so the prefetcher runs as it does in recovery; the file is consumed after each

Push timings include a sync before each call, for cp and walship alike: an archive_command must
not report a segment archived before its copy is durable (walship fsyncs or waits for the store;
a bare cp does not, so the sync stands in for it). Fetch timings do not: restore_command's output
need not survive a crash, and PostgreSQL does not sync it. Every fetch configuration first runs
one untimed pass that keeps each fetched file and compares its sha256 with the original.

and reports segments/s, MB/s, stored bytes, the time of calls that found their work done, and
peak RSS. Run it through bench/wal, which installs what it needs and builds walship --release.
"""

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
from benchlib import AS_ROOT, PGBIN, as_pg, run

RSS_FILE = None
PASSES = 3  # every row is the best of this many passes, cp's and walship's alike


def timed(args, cwd=None, env=None, sync=True):
    return benchlib.timed(args, RSS_FILE, cwd=cwd, env=env, sync=sync)


def best_cp(names, src, dest_dir, dest, after=lambda x: None, sync=True):
    """cp each segment, one process each; the best time of PASSES passes and the peak RSS."""
    best, rss = float("inf"), 0
    for _ in range(PASSES):
        shutil.rmtree(dest_dir, ignore_errors=True)
        dest_dir.mkdir()
        os.sync()  # no writeback of an earlier phase in this one
        t0 = time.perf_counter()
        for x in names:
            _, kib, code, _ = timed(["cp", src(x), dest(x)], sync=sync)
            assert code == 0
            after(x)
            rss = max(rss, kib)
        best = min(best, time.perf_counter() - t0)
    return best, rss


def make_backlog(work, segments):
    data = work / "pg"
    sock = work / "sock"
    sock.mkdir()
    if AS_ROOT:
        run(["chown", "-R", "postgres:postgres", work])
    run(as_pg([PGBIN / "initdb", "-A", "trust", "-U", "postgres", "--no-sync", "-D", data]),
        stdout=subprocess.DEVNULL)
    with open(data / "postgresql.conf", "a") as f:
        f.write(f"\nlisten_addresses = ''\nunix_socket_directories = '{sock}'\nport = 54399\n"
                "wal_level = replica\narchive_mode = on\narchive_command = 'exit 1'\n"
                "max_wal_size = '8GB'\ncheckpoint_timeout = '1h'\nfsync = off\n"
                "log_min_messages = fatal\n")
    run(as_pg([PGBIN / "pg_ctl", "-D", data, "-l", work / "pg.log", "-w", "start"]),
        stdout=subprocess.DEVNULL)
    pgb = [PGBIN / "pgbench", "-h", sock, "-p", "54399", "-U", "postgres"]
    try:
        run(as_pg(pgb + ["-i", "-s", "20", "-q", "postgres"]), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        while len(ready_names(data)) < segments + 1:
            run(as_pg(pgb + ["-n", "-c", "2", "-T", "5", "postgres"]), stdout=subprocess.DEVNULL)
            run(as_pg([PGBIN / "psql", "-X", "-q", "-h", sock, "-p", "54399", "-U", "postgres",
                       "-c", "select pg_switch_wal()", "postgres"]), stdout=subprocess.DEVNULL)
    finally:
        run(as_pg([PGBIN / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"]),
            stdout=subprocess.DEVNULL)
    names = ready_names(data)
    # pgbench -i's own WAL comes first; the benchmark uses the segments of the real load.
    return data, names[-segments:]


def ready_names(data):
    st = data / "pg_wal" / "archive_status"
    return sorted(n[:-6] for n in os.listdir(st) if n.endswith(".ready") and len(n) == 30)


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def row(what, secs, n, nbytes, rss_kib=None, extra=""):
    segs = n / secs
    mbs = nbytes / secs / 1e6
    rss = f"{rss_kib / 1024:.0f} MiB" if rss_kib else "-"
    return f"| {what} | {n} | {secs:.2f} | {segs:.1f} | {mbs:.0f} | {rss} | {extra} |"


def bench_push(label, walship, cfg, data, names, env):
    wal = data / "pg_wal"
    times, rss, done_fast = [], 0, []
    os.sync()  # no writeback of an earlier phase in this one
    t0 = time.perf_counter()
    for n in names:
        secs, kib, code, err = timed([walship, "--config", cfg, "wal-push", f"pg_wal/{n}"],
                                     cwd=data, env=env)
        if code != 0:
            sys.exit(f"{label}: wal-push {n} failed ({code}): {err}")
        os.rename(wal / "archive_status" / f"{n}.ready", wal / "archive_status" / f"{n}.done")
        times.append(secs)
        rss = max(rss, kib)
        if "uploaded earlier by look-ahead" in err:
            done_fast.append(secs)
    total = time.perf_counter() - t0
    return total, rss, times, done_fast


def reset_status(data, names):
    st = data / "pg_wal" / "archive_status"
    for n in names:
        if (st / f"{n}.done").exists():
            os.rename(st / f"{n}.done", st / f"{n}.ready")
    shutil.rmtree(data / "pg_wal" / ".walship", ignore_errors=True)


def prefetchers():
    """Pids of running wal-prefetch processes."""
    pids = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and b"wal-prefetch" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            pass
    return pids


def prefetcher_hwm():
    """Peak RSS (KiB) of running wal-prefetch processes."""
    best = 0
    for pid in prefetchers():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    best = max(best, int(line.split()[1]))
        except OSError:
            pass
    return best


def wait_prefetchers_gone(timeout=30):
    """The prefetcher empties its spool as it exits: wait for that before removing the directory."""
    deadline = time.monotonic() + timeout
    while prefetchers():
        if time.monotonic() > deadline:
            sys.exit("the prefetcher did not exit after its server stopped")
        time.sleep(0.05)


def bench_fetch(label, walship, cfg, work, names, env, prefetch, digests=None):
    """One pass of wal-fetch calls. With `digests`, untimed use: keep every fetched file and check
    it against its sha256; otherwise each file is deleted after its call, as recovery consumes it.
    Returns (seconds, peak RSS KiB, prefetcher peak RSS KiB, times of calls that found their
    segment spooled, times of calls that waited for the prefetcher's download of it)."""
    data = work / f"fetch-{label}"
    wal = data / "pg_wal"
    wal.mkdir(parents=True)
    keep = work / f"fetched-{label}"
    keep.mkdir()
    # The prefetcher serves the server named in postmaster.pid; this script stands in for it.
    (data / "postmaster.pid").write_text(f"{os.getpid()}\n{data}\n")
    env = dict(env, WALSHIP_PREFETCH=str(prefetch))
    rss, ready, waited = 0, [], []
    os.sync()  # no writeback of an earlier phase in this one
    t0 = time.perf_counter()
    for n in names:
        secs, kib, code, err = timed([walship, "--config", cfg, "wal-fetch", n,
                                      "pg_wal/RECOVERYXLOG"], cwd=data, env=env, sync=False)
        if code != 0:
            sys.exit(f"{label}: wal-fetch {n} failed ({code}): {err}")
        if digests:
            os.rename(wal / "RECOVERYXLOG", keep / n)
        else:
            os.unlink(wal / "RECOVERYXLOG")  # recovery consumes it
        rss = max(rss, kib)
        if "served from the prefetch spool after waiting" in err:
            waited.append(secs)
        elif "served from the prefetch spool" in err:
            ready.append(secs)
    total = time.perf_counter() - t0
    hwm = prefetcher_hwm()
    (data / "postmaster.pid").unlink()  # the "server" stops: the prefetcher exits
    wait_prefetchers_gone()
    if digests:
        for x in names:
            got = hashlib.sha256((keep / x).read_bytes()).hexdigest()
            assert got == digests[x], f"{x} fetched with other content"
    shutil.rmtree(keep)
    shutil.rmtree(data)
    return total, rss, hwm, ready, waited


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--walship", required=True, type=Path)
    ap.add_argument("--segments", type=int, default=64)
    ap.add_argument("--s3-env", type=Path, help="env file printed by minio-test/s3-server")
    ap.add_argument("--work", type=Path,
                    help="work directory, kept afterwards; one from an earlier run is reused "
                         "with its WAL backlog (default: a new temp dir, removed)")
    ap.add_argument("--compression-level", type=int, help="zstd level (default: walship's)")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="walship-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    global RSS_FILE
    RSS_FILE = str(work / "rss")
    os.chmod(work, 0o755)
    print(f"# work directory {work}", file=sys.stderr)
    walship = work / "walship"
    shutil.copy(args.walship, walship)

    base_env = {k: v for k, v in os.environ.items() if not k.startswith("WALSHIP_")}
    base_env["WALSHIP_LOG"] = "walship=info"
    if args.compression_level:
        base_env["WALSHIP_COMPRESSION_LEVEL"] = str(args.compression_level)
    configs, s3_text = benchlib.repo_configs(work, walship, args.s3_env, "PUSHRUN")
    repos = {label: (cfg, base_env) for label, cfg in configs.items()}

    if (work / "pg" / "PG_VERSION").exists():  # --work of an earlier run: reuse its backlog
        data = work / "pg"
        reset_status(data, sorted(n for n in os.listdir(data / "pg_wal") if len(n) == 24))
        names = ready_names(data)[-args.segments:]
        for d in ("archive", "cp-archive", "cp-fetched"):
            shutil.rmtree(work / d, ignore_errors=True)
        for d in work.glob("fetch*"):
            shutil.rmtree(d, ignore_errors=True)
        (work / "archive").mkdir()
    else:
        print(f"# making {args.segments} segments of pgbench WAL", file=sys.stderr)
        data, names = make_backlog(work, args.segments)
    if AS_ROOT:
        run(["chown", "-R", f"{os.getuid()}:{os.getgid()}", data])
    n = len(names)
    seg_bytes = sum((data / "pg_wal" / x).stat().st_size for x in names)
    digests = {x: hashlib.sha256((data / "pg_wal" / x).read_bytes()).hexdigest() for x in names}

    out = []
    header = ("| what | segments | seconds | segments/s | MB/s | peak RSS | notes |\n"
              "|---|---:|---:|---:|---:|---:|---|")

    # ---- push
    # Timings on a shared VM swing from pass to pass (cp's with the disk's writeback, since it
    # writes every byte and wal-push a twelfth): every row is the best of PASSES passes.
    dest = work / "cp-archive"
    cp_push, rss = best_cp(names, lambda x: data / "pg_wal" / x, dest, lambda x: dest / x)
    out.append(row("push: `cp` to a local directory", cp_push, n, seg_bytes, rss))
    for label, (cfg, env) in repos.items():
        for lookahead in (0, 16):
            best = None
            for attempt in range(PASSES):
                reset_status(data, names)
                if label == "file://":
                    shutil.rmtree(work / "archive")
                    (work / "archive").mkdir()
                else:  # a fresh prefix for each pass
                    cfg.write_text(s3_text.replace("PREFIX", f"la{lookahead}-{attempt}"))
                e = dict(env, WALSHIP_LOOKAHEAD=str(lookahead))
                result = bench_push(label, walship, cfg, data, names, e)
                if best is None or result[0] < best[0]:
                    best = result
            total, rss, times, fast = best
            note = f"{n / total / (n / cp_push):.2f}x cp"
            if fast:
                note += (f"; {len(fast)} calls found their segment uploaded ahead: "
                         f"median {statistics.median(fast) * 1000:.1f} ms, "
                         f"p95 {pct(fast, 95) * 1000:.1f} ms")
            out.append(row(f"push: `wal-push` → {label}, look-ahead {lookahead}",
                           total, n, seg_bytes, rss, note))
    stored = sum(p.stat().st_size for p in (work / "archive").rglob("*")
                 if p.is_file() and len(p.name) == 24)
    ratio = f"stored {stored / 1e6:.1f} MB of {seg_bytes / 1e6:.1f} MB: {seg_bytes / stored:.1f}:1"

    # ---- fetch
    keep = work / "cp-fetched"
    # As recovery does: into pg_wal/RECOVERYXLOG, then consumed.
    cp_fetch, rss = best_cp(names, lambda x: dest / x, keep, lambda x: keep / "RECOVERYXLOG",
                            lambda x: os.unlink(keep / "RECOVERYXLOG"), sync=False)
    out.append(row("fetch: `cp` from a local directory", cp_fetch, n, seg_bytes, rss))
    for label, (cfg, env) in repos.items():
        for prefetch in (0, 16):
            bench_fetch(f"{len(out)}-check", walship, cfg, work, names, env, prefetch, digests)
            best = None
            for attempt in range(PASSES):
                time.sleep(1)
                result = bench_fetch(f"{len(out)}-{attempt}", walship, cfg, work, names, env,
                                     prefetch)
                if best is None or result[0] < best[0]:
                    best = result
            total, rss, hwm, ready, waited = best
            note = f"{n / total / (n / cp_fetch):.2f}x cp; content verified"
            if ready:
                note += (f"; {len(ready)} found their segment spooled: median "
                         f"{statistics.median(ready) * 1000:.1f} ms, "
                         f"p95 {pct(ready, 95) * 1000:.1f} ms")
            if waited:
                note += (f"; {len(waited)} waited for its download: median "
                         f"{statistics.median(waited) * 1000:.1f} ms")
            if hwm:
                note += f"; prefetcher peak RSS {hwm / 1024:.0f} MiB"
            out.append(row(f"fetch: `wal-fetch` ← {label}, prefetch {prefetch}",
                           total, n, seg_bytes, rss, note))

    print(f"Each row is the best of {PASSES} passes over the same {n} segments.\n")
    print(header)
    print("\n".join(out))
    level = args.compression_level or "default (1)"
    print(f"\nCompression: {ratio} (zstd level {level}, then age).")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
