//! End to end with real parts: PostgreSQL 15 archives through `walship wal-push` into the S3 test
//! server, a base backup is restored with `walship wal-fetch` as restore_command, and the data must
//! match. Then the failure modes: corrupt objects, a server outage, foreign clusters, overwrites.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{walship, Cluster, S3Server, SmallFs};
use walship::storage::{ObjectKey, Store};

/// walship's own info lines go to the PostgreSQL log, so tests can see what each call did.
fn archiving_conf(cfg: &Path) -> String {
    format!(
        "wal_level = replica\narchive_mode = on\n\
         archive_command = 'WALSHIP_LOG=walship=info {} --config {} wal-push %p'\n\
         max_wal_size = '4GB'\nwal_keep_size = '2GB'\ncheckpoint_timeout = '30min'\n",
        common::WALSHIP,
        cfg.display()
    )
}

fn restore_conf(cfg: &Path) -> String {
    format!(
        "restore_command = 'WALSHIP_LOG=walship=info {} --config {} wal-fetch %f %p'\n",
        common::WALSHIP,
        cfg.display()
    )
}

/// Archive recovery of the base backup at `data` with wal-fetch, until it has promoted.
fn recover(base: &Path, data: &Path, name: &str, cfg: &Path) -> Cluster {
    let c = Cluster::at(base, data.to_path_buf(), name);
    c.append_conf(&restore_conf(cfg));
    std::fs::write(data.join("recovery.signal"), b"").unwrap();
    common::chown_postgres(data);
    c.start();
    common::wait_until(
        &format!("recovery of {name} to finish"),
        Duration::from_secs(180),
        || c.try_psql("select pg_is_in_recovery()").as_deref() == Some("f"),
    );
    c
}

/// Segment names archived under the repository prefix, sorted.
async fn archived_segments(store: &dyn Store) -> Vec<String> {
    store
        .list("wal/")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|o| o.key.as_str().rsplit('/').next().map(str::to_string))
        .filter(|n| n.len() == 24)
        .collect()
}

/// Every segment from the first archived to the last is there.
fn assert_no_gap(archived: &[String], what: &str) {
    let first = walship::wal::name::WalFileName::parse(&archived[0])
        .unwrap()
        .segment()
        .unwrap();
    for (i, name) in archived.iter().enumerate() {
        assert_eq!(
            name,
            first.advance(i as u64, 16 << 20).file_name().as_str(),
            "{what}: {archived:?}"
        );
    }
}

/// A bucket with versioning left off, made with the SDK directly (minio-test turns it on).
async fn create_bucket(server: &S3Server, name: &str) {
    use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(server.endpoint())
        .force_path_style(true)
        .credentials_provider(Credentials::new(
            &server.env["AWS_ACCESS_KEY_ID"],
            &server.env["AWS_SECRET_ACCESS_KEY"],
            None,
            None,
            "test",
        ))
        .build();
    aws_sdk_s3::Client::from_conf(conf)
        .create_bucket()
        .bucket(name)
        .send()
        .await
        .unwrap();
}

fn segment_count(c: &Cluster) -> u64 {
    c.psql("select (pg_current_wal_lsn() - '0/0'::pg_lsn) / (16*1024*1024)")
        .parse::<f64>()
        .unwrap() as u64
}

fn fingerprint(c: &Cluster) -> String {
    c.psql(
        "select (select count(*) || ':' || sum(abalance) from pgbench_accounts) || '/' || \
                (select count(*) || ':' || coalesce(sum(delta), 0) from pgbench_history) || '/' || \
                (select md5(string_agg(note, ',' order by id)) from marks)",
    )
}

/// The processes of every prefetcher working for the server in `data_dir` (supervisor and worker).
fn prefetchers_of(data_dir: &Path) -> Vec<i32> {
    let pid_file = data_dir.join("postmaster.pid");
    let wanted = ["--postmaster-pid-file", &pid_file.to_string_lossy()].join("\0");
    let mut pids = Vec::new();
    for proc in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = proc.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(proc.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("\0wal-prefetch\0") && cmdline.contains(&wanted) {
            pids.push(pid);
        }
    }
    pids
}

