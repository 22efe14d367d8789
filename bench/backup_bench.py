#!/usr/bin/env python3
"""backup-push, backup-fetch and a restore to a target time, beside tar | zstd, pg_basebackup and
cp, in one run.

Makes a pgbench database (scale 150 by default: about 2.4 GB) on a throwaway PostgreSQL 15
cluster that archives its WAL through walship into both repositories, then times:

  push   cp -a of the data directory; tar | zstd (one stream, walship's zstd level; and zstd -T0);
         pg_basebackup -Ft -X none | zstd; walship backup-push to file:// and to S3
  fetch  cp -a back; zstd -d | tar -x; walship backup-fetch from file:// and from S3
  restore  after more pgbench load (WAL to replay), walship restore --target-time from S3 and
         PostgreSQL's recovery to that time: the time to fetch, the time to replay, and how each
         restore_command call was served (spool, waited for the prefetcher, downloaded itself)

Every copy and archive ends with a sync (walship's own: it fsyncs what it writes or waits for the
store), so no row leaves its work in the page cache. The data directory is read once before the
push rows, so every row reads it from the page cache. MB/s is the data directory's bytes (what
backup-push reports as the backup's size) over the seconds. Peak RSS is GNU time's, the largest of
the command's processes. Run it through bench/backup, which installs what it needs and builds
walship --release.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import benchlib
from benchlib import AS_ROOT, PGBIN, as_pg, run

PORT = 54398
RESTORE_PORT = 54397
RSS_FILE = None
PASSES = 2  # every row is the best of this many passes


def timed(args, env=None, shell=False):
    return benchlib.timed(args, RSS_FILE, env=env, shell=shell)


def psql(sock, sql, port=PORT):
    return subprocess.run(
        as_pg([PGBIN / "psql", "-X", "-qAt", "-h", sock, "-p", port, "-U", "postgres", "-c", sql,
               "postgres"]), check=True, capture_output=True, text=True).stdout.strip()


def make_cluster(work, walship, configs, scale):
    """A cluster archiving through walship into every repository, with pgbench data loaded."""
    data, sock = work / "pg", work / "sock"
    pushes = " && ".join(f"{walship} --config {cfg} wal-push %p" for cfg in configs.values())
    # With data checksums (PostgreSQL 18's default), so backup-push checks every page it reads.
    run(as_pg([PGBIN / "initdb", "-A", "trust", "-U", "postgres", "--no-sync", "--data-checksums",
               "-D", data]),
        stdout=subprocess.DEVNULL)
    with open(data / "postgresql.conf", "a") as f:
        f.write(f"\nlisten_addresses = ''\nunix_socket_directories = '{sock}'\nport = {PORT}\n"
                f"wal_level = replica\narchive_mode = on\narchive_command = '{pushes}'\n"
                "max_wal_size = '4GB'\ncheckpoint_timeout = '30min'\n"
                "shared_buffers = '256MB'\nlog_min_messages = warning\n")
    start(data, work / "pg.log")
    pgb = [PGBIN / "pgbench", "-h", sock, "-p", PORT, "-U", "postgres"]
    run(as_pg(pgb + ["-i", "-s", scale, "-q", "postgres"]), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    psql(sock, "checkpoint")
    wait_archived(sock)
    return data, sock


def wait_archived(sock):
    """Until the archiver has caught up, so that it does not compete with a timed row."""
    while psql(sock, "select count(*) from pg_ls_archive_statusdir() "
                     "where name like '%.ready'") != "0":
        time.sleep(0.5)


def start(data, log, env=None):
    run(as_pg([PGBIN / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "600", "start"]),
        stdout=subprocess.DEVNULL, env=env)


def stop(data):
    subprocess.run(as_pg([PGBIN / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"]),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def dir_bytes(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()
               and not p.is_symlink())


def fresh(path):
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def row(what, result, nbytes, base=None, extra=""):
    secs, rss_kib = result
    mbs = nbytes / secs / 1e6
    vs = f"{mbs / base:.2f}x" if base else ""
    return f"| {what} | {secs:.1f} | {mbs:.0f} | {vs} | {rss_kib / 1024:.0f} MiB | {extra} |"


def best(label, make_cmd, env=None, shell=False, before=lambda: None, after=lambda: None):
    """The best of PASSES runs of a command: (seconds, peak RSS KiB)."""
    result = None
    for attempt in range(PASSES):
        before()
        secs, kib, code, err = timed(make_cmd(attempt), env=env, shell=shell)
        if code != 0:
            sys.exit(f"{label} failed ({code}): {err.strip()[-2000:]}")
        after()
        if result is None or secs < result[0]:
            result = (secs, kib)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--walship", required=True, type=Path)
    ap.add_argument("--scale", type=int, default=150, help="pgbench scale (150: about 2.4 GB)")
    ap.add_argument("--replay-secs", type=int, default=60,
                    help="seconds of pgbench load after the backups, replayed by the restore")
    ap.add_argument("--level", type=int, default=1,
                    help="zstd level for walship and the zstd rows (default 1, walship's)")
    ap.add_argument("--s3-env", type=Path, help="env file printed by minio-test/s3-server")
    ap.add_argument("--work", type=Path,
                    help="work directory, kept afterwards; one from an earlier run is reused "
                         "with its database (default: a new temp dir, removed)")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="walship-bbench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)
    global RSS_FILE
    RSS_FILE = work / "rss"
    print(f"# work directory {work}", file=sys.stderr)
    walship = work / "walship"
    shutil.copy(args.walship, walship)
    configs, _ = benchlib.repo_configs(work, walship, args.s3_env, "backups")
    (work / "sock").mkdir(exist_ok=True)
    if AS_ROOT:
        run(["chown", "-R", "postgres:postgres", work])
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALSHIP_")}
    env["WALSHIP_LOG"] = "walship=info"

    if (work / "pg" / "PG_VERSION").exists():  # --work of an earlier run: reuse its database
        data, sock = work / "pg", work / "sock"
        print(f"# reusing the database in {data}", file=sys.stderr)
        start(data, work / "pg.log")
    else:
        print(f"# making a pgbench database, scale {args.scale}", file=sys.stderr)
        data, sock = make_cluster(work, walship, configs, args.scale)
    level = args.level
    env["WALSHIP_COMPRESSION_LEVEL"] = str(level)
    try:
        out = bench(args, work, walship, configs, env, data, sock, level)
    finally:
        stop(data)
    print("\n".join(out))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def bench(args, work, walship, configs, env, data, sock, level):
    wait_archived(sock)
    pg_bytes = dir_bytes(data) - dir_bytes(data / "pg_wal")
    run(["sh", "-c", f"tar -cf - -C {data} . | cat > /dev/null"])  # into the page cache
    out = [f"Data directory: {pg_bytes / 1e9:.2f} GB without pg_wal (pgbench scale {args.scale}); "
           f"zstd level {level} everywhere. Each row is the best of {PASSES} passes.\n",
           "| what | seconds | MB/s | vs tar \\| zstd | peak RSS | notes |",
           "|---|---:|---:|---:|---:|---|"]

    # ---- how much a second core adds to zstd on this machine, for reading the rows below
    big = max((f for f in data.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    one = best("zstd", lambda _: f"zstd -q -{level} -T1 -c {big} > /dev/null", shell=True)[0]
    two = best("2 zstd", lambda _: f"zstd -q -{level} -T1 -c {big} > /dev/null & "
               f"zstd -q -{level} -T1 -c {big} > /dev/null; wait", shell=True)[0]
    out.insert(0, f"Parallel scaling of this machine: two `zstd -{level}` processes at once, each "
               f"compressing the same {big.stat().st_size / 1e9:.1f} GB file from the page cache, "
               f"do {2 * one / two:.2f}x the work of one in the same time "
               f"({one:.2f} s alone, {two:.2f} s for both).\n")

    # ---- push
    copy, tarzst = work / "copy", work / "data.tar.zst"
    cp_push = best("cp -a", lambda _: f"cp -a {data} {copy} && sync", shell=True,
                   before=lambda: fresh(copy))
    tz_push = best("tar | zstd", lambda _: f"tar -cf - -C {data} --exclude=./pg_wal . "
                   f"| zstd -q -{level} -T1 -o {tarzst} -f && sync", shell=True)
    base = pg_bytes / tz_push[0] / 1e6
    out.append(row("push: `cp -a` of the data directory", cp_push, pg_bytes, base))
    out.append(row(f"push: `tar \\| zstd -{level}` (one stream)", tz_push, pg_bytes, base,
                   f"{pg_bytes / tarzst.stat().st_size:.1f}:1"))
    mt = best("tar | zstd -T0", lambda _: f"tar -cf - -C {data} --exclude=./pg_wal . "
              f"| zstd -q -{level} -T0 -o {work}/mt.tar.zst -f && sync", shell=True)
    out.append(row(f"push: `tar \\| zstd -{level} -T0` (zstd's threads)", mt, pg_bytes, base))
    pgbb = best("pg_basebackup | zstd", lambda _: " ".join(map(str, as_pg(
        [PGBIN / "pg_basebackup", "-h", sock, "-p", PORT, "-U", "postgres", "-Ft", "-X", "none",
         "-c", "fast", "-D", "-"]))) + f" | zstd -q -{level} -T1 -o {work}/bb.tar.zst -f && sync",
        shell=True)
    out.append(row(f"push: `pg_basebackup -Ft \\| zstd -{level}`", pgbb, pg_bytes, base))
    for label, cfg in configs.items():
        secs, kib = best(f"backup-push {label}", lambda _: [
            walship, "--config", cfg, "backup-push", "--pg-host", sock, "--pg-port", PORT,
            "--pg-user", "postgres"], env=env)
        stored = json.loads(run([walship, "--config", cfg, "backup-list", "--json"],
                                capture_output=True, text=True).stdout)["backups"][-1]
        pages = stored.get("page_checks") or {}
        out.append(row(f"push: `backup-push` → {label}", (secs, kib), pg_bytes, base,
                       f"{stored['original_size'] / stored['stored_size']:.1f}:1; "
                       f"{os.cpu_count()} threads, 4 uploads (defaults); "
                       f"{pages.get('verified', 0)} page checksums verified, "
                       f"{pages.get('bad', 0)} bad"))

    # ---- fetch
    dest = work / "restored"
    cp_f = best("cp -a back", lambda _: f"cp -a {copy} {dest} && sync", shell=True,
                before=lambda: fresh(dest))
    tz_f = best("zstd -d | tar -x", lambda _: f"mkdir {dest} && zstd -q -d -c {tarzst} "
                f"| tar -xf - -C {dest} && sync", shell=True, before=lambda: fresh(dest))
    base = pg_bytes / tz_f[0] / 1e6
    out.append(row("fetch: `cp -a` back", cp_f, pg_bytes, base))
    out.append(row(f"fetch: `zstd -d \\| tar -x` (one stream)", tz_f, pg_bytes, base))
    for label, cfg in configs.items():
        secs, kib = best(f"backup-fetch {label}", lambda _: [
            walship, "--config", cfg, "backup-fetch", "LATEST", dest], env=env,
            before=lambda: fresh(dest))
        out.append(row(f"fetch: `backup-fetch` ← {label}", (secs, kib), pg_bytes, base,
                       "verified; ends with syncfs"))
    for d in (copy, dest):
        fresh(d)
    for f in work.glob("*.tar.zst"):
        f.unlink()

    # ---- restore to a time: fetch, then PostgreSQL replays the archived WAL
    out.append("")
    out.extend(bench_restore(args, work, walship, configs, env, data, sock))
    return out


def bench_restore(args, work, walship, configs, env, data, sock):
    label = "S3 (minio-test)" if "S3 (minio-test)" in configs else "file://"
    cfg = configs[label]
    pgb = [PGBIN / "pgbench", "-h", sock, "-p", PORT, "-U", "postgres"]
    lsn0 = psql(sock, "select pg_current_wal_lsn()")
    run(as_pg(pgb + ["-n", "-c", "4", "-T", args.replay_secs, "postgres"]),
        stdout=subprocess.DEVNULL)
    psql(sock, "drop table if exists bench_marker")
    psql(sock, "create table bench_marker(at timestamptz default now())")
    psql(sock, "insert into bench_marker default values")
    time.sleep(1.1)
    target = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S+00")
    time.sleep(1.1)
    psql(sock, "insert into bench_marker default values")
    expect = int(psql(sock, "select count(*) from pgbench_history"))
    wal_bytes = int(psql(sock, f"select pg_current_wal_lsn() - '{lsn0}'::pg_lsn"))
    psql(sock, "select pg_switch_wal()")
    wait_archived(sock)

    dest, log = work / "pitr", work / "pitr.log"
    fresh(dest)
    log.unlink(missing_ok=True)  # pg_ctl appends: count this run's calls only
    t0 = time.perf_counter()
    secs, kib, code, err = timed([walship, "--config", cfg, "restore", dest, "--target-time",
                                  target, "--target-action", "promote", "--archive-mode", "off"],
                                 env=env)
    if code != 0:
        sys.exit(f"restore failed ({code}): {err.strip()[-2000:]}")
    with open(dest / "postgresql.auto.conf", "a") as f:
        f.write(f"\nport = {RESTORE_PORT}\nunix_socket_directories = '{work / 'sock'}'\n")
    if AS_ROOT:
        run(["chown", "-R", "postgres:postgres", dest])
    t1 = time.perf_counter()
    pg_env = dict(env, WALSHIP_LOG="walship=info")
    start(dest, log, env=pg_env)
    while psql(sock, "select pg_is_in_recovery()", port=RESTORE_PORT) != "f":
        time.sleep(0.1)
    t2 = time.perf_counter()
    got = int(psql(sock, "select count(*) from pgbench_history", port=RESTORE_PORT))
    markers = int(psql(sock, "select count(*) from bench_marker", port=RESTORE_PORT))
    stop(dest)
    assert got == expect and markers == 1, f"restored {got} rows, {markers} markers"
    text = log.read_text(errors="replace")
    spooled = len(re.findall(r": served from the prefetch spool$", text, re.M))
    waited = len(re.findall(r": served from the prefetch spool after waiting", text))
    downloaded = len(re.findall(r": downloaded$", text, re.M))
    missing = len(re.findall(r" is not in the archive$", text, re.M))
    fresh(dest)
    return [
        f"Restore to a time from {label}: `walship restore --target-time` (fetch) then "
        f"PostgreSQL recovery to the target and promotion (replay of {wal_bytes / 1e9:.2f} GB of "
        f"WAL from {args.replay_secs} s of pgbench). Data checked: every pgbench row before the "
        "target, and the marker row after it absent.\n",
        "| step | seconds | notes |", "|---|---:|---|",
        f"| fetch (`walship restore`) | {secs:.1f} | peak RSS {kib / 1024:.0f} MiB |",
        f"| replay to the target | {t2 - t1:.1f} | restore_command calls: {spooled} served "
        f"from the spool, {waited} waited for the prefetcher's download of their segment, "
        f"{downloaded} downloaded their own, {missing} not in the archive (history files of new timelines) |",
        f"| end to end | {t2 - t0:.1f} | |",
    ]


if __name__ == "__main__":
    main()
