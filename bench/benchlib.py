"""What the benchmark scripts share: running things as the postgres user, timing a process with
its peak RSS, and the repository configs (file:// and the minio-test S3 server) they run against."""

import os
import subprocess
import time
from pathlib import Path

PGBIN = Path("/usr/lib/postgresql/15/bin")
AS_ROOT = os.geteuid() == 0


def as_pg(args):
    return (["runuser", "-u", "postgres", "--"] if AS_ROOT else []) + [str(a) for a in args]


def run(args, **kw):
    return subprocess.run([str(a) for a in args], check=True, **kw)


def timed(args, rss_file, cwd=None, env=None, sync=True, shell=False):
    """Run one process under GNU time; return (seconds, peak RSS in KiB, exit code, stderr).

    Peak RSS comes from GNU time, not from this script's wait4: a child forked from Python carries
    Python's own RSS until exec, and the kernel counts that as the child's peak. With shell=True,
    `args` is one shell command line and the RSS is the largest of its processes'.
    """
    if sync:
        os.sync()  # no writeback of an earlier call in this one
    cmd = ["sh", "-c", args] if shell else [str(a) for a in args]
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss_file)] + cmd,
                       cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    secs = time.perf_counter() - t0
    rss = int(Path(rss_file).read_text().split()[-1])
    return secs, rss, p.returncode, p.stderr.decode(errors="replace")


def repo_configs(work, walship, s3_env, prefix):
    """Write an identity and config files for a file:// repository and, given the env file that
    minio-test/s3-server prints, an S3 one under `prefix`. Returns ({label: config path},
    the S3 config text with PREFIX in place of the prefix, or None)."""
    keyfile = work / "identity.txt"
    if keyfile.exists():  # a work directory reused: its repositories know this key
        recipient = keyfile.read_text().split("# public key: ")[1].split()[0]
    else:
        recipient = subprocess.run([str(walship), "keygen", "--output", str(keyfile)],
                                   check=True, capture_output=True, text=True).stdout.strip()
    os.chmod(keyfile, 0o644)  # the bench's PostgreSQL (another user) restores with it
    repos = {}
    (work / "archive").mkdir(exist_ok=True)
    (work / "file.toml").write_text(
        f'repo = "file://{work}/archive"\nrecipients = ["{recipient}"]\n'
        f'identity_file = "{keyfile}"\n')
    repos["file://"] = work / "file.toml"
    s3_text = None
    if s3_env:
        s3 = dict(line.replace("export ", "", 1).split("=", 1)
                  for line in Path(s3_env).read_text().splitlines() if "=" in line)
        (work / "s3-secret").write_text(s3["AWS_SECRET_ACCESS_KEY"])
        os.chmod(work / "s3-secret", 0o644)
        s3_text = (
            f'repo = "s3://{s3["WALSHIP_S3_BUCKET"]}/bench-{os.getpid()}-PREFIX"\n'
            f'recipients = ["{recipient}"]\nidentity_file = "{keyfile}"\n'
            f'[s3]\nendpoint = "{s3["WALSHIP_S3_ENDPOINT"]}"\nregion = "us-east-1"\n'
            f'path_style = true\naccess_key_id = "{s3["AWS_ACCESS_KEY_ID"]}"\n'
            f'secret_access_key_file = "{work}/s3-secret"\n')
        (work / "s3.toml").write_text(s3_text.replace("PREFIX", prefix))
        repos["S3 (minio-test)"] = work / "s3.toml"
    return repos, s3_text