/// SIGKILL every prefetcher working for the server in `data_dir`.
fn kill_prefetchers_of(data_dir: &Path) {
    for pid in prefetchers_of(data_dir) {
        let pid = rustix::process::Pid::from_raw(pid).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

#[test]
fn archive_with_wal_push_and_recover_with_wal_fetch() {
    let server = S3Server::start();
    let base = common::shared_tempdir("recover");
    let keys = common::keygen(base.path());
    let cfg = server.config(base.path(), "recover", &keys);

    let primary = Cluster::init(base.path(), "primary");
    primary.append_conf(&archiving_conf(&cfg));
    primary.start();
    primary.psql("create table marks (id serial primary key, note text not null)");
    primary.psql("insert into marks (note) values ('before base backup')");
    primary.pgbench(&["-i", "-s", "5", "-q"]);

    let restored = base.path().join("restored");
    primary.basebackup(&restored);

    // Real load until well past 20 segments of WAL after the backup.
    let start_seg = segment_count(&primary);
    let mut round = 0;
    while segment_count(&primary) < start_seg + 22 {
        primary.pgbench(&["-n", "-c", "2", "-T", "2"]);
        // A batch job between the OLTP rounds: a few dozen MB of WAL per statement.
        primary.psql(&format!(
            "update pgbench_accounts set filler = md5(random()::text) where aid % 4 = {}",
            round % 4
        ));
        primary.psql(&format!(
            "insert into marks (note) values ('round {round}')"
        ));
        round += 1;
    }
    primary.psql("insert into marks (note) values ('last before switch')");
    let expected = fingerprint(&primary);
    let last = primary.switch_wal();
    primary.wait_archived(&last);
    primary.stop();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(server.store("recover"));
    let archived = rt.block_on(archived_segments(&store));
    assert!(
        archived.len() >= 22,
        "at least 22 segments archived, got {}",
        archived.len()
    );
    assert!(archived.contains(&last), "{last} archived");
    assert_no_gap(&archived, "archive has a gap");

    // A second copy of the backup, recovered later across the timeline the first copy creates.
    let again = base.path().join("again");
    common::run_ok(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(&restored)
            .arg(&again),
    );

    // What a wal-fetch stopped by SIGTERM (pg_ctl stop during recovery) leaves in pg_wal: the
    // next calls remove it, since the process that wrote it is gone.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let stale = restored.join(format!("pg_wal/.RECOVERYXLOG.walship-tmp.{}", gone.id()));
    std::fs::write(&stale, vec![0u8; 1 << 20]).unwrap();

    // Recover from the base backup through wal-fetch to the end of the archive.
    let recovered = recover(base.path(), &restored, "restored", &cfg);
    assert!(!stale.exists(), "a killed call's temp file is swept");
    assert_eq!(
        fingerprint(&recovered),
        expected,
        "recovered data equals the primary's"
    );
    let log = recovered.log();
    assert!(
        log.contains("archive recovery complete"),
        "recovery ended normally:\n{log}"
    );
    assert!(
        log.contains(&format!("restored log file \"{last}\" from archive")),
        "the last archived segment was replayed:\n{log}"
    );
    // The prefetcher ran beside recovery and served segments from its spool.
    assert!(
        restored.join("pg_wal/.walship/prefetch.log").exists(),
        "prefetcher started"
    );
    let spooled = log.matches("served from the prefetch spool").count();
    assert!(
        spooled >= 10,
        "most segments come from the spool, got {spooled}:\n{log}"
    );

    // The prefetcher holds none of the files PostgreSQL 15 had open, without close-on-exec, in
    // the startup process that ran the call starting it: held for as long as the prefetcher
    // lives, a relation file or WAL segment that replay removes would keep its disk space.
    let state = restored.join("pg_wal/.walship");
    // The pipes and sockets the postmaster holds stand for those (its children inherit them).
    let open_files = |pid: &str| -> Vec<(String, PathBuf)> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|fd| {
                Some((
                    fd.file_name().into_string().ok()?,
                    fd.path().read_link().ok()?,
                ))
            })
            .collect()
    };
    let postmaster = std::fs::read_to_string(restored.join("postmaster.pid")).unwrap();
    let postmasters: Vec<PathBuf> = open_files(postmaster.lines().next().unwrap())
        .into_iter()
        .map(|(_, target)| target)
        .filter(|t| {
            let t = t.to_string_lossy();
            t.starts_with("pipe:") || t.starts_with("socket:")
        })
        .collect();
    let prefetchers = prefetchers_of(&restored);
    assert!(!prefetchers.is_empty(), "the prefetcher still runs");
    for pid in prefetchers {
        for (fd, target) in open_files(&pid.to_string()) {
            assert!(
                (!target.starts_with(&restored) || target.starts_with(&state))
                    && !postmasters.contains(&target),
                "prefetcher {pid} holds PostgreSQL's {} (fd {fd})",
                target.display()
            );
        }
    }

    // A prefetcher killed (SIGKILL: the OOM killer, a container limit) leaves its spool beside
    // pg_wal, which nothing on a promoted server reads again: wal-push sweeps it.
    kill_prefetchers_of(&restored);
    let spool = state.join("spool");
    common::wait_until(
        "the killed prefetcher's lock",
        Duration::from_secs(10),
        || {
            let lock = std::fs::File::create(spool.join(".lock")).unwrap();
            lock.try_lock().is_ok()
        },
    );
    std::fs::write(spool.join("000000010000000000000063"), vec![1u8; 1 << 20]).unwrap();
    std::fs::write(
        spool.join(".000000010000000000000064.walship-tmp.99999"),
        vec![1u8; 1 << 20],
    )
    .unwrap();

    // The promoted cluster archives its new timeline's history file into the same repository,
    // and its WAL: timeline 2 forks off timeline 1.
    let hist = ObjectKey::new("wal/history/00000002.history").unwrap();
    common::wait_until("00000002.history archived", Duration::from_secs(60), || {
        rt.block_on(store.get(&hist)).is_ok()
    });
    recovered.psql("insert into marks (note) values ('on timeline 2')");
    recovered.pgbench(&["-n", "-c", "2", "-T", "2"]);
    recovered.psql("update pgbench_accounts set filler = md5(random()::text) where aid % 4 = 0");
    let expected2 = fingerprint(&recovered);
    let last2 = recovered.switch_wal();
    assert!(last2.starts_with("00000002"), "{last2}");
    recovered.wait_archived(&last2);
    let mut left: Vec<String> = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| ![".lock", ".repo", ".boot"].contains(&n.as_str()))
        .collect();
    left.sort();
    assert!(
        left.is_empty(),
        "the killed prefetcher's spool is swept: {left:?}"
    );
    recovered.stop();

    // The second copy follows the archive across the switch to timeline 2 (the default target
    // timeline is 'latest'); the spool must drop timeline 1 segments past the fork.
    let follower = recover(base.path(), &again, "again", &cfg);
    assert_eq!(
        fingerprint(&follower),
        expected2,
        "recovered through timeline 2"
    );
    let log2 = follower.log();
    assert!(
        log2.contains(&format!("restored log file \"{last2}\" from archive")),
        "the last timeline 2 segment was replayed:\n{log2}"
    );
}

#[test]
fn refuses_overwrites_foreign_clusters_and_corrupt_objects_and_survives_an_outage() {
    let mut server = S3Server::start();
    let base = common::shared_tempdir("faults");
    let keys = common::keygen(base.path());
    let cfg = server.config(base.path(), "faults", &keys);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(server.store("faults"));

    let primary = Cluster::init(base.path(), "primary");
    primary.append_conf(&archiving_conf(&cfg));
    primary.start();
    primary.psql("create table filler as select g, md5(g::text) from generate_series(1, 50000) g");
    let seg = primary.switch_wal();
    primary.wait_archived(&seg);
    let pg_wal = primary.data.join("pg_wal");
    let scratch = base.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();

    // `walship check` says what works and what does not, and fails only for what would fail.
    let cfg_text = std::fs::read_to_string(&cfg).unwrap();
    let check = |name: &str, from: &str, to: &str| {
        let path = base.path().join(format!("check-{name}.toml"));
        std::fs::write(&path, cfg_text.replace(from, to)).unwrap();
        let out = walship(&path, &["check"], base.path());
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (code, report) = check("good", "", "");
    assert_eq!(code, Some(0), "{report}");
    for want in [
        "repository   ok",
        "versioning   ok   enabled",
        "metadata     ok   system",
        "identity     ok   matches",
        // The fixture's secret key file is 0644: a warning, not a failure.
        "s3 secret    warn",
        // The S3 server refuses to replace an object (If-None-Match: *).
        "writes       ok   objects can be created, and an existing one is never replaced",
    ] {
        assert!(report.contains(want), "{want:?} in:\n{report}");
    }
    let check_object = ObjectKey::new("check/conditional-put").unwrap();
    assert!(rt.block_on(store.get(&check_object)).is_ok());
    // A restoring host that shares the config but has a read-only role skips the write test.
    let out = walship(&cfg, &["check", "--read-only"], base.path());
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert!(
        report.contains("recipients   ok") && !report.contains("writes"),
        "{report}"
    );
    // A host that only restores: no recipients needed, and no write test.
    let recipients_line = cfg_text
        .lines()
        .find(|l| l.starts_with("recipients"))
        .unwrap();
    let (code, report) = check("restore-only", recipients_line, "");
    assert_eq!(code, Some(0), "{report}");
    assert!(
        report.contains("recipients   ok   not configured") && !report.contains("writes"),
        "{report}"
    );
    let wrong_secret = base.path().join("wrong-secret");
    std::fs::write(&wrong_secret, "not-the-secret").unwrap();
    let secret_line = cfg_text
        .lines()
        .find(|l| l.starts_with("secret_access_key_file"))
        .unwrap();
    let (code, report) = check(
        "denied",
        secret_line,
        &format!("secret_access_key_file = \"{}\"", wrong_secret.display()),
    );
    assert_eq!(code, Some(6), "{report}");
    assert!(
        report.contains("repository   FAIL") && report.contains("access denied"),
        "{report}"
    );
    // No credentials anywhere in the chain: a credentials problem, not "check the network".
    let keyless = base.path().join("check-keyless.toml");
    let without_keys: Vec<&str> = cfg_text
        .lines()
        .filter(|l| !l.starts_with("access_key_id") && !l.starts_with("secret_access_key_file"))
        .collect();
    std::fs::write(&keyless, without_keys.join("\n")).unwrap();
    let out = common::walship_cmd(&keyless, &["check"], base.path())
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .env("HOME", base.path())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(6), "{report}");
    assert!(
        report.contains("repository   FAIL access denied: no usable S3 credentials")
            && report.contains("AWS_ACCESS_KEY_ID")
            && !report.contains("check the network")
            && !report.contains("hop limit")
            && !report.contains("no role"),
        "{report}"
    );
    // The same with the instance metadata service asked too, as on a cloud instance: a stand-in
    // on loopback gives no credentials in each of the ways the real one does. The FAIL line says
    // where keys go and what to check about the instance role, and the SDK's own multi-line
    // warnings about each provider stay out of the log.
    let keyless_check = |imds: &str| {
        let out = common::walship_cmd(&keyless, &["check"], base.path())
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_EC2_METADATA_DISABLED")
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds)
            .env("HOME", base.path())
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout).into_owned();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(6), "{report}{err}");
        assert_eq!(
            err.trim(),
            "walship check: error: some checks failed; see the FAIL lines above",
            "{report}"
        );
        assert!(
            report.contains("repository   FAIL")
                && report.contains("AWS_ACCESS_KEY_ID")
                && !report.contains("check the network"),
            "{report}"
        );
        report
    };
    // Not answering: a container on EC2 behind the default hop limit of 1 gets no token; here
    // the service refuses it (403), as one that is turned off does.
    let imds_off = common::serve_http(|method, path| match (method, path) {
        ("PUT", "/latest/api/token") => (403, "", ""),
        _ => (500, "", ""),
    });
    let report = keyless_check(&imds_off);
    assert!(
        report.contains("FAIL cannot get S3 credentials")
            && report.contains("metadata hop limit (HttpPutResponseHopLimit) to 2"),
        "{report}"
    );
    // Nothing listening where the service should be: the same hint.
    let report = keyless_check(&format!("http://127.0.0.1:{}", common::free_port()));
    assert!(
        report.contains("FAIL access denied: no usable S3 credentials")
            && report.contains("metadata hop limit"),
        "{report}"
    );
    // An instance without a role: the service answers, and says so.
    let no_role = common::serve_http(|method, path| match (method, path) {
        ("PUT", "/latest/api/token") => (
            200,
            "x-aws-ec2-metadata-token-ttl-seconds: 21600\r\n",
            "token",
        ),
        ("GET", "/latest/meta-data/iam/security-credentials/") => (404, "", ""),
        _ => (500, "", ""),
    });
    let report = keyless_check(&no_role);
    assert!(
        report.contains("FAIL access denied: no usable S3 credentials")
            && report.contains("says this instance has no role: attach one")
            && !report.contains("hop limit"),
        "{report}"
    );
    // A CA bundle that cannot be read: a local file problem, named.
    let missing_ca = base.path().join("no-such-ca.pem");
    let out = walship(
        &cfg,
        &[
            "wal-push",
            "--s3-ca-bundle",
            missing_ca.to_str().unwrap(),
            "x",
        ],
        base.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(err.contains("cannot read CA bundle"), "{err}");
    // A segment that is not there (a wrong %p, or an archive_command run from the wrong
    // directory): a local file problem, in the system's words.
    let out = walship(
        &cfg,
        &["wal-push", "pg_wal/000000010000000000000099"],
        base.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(
        err.contains("cannot archive pg_wal/000000010000000000000099: No such file or directory")
            && err.contains("archive_command must pass %p"),
        "{err}"
    );
    let bucket = format!("s3://{}/", server.bucket());
    let (code, report) = check("no-bucket", &bucket, "s3://no-such-bucket/");
    assert_eq!(code, Some(6), "{report}");
    assert!(report.contains("does not exist"), "{report}");
    std::fs::create_dir(base.path().join("other-keys")).unwrap();
    let other_keys = common::keygen(&base.path().join("other-keys"));
    // keygen never overwrites a key: it may be the only one that decrypts an archive.
    let before = std::fs::read(&other_keys.identity).unwrap();
    let again = std::process::Command::new(common::WALSHIP)
        .args(["keygen", "--output"])
        .arg(&other_keys.identity)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists: not overwriting"));
    assert_eq!(std::fs::read(&other_keys.identity).unwrap(), before);
    let (code, report) = check(
        "other-identity",
        keys.identity.to_str().unwrap(),
        other_keys.identity.to_str().unwrap(),
    );
    assert_eq!(code, Some(6), "{report}");
    let fp = |r: &str| walship::codec::fingerprint(r);
    assert!(
        report.contains(&format!(
            "identity     FAIL does not match: key {} in {} is none of the repository's recipients ({})",
            fp(&other_keys.recipient),
            other_keys.identity.display(),
            fp(&keys.recipient)
        )),
        "{report}"
    );
    // Where nothing is archived yet, the identity must fit the recipients pushes would use.
    let fresh = cfg_text
        .replace(&bucket, &format!("{bucket}not-yet/"))
        .replace(
            keys.identity.to_str().unwrap(),
            other_keys.identity.to_str().unwrap(),
        );
    let (code, report) = check("other-identity-fresh", &cfg_text, &fresh);
    assert_eq!(code, Some(6), "{report}");
    assert!(
        report.contains("metadata     ok   none yet")
            && report.contains(&format!(
                "is none of the configured recipients ({})",
                fp(&keys.recipient)
            )),
        "{report}"
    );
    rt.block_on(create_bucket(&server, "walship-unversioned"));
    let (code, report) = check("unversioned", &bucket, "s3://walship-unversioned/");
    assert_eq!(code, Some(6), "{report}");
    assert!(report.contains("versioning   FAIL OFF"), "{report}");

    // The same segment again: exit 0 with a warning.
    let same = scratch.join(&seg);
    std::fs::copy(pg_wal.join(&seg), &same).unwrap();
    let out = walship(&cfg, &["wal-push", same.to_str().unwrap()], base.path());
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("already archived with the same content"));

    // Other content under the archived name: refused, archive unchanged.
    let key = ObjectKey::new(format!("wal/{}/{seg}", &seg[..16])).unwrap();
    let before = rt.block_on(store.get(&key)).unwrap();
    let mut bytes = std::fs::read(&same).unwrap();
    bytes[8 * 1024 * 1024] ^= 0xFF;
    std::fs::write(&same, &bytes).unwrap();
    let out = walship(&cfg, &["wal-push", same.to_str().unwrap()], base.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("different content") && err.contains("refusing to overwrite"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    assert_eq!(
        rt.block_on(store.get(&key)).unwrap(),
        before,
        "archived object untouched"
    );

    // A timeline history file other than the archived one: a promotion that did not see the
    // archive took a timeline that is taken. Refused, with what happened and what to do.
    let hist = scratch.join("0000000A.history");
    std::fs::write(&hist, "1\t0/3000198\tno recovery target specified\n").unwrap();
    let out = walship(&cfg, &["wal-push", hist.to_str().unwrap()], base.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&hist, "1\t0/5000028\tno recovery target specified\n").unwrap();
    let out = walship(&cfg, &["wal-push", hist.to_str().unwrap()], base.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("refusing to overwrite")
            && err.contains("Timeline 10 is taken")
            && err.contains("restore_command"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");

    // Another cluster into the same prefix: refused.
    let other = Cluster::init(base.path(), "other");
    let foreign = std::fs::read_dir(other.data.join("pg_wal"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().len() == 24)
        .expect("initdb leaves a segment");
    let out = walship(&cfg, &["wal-push", foreign.to_str().unwrap()], base.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("every cluster needs its own repository"),
        "{err}"
    );
    // Its history files too, though they carry no system identifier: its pg_control tells.
    let foreign_history = other.data.join("pg_wal/0000000B.history");
    std::fs::write(
        &foreign_history,
        "1\t0/3000198\tno recovery target specified\n",
    )
    .unwrap();
    let out = walship(
        &cfg,
        &["wal-push", foreign_history.to_str().unwrap()],
        base.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("0000000B.history comes from the cluster with system identifier"),
        "{err}"
    );
    let listed = rt.block_on(store.list("wal/history/")).unwrap();
    assert!(
        !listed
            .iter()
            .any(|o| o.key.as_str().ends_with("0000000B.history")),
        "{listed:?}"
    );

    // wal-fetch: a name never archived is "not in archive" (1)...
    let dest = scratch.join("RECOVERYXLOG");
    let out = walship(
        &cfg,
        &[
            "wal-fetch",
            "0000000100000000000000FF",
            dest.to_str().unwrap(),
        ],
        &scratch,
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dest.exists());

    // ...a corrupt object fails loudly, with a code that stops recovery, and places nothing.
    rt.block_on(store.delete(&key)).unwrap();
    // (A segment deleted from the versioned bucket is no end of the archive either: recovery
    // stops, where "not in archive" would have it promote before the segment.)
    let out = walship(&cfg, &["wal-fetch", &seg, dest.to_str().unwrap()], &scratch);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + 4), "{err}");
    assert!(err.contains("was deleted"), "{err}");
    assert!(!dest.exists(), "nothing placed");
    let mut bad = before.to_vec();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x01;
    rt.block_on(store.put_if_absent(&key, bad.into())).unwrap();
    let out = walship(&cfg, &["wal-fetch", &seg, dest.to_str().unwrap()], &scratch);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + 4), "{err}");
    assert!(err.contains("corrupt") || err.contains("decrypt"), "{err}");
    assert!(!dest.exists(), "nothing placed");
    let leftovers: Vec<_> = std::fs::read_dir(&scratch)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert!(
        leftovers
            .iter()
            .all(|n| !n.to_string_lossy().contains("walship-tmp")),
        "no temp files: {leftovers:?}"
    );
    // In standby mode the same failure is an ordinary one (PostgreSQL retries).
    std::fs::write(scratch.join("standby.signal"), b"").unwrap();
    let out = walship(&cfg, &["wal-fetch", &seg, dest.to_str().unwrap()], &scratch);
    assert_eq!(out.status.code(), Some(4));
    // Which makes PostgreSQL ask for the same segment on the timeline before (it tries each
    // timeline of its history, newest first). Timeline 2 forked in this segment; timeline 1's
    // copy, archived by the old primary, goes on past the fork. Held back while timeline 2's
    // copy fails, served once that copy is fetched (or found missing: the unit tests).
    let seg2 = format!("00000002{}", &seg[8..]);
    let key2 = ObjectKey::new(format!("wal/{}/{seg2}", &seg2[..16])).unwrap();
    rt.block_on(store.put_if_absent(&key2, rt.block_on(store.get(&key)).unwrap()))
        .unwrap();
    rt.block_on(store.delete(&key)).unwrap();
    rt.block_on(store.put_if_absent(&key, before.clone()))
        .unwrap();
    let fetch = |name: &str| walship(&cfg, &["wal-fetch", name, dest.to_str().unwrap()], &scratch);
    assert_eq!(fetch(&seg2).status.code(), Some(4));
    let out = fetch(&seg);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains(&format!(
            "not serving timeline 1's copy of this segment: fetching {seg2}, timeline 2's, failed"
        )),
        "{err}"
    );
    assert!(!dest.exists(), "nothing placed");
    rt.block_on(store.delete(&key2)).unwrap();
    rt.block_on(store.put_if_absent(&key2, before.clone()))
        .unwrap();
    assert_eq!(fetch(&seg2).status.code(), Some(0));
    std::fs::remove_file(&dest).unwrap();
    let out = fetch(&seg);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&dest).unwrap();
    std::fs::remove_file(scratch.join("standby.signal")).unwrap();
    rt.block_on(store.delete(&key2)).unwrap(); // no timeline 2 in the archive's later checks

    // A wrong prefix is no repository, never "not in archive".
    let wrong = base.path().join("wrong.toml");
    std::fs::write(
        &wrong,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("/faults\"", "/nothing-here\""),
    )
    .unwrap();
    let out = walship(
        &wrong,
        &["wal-fetch", &seg, dest.to_str().unwrap()],
        &scratch,
    );
    assert_eq!(
        out.status.code(),
        Some(128 + 6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A value clap cannot parse (here in the environment restore_command runs with) is a usage
    // error like any other: fatal for recovery, never "not in archive".
    let with_bad_value = |fetch: [&str; 2], scratch: &Path| {
        common::walship_cmd(&cfg, &["wal-fetch", fetch[0], fetch[1]], scratch)
            .env("WALSHIP_PREFETCH", "off")
            .output()
            .unwrap()
    };
    let bad_value = |scratch: &Path| with_bad_value([&seg, dest.to_str().unwrap()], scratch);
    let out = bad_value(&scratch);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + 2), "{err}");
    // One line, naming the variable: nobody typed the flag clap knows it by.
    assert!(
        err.starts_with("walship: error: invalid value 'off' for '--prefetch")
            && err.contains("(the value of WALSHIP_PREFETCH)"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    // The same with a %p that is not UTF-8 (a data directory under such a path).
    let out = common::walship_cmd(&cfg, &["wal-fetch", &seg], &scratch)
        .arg(
            <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(
                b"pg\xffdata/RECOVERYXLOG",
            ),
        )
        .env("WALSHIP_PREFETCH", "off")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + 2), "{err}");
    std::fs::write(scratch.join("standby.signal"), b"").unwrap();
    assert_eq!(
        bad_value(&scratch).status.code(),
        Some(2),
        "standby: retried"
    );
    std::fs::remove_file(scratch.join("standby.signal")).unwrap();
    // So is the history copy at the end of archive recovery (the signal file gone, %p
    // RECOVERYHISTORY), whatever the failure: a code above 125 there stops the server halfway
    // through a promotion; PostgreSQL can do without the file.
    let history_copy =
        |scratch: &Path| with_bad_value(["00000001.history", "RECOVERYHISTORY"], scratch);
    assert_eq!(history_copy(&scratch).status.code(), Some(2));
    std::fs::write(scratch.join("recovery.signal"), b"").unwrap();
    assert_eq!(
        history_copy(&scratch).status.code(),
        Some(128 + 2),
        "during recovery, a history file recovery reads"
    );
    std::fs::remove_file(scratch.join("recovery.signal")).unwrap();
    assert!(!dest.exists());

    // Outage: the server dies, archiving fails and PostgreSQL retries; once it is back, no gap.
    server.kill();
    primary.psql("insert into filler select g, md5(g::text) from generate_series(1, 20000) g");
    let during = primary.switch_wal();
    common::wait_until("a failed archive attempt", Duration::from_secs(60), || {
        primary.psql("select failed_count from pg_stat_archiver") != "0"
    });
    primary.psql("insert into filler select g, md5(g::text) from generate_series(1, 20000) g");
    let after = primary.switch_wal();
    server.up();
    primary.wait_archived(&after);
    let archived = rt.block_on(archived_segments(&store));
    for name in [&during, &after] {
        assert!(
            archived.contains(name),
            "{name} archived after the outage: {archived:?}"
        );
    }
    assert_no_gap(&archived, "gap after outage");
    let err_log = primary.log();
    assert!(
        err_log.contains("walship wal-push: error:"),
        "the failure is in the PostgreSQL log"
    );

    // A standby that reads only the archive (no primary to stream from), with a short
    // wal.standby_fetch_timeout_secs; it is promoted while the server never answers, below.
    let cfg_standby = base.path().join("standby.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(
        text.trim_end().ends_with("fetch_attempts = 2"),
        "[wal] is last"
    );
    std::fs::write(&cfg_standby, text + "standby_fetch_timeout_secs = 3\n").unwrap();
    let standby_data = base.path().join("standby");
    primary.basebackup(&standby_data);
    let standby = Cluster::at(base.path(), standby_data.clone(), "standby");
    standby.append_conf(&(restore_conf(&cfg_standby) + "archive_mode = off\n"));
    std::fs::write(standby_data.join("standby.signal"), b"").unwrap();
    common::chown_postgres(&standby_data);
    standby.start();
    common::wait_until(
        "the standby to reach the end of the archive",
        Duration::from_secs(120),
        || standby.log().contains("is not in the archive"),
    );

    // kill -9 in the middle of an upload: the server hangs (SIGSTOP), the push is killed, and
    // afterwards the key holds nothing or the whole object, never a part; a rerun succeeds.
    let cfg_kill = server.config(&base.path().join("kill"), "faults-kill", &keys);
    let kill_store = rt.block_on(server.store("faults-kill"));
    let victim = scratch.join(&after);
    std::fs::copy(pg_wal.join(&after), &victim).unwrap();
    server.pause();
    let mut child =
        common::walship_cmd(&cfg_kill, &["wal-push", victim.to_str().unwrap()], &scratch)
            .spawn()
            .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "push hangs on the paused server"
    );
    child.kill().unwrap();
    child.wait().unwrap();

    // While the server never answers, a standby's wal-fetch gives up after
    // wal.standby_fetch_timeout_secs (exit 3): PostgreSQL tries again by itself, and until the
    // call ends it neither streams from its primary nor acts on a promote. (Outside standby mode
    // the call keeps retrying: giving up there stops recovery.)
    std::fs::write(scratch.join("standby.signal"), b"").unwrap();
    let dest = scratch.join("standby-segment");
    let started = std::time::Instant::now();
    let mut child = common::walship_cmd(
        &cfg_standby,
        &["wal-fetch", &after, dest.to_str().unwrap()],
        &scratch,
    )
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    while child.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "after {took:?}: {err}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert!(
        err.contains("within the 3 s") && err.contains("wal.standby_fetch_timeout_secs"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(!dest.exists());
    std::fs::remove_file(scratch.join("standby.signal")).unwrap();
    // The standby promotes within seconds: its calls, the one for the next segment, those for
    // history files that pick the new timeline and the one that copies the parent timeline's
    // history once standby.signal is gone, each give up after 3 s. (With the calls' whole retry
    // budget, pg_ctl would give up waiting after its minute; and the last call, with a code that
    // stops recovery, would stop the server halfway through the promotion.)
    let started = std::time::Instant::now();
    let out = common::as_postgres("pg_ctl")
        .arg("-D")
        .arg(&standby_data)
        .args(["-w", "-t", "60", "promote"])
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "promote after {took:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        standby.log()
    );
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert_eq!(standby.psql("select pg_is_in_recovery()"), "f");
    // The last of them, outside standby mode, with a plain code (PostgreSQL then uses pg_wal's
    // copy, here of timeline 1, which has none).
    assert!(
        standby.log().contains(
            "walship wal-fetch: error: 00000001.history: storage unavailable: no answer from"
        ),
        "{}",
        standby.log()
    );
    server.resume();
    let kkey = ObjectKey::new(format!("wal/{}/{after}", &after[..16])).unwrap();
    let check_whole = |what: &str| match rt.block_on(kill_store.get(&kkey)) {
        Ok(obj) => {
            let ids = walship::codec::Identities::parse(
                &std::fs::read_to_string(&keys.identity).unwrap(),
                "test",
            )
            .unwrap();
            let mut plain = Vec::new();
            walship::codec::decode(&obj, &ids, &mut plain)
                .unwrap_or_else(|e| panic!("{what}: a partial or corrupt object is visible: {e}"));
            assert_eq!(plain, std::fs::read(&victim).unwrap(), "{what}");
        }
        Err(walship::storage::StorageError::NotFound(_)) => {}
        Err(e) => panic!("{what}: {e}"),
    };
    check_whole("after kill -9");
    let out = walship(&cfg_kill, &["wal-push", victim.to_str().unwrap()], &scratch);
    assert_eq!(
        out.status.code(),
        Some(0),
        "rerun after kill -9: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_whole("after the rerun");
    assert!(
        rt.block_on(kill_store.get(&kkey)).is_ok(),
        "archived by the rerun"
    );

    // Deleted from the versioned bucket (a delete marker hides it): not "not in the archive",
    // which would end recovery there, but an error that stops it and says what happened.
    rt.block_on(kill_store.delete(&kkey)).unwrap();
    let dest = scratch.join("deleted-segment");
    let out = walship(
        &cfg_kill,
        &["wal-fetch", &after, dest.to_str().unwrap()],
        &scratch,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + 4), "{err}");
    assert!(
        err.contains("was deleted") && err.contains("delete marker"),
        "{err}"
    );
    assert!(!dest.exists());
}

/// The disk fills up, where the archive is and where recovery places WAL. Archiving fails and
/// PostgreSQL retries, with nothing half-written in the repository, and catches up without a gap
/// once space is freed; wal-fetch into a full pg_wal stops recovery (on a standby: an ordinary
/// failure) and leaves nothing in pg_wal. Both say what to do.
#[test]
fn a_full_disk_fails_cleanly_and_archiving_catches_up_once_space_is_freed() {
    let base = common::shared_tempdir("full");
    let keys = common::keygen(base.path());
    let repo_fs = SmallFs::mount(&base.path().join("repo-fs"), 64);
    let repo = repo_fs.dir.join("archive");
    let cfg = common::dir_config(base.path(), &repo, &keys);
    let store = walship::storage::fs::FsStore::new(&repo);
    let rt = tokio::runtime::Runtime::new().unwrap();

    let primary = Cluster::init(base.path(), "primary");
    primary.append_conf(&archiving_conf(&cfg));
    primary.start();
    primary.psql("create table filler as select g, md5(g::text) from generate_series(1, 50000) g");
    let first = primary.switch_wal();
    primary.wait_archived(&first);

    // 64 KiB left: every push runs out of space part-way through writing its object.
    repo_fs.fill_leaving(64 << 10);
    let more = "insert into filler select g, md5(g::text) from generate_series(1, 50000) g";
    primary.psql(more);
    let during = primary.switch_wal();
    common::wait_until("a failed archive attempt", Duration::from_secs(60), || {
        primary.psql("select failed_count from pg_stat_archiver") != "0"
    });
    primary.psql(more);
    let after = primary.switch_wal();
    let log = primary.log();
    let failure = log
        .lines()
        .find(|l| l.contains("walship wal-push: error:"))
        .unwrap_or_else(|| panic!("the failure is in the PostgreSQL log:\n{log}"));
    assert!(
        failure.contains("No space left on device")
            && failure.contains("the file system is full: free space on it"),
        "{failure}"
    );
    assert!(
        !rt.block_on(archived_segments(&store)).contains(&during),
        "{during} not archived while the disk is full"
    );
    let files = repo_fs.files();
    assert!(
        files.iter().all(|f| !f.contains(".tmp")),
        "nothing half-written in the repository: {files:?}"
    );

    repo_fs.free_all();
    primary.wait_archived(&after);
    let archived = rt.block_on(archived_segments(&store));
    assert_no_gap(&archived, "gap after the disk was full");
    assert!(archived.contains(&during) && archived.contains(&after));
    primary.stop();

    // Recovery's pg_wal on a full file system: the fetched segment cannot be placed.
    let pg_fs = SmallFs::mount(&base.path().join("pg-fs"), 8);
    std::fs::create_dir(pg_fs.dir.join("pg_wal")).unwrap();
    pg_fs.fill_leaving(64 << 10);
    let fetch = || {
        walship(
            &cfg,
            &["wal-fetch", &during, "pg_wal/RECOVERYXLOG"],
            &pg_fs.dir,
        )
    };
    let out = fetch();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + 7), "{err}");
    assert!(
        err.contains("the file system is full: free space on it"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    assert_eq!(
        pg_fs.files(),
        Vec::<String>::new(),
        "nothing left in pg_wal"
    );
    std::fs::write(pg_fs.dir.join("standby.signal"), b"").unwrap();
    let out = fetch();
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Beside the signal file, only the record of the failed fetch, which holds back older
    // timelines' copies of the segment for a while (wal::fallback).
    assert_eq!(
        pg_fs.files(),
        ["pg_wal/.walship/fetch-failed", "standby.signal"]
    );
}

/// Real segments with `.ready` files, as an archiver that fell behind leaves them: one wal-push
/// uploads the backlog ahead, later calls for those segments return without uploading, and a
/// changed file is never trusted to its record.
#[test]
fn look_ahead_uploads_the_backlog_and_later_calls_find_it_done() {
    let base = common::shared_tempdir("ahead");
    let keys = common::keygen(base.path());
    let repo = base.path().join("archive");
    let cfg = common::dir_config(base.path(), &repo, &keys);

    let pg = Cluster::init(base.path(), "pg");
    pg.append_conf("wal_level = replica\narchive_mode = on\narchive_command = 'exit 1'\n");
    pg.start();
    pg.psql("create table t as select g from generate_series(1, 10000) g");
    for _ in 0..5 {
        pg.psql("insert into t select g from generate_series(1, 10000) g");
        pg.switch_wal();
    }
    pg.stop();
    let status = pg.data.join("pg_wal/archive_status");
    let mut ready: Vec<String> = std::fs::read_dir(&status)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".ready")
                .map(str::to_string)
        })
        .collect();
    ready.sort();
    assert!(ready.len() >= 5, "a backlog of .ready segments: {ready:?}");

    let push = |name: &str| {
        let out = common::walship_cmd(&cfg, &["wal-push", &format!("pg_wal/{name}")], &pg.data)
            .env("WALSHIP_LOG", "walship=info")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(0), "wal-push {name}: {err}");
        err
    };
    let first = push(&ready[0]);
    assert!(
        first.contains(&format!("{} more uploaded ahead", ready.len() - 1)),
        "{first}"
    );
    for name in &ready {
        let stored = repo.join(format!("wal/{}/{name}", &name[..16]));
        assert!(stored.is_file(), "{name} archived by the first call");
    }
    // Records live in one directory per repository: pushed/<repository tag>/<name>.
    let has_record = |name: &str| {
        std::fs::read_dir(pg.data.join("pg_wal/.walship/pushed"))
            .unwrap()
            .flatten()
            .any(|d| d.path().join(name).is_file())
    };
    assert!(has_record(&ready[1]), "look-ahead left a record");
    let second = push(&ready[1]);
    assert!(
        second.contains("uploaded earlier by look-ahead"),
        "{second}"
    );
    assert!(!has_record(&ready[1]), "a record is used once");

    // A file changed since its look-ahead upload is pushed again, and found identical by header.
    let third = pg.data.join("pg_wal").join(&ready[2]);
    let f = std::fs::OpenOptions::new()
        .append(true)
        .open(&third)
        .unwrap();
    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    drop(f);
    let again = push(&ready[2]);
    assert!(
        again.contains("already archived with the same content"),
        "{again}"
    );

    // A restore into pg_wal/<name> (pg_rewind --restore-target-wal) gets the file and no prefetcher.
    let rewind = base.path().join("rewind/pg_wal");
    std::fs::create_dir_all(&rewind).unwrap();
    let dest = rewind.join(&ready[3]);
    let out = walship(
        &cfg,
        &["wal-fetch", &ready[3], dest.to_str().unwrap()],
        base.path(),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        std::fs::read(pg.data.join("pg_wal").join(&ready[3])).unwrap()
    );
    assert!(
        !rewind.join(".walship/spool/.want").exists(),
        "no prefetch for a pg_rewind-style call"
    );

    // Short of free space beside pg_wal, the prefetcher downloads nothing (PostgreSQL needs that
    // space more than recovery needs speed) and wal-fetch still places each segment itself.
    let tight = base.path().join("tight.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&tight, text + "[wal]\nprefetch_min_free_mb = 1000000000\n").unwrap();
    let data = base.path().join("recovering");
    std::fs::create_dir_all(data.join("pg_wal")).unwrap();
    std::fs::write(data.join("postmaster.pid"), "4242\n").unwrap();
    for name in &ready[..2] {
        let out = walship(&tight, &["wal-fetch", name, "pg_wal/RECOVERYXLOG"], &data);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert_eq!(
            std::fs::read(data.join("pg_wal/RECOVERYXLOG")).unwrap(),
            std::fs::read(pg.data.join("pg_wal").join(name)).unwrap()
        );
    }
    let state = data.join("pg_wal/.walship");
    common::wait_until("the prefetcher to pause", Duration::from_secs(30), || {
        std::fs::read_to_string(state.join("prefetch.log"))
            .is_ok_and(|l| l.contains("prefetching paused"))
    });
    let spooled: Vec<_> = std::fs::read_dir(state.join("spool"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(spooled, Vec::<String>::new());
    std::fs::remove_file(data.join("postmaster.pid")).unwrap(); // the prefetcher exits
}

/// A PostgreSQL server started the way the official container image starts it: as PID 1 of its
/// own PID namespace (no init), so it reaps every orphan there. Never stopped with `pg_ctl`,
/// which would signal PID 1 of *this* namespace.
struct Pid1Postmaster {
    unshare: std::process::Child,
    data: std::path::PathBuf,
}

impl Pid1Postmaster {
    fn start(c: &Cluster) -> Self {
        c.append_conf(&format!(
            "port = {}\nunix_socket_directories = '{}'\nlisten_addresses = ''\nfsync = off\n",
            c.port,
            c.sock.display()
        ));
        let log = std::fs::File::create(c.log_path()).unwrap();
        let unshare = std::process::Command::new("unshare")
            .args(["--pid", "--fork", "setpriv"])
            .args(["--reuid=postgres", "--regid=postgres", "--clear-groups"])
            .arg(common::pg_bin("postgres"))
            .arg("-D")
            .arg(&c.data)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Self {
            unshare,
            data: c.data.clone(),
        }
    }

    /// The postmaster's pid as this namespace sees it: the child of `unshare`.
    fn host_pid(&self) -> Option<i32> {
        let id = self.unshare.id();
        std::fs::read_to_string(format!("/proc/{id}/task/{id}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}

impl Drop for Pid1Postmaster {
    fn drop(&mut self) {
        if let Some(pid) = self.host_pid().and_then(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
        }
        let pid_file = self.data.join("postmaster.pid");
        for _ in 0..600 {
            if !pid_file.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

/// Resident KiB of a process.
fn rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The prefetcher outlives the wal-fetch call that starts it, so the postmaster, when it is PID 1
/// (a container without an init), reaps it; PostgreSQL takes a child that exits with a status
/// other than 0 or 1, or by a signal, for a crashed backend and restarts everything, recovery
/// included. Here the prefetcher is killed outright, as the OOM killer would.
#[test]
fn a_prefetcher_killed_under_a_postmaster_that_is_pid_1_does_not_restart_it() {
    let base = common::shared_tempdir("pid1");
    let keys = common::keygen(base.path());
    let cfg = common::dir_config(base.path(), &base.path().join("repo"), &keys);
    let primary = Cluster::init(base.path(), "primary");
    primary.append_conf(&archiving_conf(&cfg));
    primary.start();
    primary.psql("create table marks (id serial primary key, note text not null)");
    let data = base.path().join("standby");
    primary.basebackup(&data);
    primary.pgbench(&["-i", "-s", "4", "-q"]);
    let last = primary.switch_wal();
    primary.wait_archived(&last);

    // Never dropped: Cluster's drop runs `pg_ctl stop`.
    let standby = std::mem::ManuallyDrop::new(Cluster::at(base.path(), data.clone(), "standby"));
    standby.append_conf(&restore_conf(&cfg));
    std::fs::write(data.join("standby.signal"), b"").unwrap();
    common::chown_postgres(&data);
    let server = Pid1Postmaster::start(&standby);
    common::wait_until(
        "the standby to accept connections",
        Duration::from_secs(120),
        || standby.try_psql("select 1").as_deref() == Some("1"),
    );
    let pid_line = std::fs::read_to_string(data.join("postmaster.pid")).unwrap();
    assert_eq!(
        pid_line.lines().next(),
        Some("1"),
        "the postmaster is PID 1"
    );
    assert!(server.host_pid().is_some());

    // The prefetcher doing the work is the biggest process of it (the one the OOM killer picks).
    let pid_file = data.join("postmaster.pid").to_string_lossy().into_owned();
    let prefetchers = || -> Vec<String> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .map(|p| p.file_name().to_string_lossy().into_owned())
            .filter(|p| p.parse::<u32>().is_ok())
            .filter(|p| {
                let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&cmd);
                cmd.contains("\0wal-prefetch\0") && cmd.contains(&pid_file)
            })
            .collect()
    };
    common::wait_until("a prefetcher to run", Duration::from_secs(60), || {
        !prefetchers().is_empty()
    });
    let worker = prefetchers()
        .into_iter()
        .max_by_key(|p| rss_kib(p))
        .unwrap();
    let pid = rustix::process::Pid::from_raw(worker.parse().unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
    std::thread::sleep(Duration::from_secs(3));

    // Recovery goes on: a later transaction reaches the standby through the archive.
    primary.psql("insert into marks (note) values ('after the kill')");
    let last = primary.switch_wal();
    primary.wait_archived(&last);
    common::wait_until(
        "the standby to replay the mark",
        Duration::from_secs(120),
        || standby.try_psql("select count(*) from marks").as_deref() == Some("1"),
    );
    let log = standby.log();
    assert!(
        !log.contains("terminating any other active server processes")
            && !log.contains("was terminated by signal"),
        "the postmaster took the prefetcher for a crashed backend:\n{log}"
    );
    assert!(
        log.contains("served from the prefetch spool"),
        "the prefetcher worked:\n{log}"
    );
    drop(server);
    assert!(!data.join("postmaster.pid").exists(), "the server stopped");
}

/// Exit 8 (136 from wal-fetch outside standby mode, so recovery stops): a walship that cannot
/// start its threads, here under a process limit its user has already reached, says so in one
/// line and never exits 1, which restore_command would take for the end of the archive.
#[test]
fn a_process_limit_is_exit_8_and_never_the_end_of_the_archive() {
    let dir = common::shared_tempdir("nproc");
    let under_limit = |args: &[&str]| {
        // An unused uid: as root the limit would not apply.
        let out = std::process::Command::new("prlimit")
            .args([
                "--nproc=1",
                "--",
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
            ])
            .args([
                "--clear-groups",
                common::WALSHIP,
                "--repo",
                "file:///nonexistent",
            ])
            .args(args)
            .current_dir(dir.path())
            .env_remove("WALSHIP_LOG")
            .output()
            .expect("run prlimit");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = under_limit(&["check"]);
    assert_eq!(code, Some(8), "{err}");
    assert!(
        err.contains("cannot start its threads") && err.contains("limit"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    let dest = dir.path().join("RECOVERYXLOG");
    let (code, err) = under_limit(&[
        "wal-fetch",
        "000000010000000000000001",
        dest.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(128 + 8), "{err}");
    assert!(!dest.exists());
}
