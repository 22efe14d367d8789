//! Base backups and point-in-time restore with real parts: PostgreSQL 15 archiving through walship,
//! `walship backup-push` while pgbench writes, `walship restore` to a named restore point, to a time
//! between two transactions and to the end of the archive, with a tablespace moved on restore.
//! A backup taken on a streaming standby, restored and promoted. Then the failures: a target older
//! than every backup, a corrupt part, a backup killed mid-upload, a non-empty target directory.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::{walship, Cluster, S3Server, SmallFs};

fn archiving_conf(cfg: &Path) -> String {
    format!(
        "wal_level = replica\narchive_mode = on\n\
         archive_command = 'WALSHIP_LOG=walship=info {} --config {} wal-push %p'\n\
         max_wal_size = '1GB'\ncheckpoint_timeout = '30min'\n",
        common::WALSHIP,
        cfg.display()
    )
}

fn pg_args(c: &Cluster) -> Vec<String> {
    vec![
        "--pg-host".into(),
        c.sock.display().to_string(),
        "--pg-port".into(),
        c.port.to_string(),
        "--pg-user".into(),
        "postgres".into(),
        "--pg-dbname".into(),
        "postgres".into(),
    ]
}

fn run(cfg: &Path, args: &[String], cwd: &Path) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    walship(cfg, &args, cwd)
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "walship failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn backup_push(cfg: &Path, c: &Cluster, extra: &[&str]) -> Output {
    let mut a = vec!["backup-push".to_string()];
    a.extend(pg_args(c));
    a.extend(extra.iter().map(|s| s.to_string()));
    run(cfg, &a, c.data.parent().unwrap())
}

/// `walship restore DIR ARGS...`, run beside DIR.
fn restore(cfg: &Path, dir: &Path, args: &[&str]) -> Output {
    let mut a = vec!["restore".to_string(), dir.display().to_string()];
    a.extend(args.iter().map(|s| s.to_string()));
    run(cfg, &a, dir.parent().unwrap())
}

/// `walship backup-fetch <id> <dir>`, run beside `dir`.
fn backup_fetch(cfg: &Path, id: &str, dir: &Path) -> Output {
    let args = [
        "backup-fetch".to_string(),
        id.to_string(),
        dir.display().to_string(),
    ];
    run(cfg, &args, dir.parent().unwrap())
}

/// `walship backup-list --json`, parsed.
fn list_json(cfg: &Path) -> serde_json::Value {
    let out = ok(&run(
        cfg,
        &["backup-list".into(), "--json".into()],
        cfg.parent().unwrap(),
    ));
    serde_json::from_str(&out).unwrap()
}

fn marks(c: &Cluster) -> String {
    c.psql("select string_agg(note, ',' order by id) from marks")
}

fn accounts(c: &Cluster) -> String {
    c.psql("select count(*) || ':' || sum(abalance) from pgbench_accounts")
}

/// Start a cluster restored by `walship restore` and wait until recovery has promoted it.
fn start_restored(base: &Path, data: &Path, name: &str) -> Cluster {
    // walship ran as root: it gave everything it wrote, tablespaces included, to the owner of the
    // backed-up data directory, so PostgreSQL can start without a chown.
    let foreign = common::run_ok(
        std::process::Command::new("find")
            .arg("-L")
            .arg(data)
            .args(["!", "-user", "postgres"]),
    );
    assert_eq!(
        String::from_utf8_lossy(&foreign.stdout),
        "",
        "restored files not owned by postgres"
    );
    let c = Cluster::at(base, data.to_path_buf(), name);
    c.start();
    let since = std::time::Instant::now();
    while c.try_psql("select pg_is_in_recovery()").as_deref() != Some("f") {
        assert!(
            since.elapsed() < Duration::from_secs(180),
            "{name} did not finish recovery:\n{}",
            c.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Recovery over, its recovery_end_command (`walship recovery-done`) blanked the target and set
    // the timeline back to 'latest', in the files PostgreSQL would read at its next start: standbys
    // cloned from this cluster, or this cluster rewound into a standby, would otherwise stop (and
    // promote) at that target again. The backup's postgresql.conf may set a target of its own.
    let effective = || {
        c.psql(
            "select coalesce(string_agg(name || '=' || setting, ',' order by name), '') \
             from pg_file_settings f \
             where seqno = (select max(seqno) from pg_file_settings g where g.name = f.name) \
               and (name like 'recovery_target%' or name = 'recovery_end_command') \
               and name not in ('recovery_target_action', 'recovery_target_inclusive') \
               and not (name = 'recovery_target_timeline' and setting = 'latest')",
        )
    };
    let done = "recovery_target=,recovery_target_lsn=,recovery_target_name=,\
                recovery_target_time=,recovery_target_xid=";
    let since = std::time::Instant::now();
    while effective() != done && since.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        effective(),
        done,
        "{name}: recovery settings after recovery"
    );
    c
}

#[test]
fn backup_under_load_then_restore_to_a_restore_point_a_time_and_the_end() {
    let server = S3Server::start();
    let base = common::shared_tempdir("pitr");
    let keys = common::keygen(base.path());
    let cfg = server.config(base.path(), "pitr", &keys);

    let primary = Cluster::init(base.path(), "primary");
    primary.append_conf(&archiving_conf(&cfg));
    primary.start();
    let ts_dir = base.path().join("ts-original");
    std::fs::create_dir_all(&ts_dir).unwrap();
    common::chown_postgres(&ts_dir);
    primary.psql(&format!(
        "create tablespace fast location '{}'",
        ts_dir.display()
    ));
    primary.psql("create table marks (id serial primary key, note text not null) tablespace fast");
    primary.psql("insert into marks (note) values ('before backup')");
    primary.pgbench(&["-i", "-s", "5", "-q"]);
    // Unlogged: recovery empties it, so the backup leaves out all but its init forks. Its index
    // lives in the tablespace, whose database directories are walked the same way.
    primary.psql(
        "create unlogged table scratch (id int primary key using index tablespace fast, v text)",
    );
    primary.psql("insert into scratch select g, repeat('x', 200) from generate_series(1, 20000) g");
    let scratch_files = [
        primary.psql("select pg_relation_filepath('scratch')"),
        primary.psql("select pg_relation_filepath('scratch_pkey')"),
    ];
    assert!(
        scratch_files[1].starts_with("pg_tblspc/"),
        "{scratch_files:?}"
    );

    // Settings an earlier restore of this cluster left in postgresql.auto.conf (ignored outside
    // recovery) travel in the backup; restore disables them, or PostgreSQL would refuse the
    // second target kind below ("multiple recovery targets specified").
    let auto_conf = primary.data.join("postgresql.auto.conf");
    let mut conf = std::fs::read_to_string(&auto_conf).unwrap();
    conf.push_str(
        "recovery_target_time = '2000-01-01 00:00:00+00'\nrecovery_target_action = 'shutdown'\n",
    );
    std::fs::write(&auto_conf, conf).unwrap();
    // And settings of a delayed standby in postgresql.conf, which travel in the backup too: a
    // restore overrides them, or each restore would wait a day per commit, or stop at xid 3, or
    // prune the standby's local archive at every restartpoint.
    primary.append_conf(
        "recovery_min_apply_delay = '1d'\nrecovery_target_xid = '3'\n\
         archive_cleanup_command = 'pg_archivecleanup /nonexistent %r'\n",
    );

    // The backup runs while pgbench writes.
    let load = {
        let (sock, port) = (primary.sock.clone(), primary.port);
        std::thread::spawn(move || {
            common::run_ok(
                common::as_postgres("pgbench")
                    .args(["-U", "postgres", "-h"])
                    .arg(&sock)
                    .args([
                        "-p",
                        &port.to_string(),
                        "-n",
                        "-c",
                        "2",
                        "-T",
                        "6",
                        "postgres",
                    ]),
            );
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let id = ok(&backup_push(&cfg, &primary, &["--part-size-mb", "4"]));
    load.join().unwrap();
    assert_eq!(id.len(), 16, "backup-push prints the id: {id}");
    // Every page was checked against its checksum while pgbench rewrote pages: none is bad (a
    // read racing a write is told from corruption).
    let listed = list_json(&cfg);
    let checks = &listed["backups"][0]["page_checks"];
    assert!(
        checks["verified"].as_u64().unwrap() > 1000 && checks["bad"] == 0,
        "{listed}"
    );

    // Nor is a data directory a server runs on, whatever --force says.
    let out = restore(&cfg, &primary.data, &["--force", "--dry-run"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("a PostgreSQL server is running"), "{err}");

    // The bank's story: good work, a restore point, a time, then the faulty batch job.
    let good_xid = primary
        .psql("insert into marks (note) values ('good work') returning pg_current_xact_id()");
    let good_accounts = accounts(&primary);
    let out = run(
        &cfg,
        &[
            vec!["restore-point".into(), "before_batch".into()],
            pg_args(&primary),
        ]
        .concat(),
        base.path(),
    );
    assert!(ok(&out).starts_with("before_batch "), "prints name and LSN");
    // The same name again (tomorrow's batch): refused, or a restore to it would go to today's.
    let again = run(
        &cfg,
        &[
            vec!["restore-point".into(), "before_batch".into()],
            pg_args(&primary),
        ]
        .concat(),
        base.path(),
    );
    assert_eq!(again.status.code(), Some(5), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("use a new name"),
        "{}",
        stderr(&again)
    );
    std::thread::sleep(Duration::from_millis(1100));
    // Written as a local time with a zone name (one without clock changes, so the test never
    // meets a repeated hour); walship hands PostgreSQL the offset it stands for.
    let between = primary.psql(
        "select to_char(now() at time zone 'Asia/Kolkata', 'YYYY-MM-DD HH24:MI:SS.US') \
         || ' Asia/Kolkata'",
    );
    std::thread::sleep(Duration::from_millis(1100));
    let good_lsn = primary.psql("select pg_current_wal_lsn()");
    primary.psql("update pgbench_accounts set abalance = abalance - 1000 where aid <= 1000");
    primary.psql("insert into marks (note) values ('batch job')");
    let end_accounts = accounts(&primary);
    let end_marks = marks(&primary);
    let last = primary.switch_wal();
    primary.wait_archived(&last);
    primary.stop();

    let listed = list_json(&cfg);
    assert_eq!(listed["backups"][0]["id"], id.as_str());
    assert!(listed["backups"][0]["stored_size"].as_u64().unwrap() > 0);
    assert!(listed["newest_recoverable"]["lsn"].is_string());
    assert!(listed["newest_recoverable"]["stored_at"].is_string());

    // The database host has only the public key: it lists backups all the same.
    let public_only = base.path().join("public-only.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("identity_file"), "{text}");
    std::fs::write(
        &public_only,
        text.lines()
            .filter(|l| !l.starts_with("identity_file"))
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    let listed_public = list_json(&public_only);
    assert_eq!(listed_public, listed);

    // On the database host, the tablespace's original location is the running server's: never
    // emptied, not even with --force, and refused before the target is touched.
    let at_point = base.path().join("at-point");
    let out = restore(
        &cfg,
        &at_point,
        &["--target-name", "before_batch", "--force"],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("original location") && err.contains("--tablespace-map"),
        "{err}"
    );
    assert!(!at_point.exists(), "nothing written");
    assert!(is_non_empty(&ts_dir), "the live tablespace is untouched");

    // To the restore point, with the tablespace moved.
    let moved = base.path().join("ts-moved");
    let out = restore(
        &cfg,
        &at_point,
        &[
            "--target-name",
            "before_batch",
            "--archive-mode",
            "off",
            "--target-action",
            "promote",
            "--tablespace-map",
            &format!("{}={}", ts_dir.display(), moved.display()),
        ],
    );
    ok(&out);
    assert!(
        !stderr(&out).contains("cannot read"),
        "every file restore_command needs is readable by postgres: {}",
        stderr(&out)
    );
    let auto = std::fs::read_to_string(at_point.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto.contains("recovery_target_name = 'before_batch'"),
        "{auto}"
    );
    assert!(auto.contains("wal-fetch \"%f\" \"%p\""), "{auto}");
    assert!(at_point.join("recovery.signal").exists());
    assert!(
        auto.contains("archive_mode = 'off'"),
        "a drill does not archive: {auto}"
    );
    assert!(
        auto.contains("# disabled by walship restore: recovery_target_time = '2000-01-01")
            && auto.contains("# disabled by walship restore: recovery_target_action = 'shutdown'"),
        "{auto}"
    );
    for f in &scratch_files {
        assert!(!at_point.join(f).exists(), "{f}: unlogged, left out");
        assert!(
            at_point.join(format!("{f}_init")).exists(),
            "{f}_init: kept, recovery needs it"
        );
    }
    let c = start_restored(base.path(), &at_point, "at-point");
    assert_eq!(marks(&c), "before backup,good work");
    assert_eq!(
        c.psql("show archive_cleanup_command"),
        "",
        "the backup's is overridden"
    );
    assert_eq!(
        c.psql("select count(*) from scratch"),
        "0",
        "unlogged: empty"
    );
    c.psql("insert into scratch values (1, 'usable')");
    assert_eq!(
        accounts(&c),
        good_accounts,
        "every earlier transaction is there"
    );
    assert_eq!(
        std::fs::read_link(at_point.join(format!(
            "pg_tblspc/{}",
            c.psql("select oid from pg_tablespace where spcname = 'fast'")
        )))
        .unwrap(),
        moved
    );
    c.stop();

    // To a time between the restore point and the batch job: first a dry run, which says what it
    // would do and leaves the directory alone.
    let at_time = base.path().join("at-time");
    let ts_map = format!(
        "{}={}",
        ts_dir.display(),
        base.path().join("ts-2").display()
    );
    let plan = ok(&restore(
        &cfg,
        &at_time,
        &[
            "--target-time",
            &between,
            "--tablespace-map",
            &ts_map,
            "--dry-run",
        ],
    ));
    assert!(
        plan.starts_with("would restore backup ")
            && plan.contains("to download in")
            && plan.contains("recovery_target_time = '")
            && plan.contains("restore_command = '")
            && plan.contains(" page checksums verified when it was taken"),
        "{plan}"
    );
    assert!(!at_time.exists(), "a dry run writes nothing");
    ok(&restore(
        &cfg,
        &at_time,
        &[
            "--target-time",
            &between,
            "--archive-mode",
            "off",
            "--target-action",
            "promote",
            "--tablespace-map",
            &format!(
                "{}={}",
                ts_dir.display(),
                base.path().join("ts-2").display()
            ),
        ],
    ));
    let settings = std::fs::read_to_string(at_time.join("postgresql.auto.conf")).unwrap();
    assert!(
        settings.contains(&format!(
            "recovery_target_time = '{}+05:30'",
            between.trim_end_matches(" Asia/Kolkata")
        )),
        "{settings}"
    );
    let c = start_restored(base.path(), &at_time, "at-time");
    assert_eq!(
        marks(&c),
        "before backup,good work",
        "target time {between}"
    );
    assert_eq!(accounts(&c), good_accounts);
    c.stop();

    // To the end of the archive: the batch job is there too.
    let at_end = base.path().join("at-end");
    ok(&restore(
        &cfg,
        &at_end,
        &[
            "--tablespace-map",
            &format!(
                "{}={}",
                ts_dir.display(),
                base.path().join("ts-3").display()
            ),
        ],
    ));
    let c = start_restored(base.path(), &at_end, "at-end");
    assert_eq!(marks(&c), end_marks);
    assert_eq!(accounts(&c), end_accounts);
    c.stop();

    // To the good work's transaction id, and to a WAL location before the batch.
    for (n, target) in [
        (6, ["--target-xid", &good_xid]),
        (7, ["--target-lsn", &good_lsn]),
    ] {
        let dir = base.path().join(format!("at-{}", &target[0][9..]));
        let map = format!(
            "{}={}",
            ts_dir.display(),
            base.path().join(format!("ts-{n}")).display()
        );
        ok(&restore(
            &cfg,
            &dir,
            &[
                target[0],
                target[1],
                "--target-action",
                "promote",
                "--archive-mode",
                "off",
                "--tablespace-map",
                &map,
            ],
        ));
        let c = start_restored(base.path(), &dir, &format!("at-{n}"));
        assert_eq!(marks(&c), "before backup,good work", "{target:?}");
        assert_eq!(accounts(&c), good_accounts, "{target:?}");
        c.stop();
    }

    // The copy restored to before the batch becomes production, archiving (as configured) into
    // the same repository: timeline 3 (the restore to the end made 2) forks from timeline 1, whose
    // archived WAL goes on with the batch job. A restore of the backup to the end of the archive now cannot tell production
    // from a drill: it refuses and asks, rather than replay the batch along timeline 1.
    let ts_map = |n: u32| {
        format!(
            "{}={}",
            ts_dir.display(),
            base.path().join(format!("ts-{n}")).display()
        )
    };
    let new_prod = base.path().join("new-production");
    ok(&restore(
        &cfg,
        &new_prod,
        &[
            "--target-name",
            "before_batch",
            "--target-action",
            "promote",
            "--tablespace-map",
            &ts_map(4),
        ],
    ));
    let c = start_restored(base.path(), &new_prod, "new-production");
    c.psql("insert into marks (note) values ('new production')");
    let last = c.switch_wal();
    assert!(last.starts_with("00000003"), "{last}");
    c.wait_archived(&last);
    c.stop();
    // The old primary comes back for a while and its nightly backup runs: a backup on timeline 1,
    // taken after timeline 3 forked and newer than every other, while production (timeline 3)
    // archives on. Restoring the newest backup would bring the batch job back along timeline 1.
    // (Without the two recovery targets set above: PostgreSQL refuses to start with both.)
    let conf = std::fs::read_to_string(&auto_conf).unwrap();
    let conf: String = conf
        .lines()
        .filter(|l| !l.starts_with("recovery_target_time"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&auto_conf, conf).unwrap();
    primary.append_conf("recovery_target_xid = ''");
    primary.start();
    let old_primary_backup = ok(&backup_push(&cfg, &primary, &[]));
    primary.stop();
    c.start();
    c.psql("insert into marks (note) values ('production goes on')");
    let last = c.switch_wal();
    c.wait_archived(&last);
    c.stop();
    let disaster = base.path().join("disaster");
    let out = restore(&cfg, &disaster, &["--tablespace-map", &ts_map(5)]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("timeline 3 forked from 1") && err.contains("--target-timeline 1 | 2 | 3"),
        "{err}"
    );
    assert!(!disaster.exists(), "nothing written");
    // A standby would follow PostgreSQL's 'latest', timeline 3, which may not be production's
    // either: it is asked the same.
    let out = restore(
        &cfg,
        &disaster,
        &["--standby", "--tablespace-map", &ts_map(5)],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--target-timeline 1 | 2 | 3"), "{err}");
    assert!(!disaster.exists(), "nothing written");
    // Timeline 1's history is the old primary's backup; timeline 3's cannot start from it.
    let plan = ok(&restore(
        &cfg,
        &disaster,
        &[
            "--dry-run",
            "--target-timeline",
            "1",
            "--tablespace-map",
            &ts_map(5),
        ],
    ));
    assert!(plan.contains(&old_primary_backup), "{plan}");
    let out = restore(
        &cfg,
        &disaster,
        &["--target-timeline", "3", "--backup", &old_primary_backup],
    );
    let err = stderr(&out);
    assert!(
        err.contains("does not lie on timeline 3's history"),
        "{err}"
    );
    let out = restore(&cfg, &disaster, &["--target-timeline", "lates"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    ok(&restore(
        &cfg,
        &disaster,
        &["--target-timeline", "3", "--tablespace-map", &ts_map(5)],
    ));
    let c = start_restored(base.path(), &disaster, "disaster");
    assert_eq!(
        marks(&c),
        "before backup,good work,new production,production goes on"
    );
    assert_eq!(accounts(&c), good_accounts);
    c.stop();
}

#[test]
fn a_backup_taken_on_a_standby_restores_and_promotes() {
    let base = common::shared_tempdir("standby-backup");
    let keys = common::keygen(base.path());
    let cfg = common::dir_config(base.path(), &base.path().join("repo"), &keys);
    let primary = Cluster::init(base.path(), "primary");
    primary.append_conf(&archiving_conf(&cfg));
    // A standby cannot switch WAL segments: the primary's archive_timeout is what archives the
    // segment holding the backup's stop point.
    primary.append_conf("archive_timeout = 2");
    primary.start();
    primary.pgbench(&["-i", "-s", "2", "-q"]);
    primary.psql("create table marks (id serial primary key, note text not null)");
    primary.psql("insert into marks (note) values ('before backup')");

    let standby_dir = base.path().join("standby");
    common::run_ok(
        common::as_postgres("pg_basebackup")
            .args(["-U", "postgres", "-h"])
            .arg(&primary.sock)
            .args(["-p", &primary.port.to_string()])
            .args(["-X", "stream", "-R", "-c", "fast", "--no-sync", "-D"])
            .arg(&standby_dir),
    );
    let standby = Cluster::at(base.path(), standby_dir.clone(), "standby");
    standby.start();
    common::wait_until(
        "the standby to replay the first mark",
        Duration::from_secs(60),
        || standby.try_psql("select count(*) from marks").as_deref() == Some("1"),
    );
    assert_eq!(standby.psql("select pg_is_in_recovery()"), "t");

    // The standby's directory read with a connection to the primary (one cluster, so the system
    // identifiers match): the files and the backup label would come from two servers, and the
    // backup would restore into an inconsistent database. Refused before anything is uploaded.
    let pgdata = |dir: &Path| ["--pgdata", dir.to_str().unwrap()].map(String::from);
    let out = backup_push(
        &cfg,
        &primary,
        &pgdata(&standby_dir).each_ref().map(String::as_str),
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("they are different servers"),
        "{}",
        stderr(&out)
    );
    // A copy of the primary's directory that no server runs on.
    let copy = base.path().join("copy");
    std::fs::create_dir_all(copy.join("global")).unwrap();
    for f in ["PG_VERSION", "global/pg_control"] {
        std::fs::copy(primary.data.join(f), copy.join(f)).unwrap();
    }
    let out = backup_push(
        &cfg,
        &primary,
        &pgdata(&copy).each_ref().map(String::as_str),
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no server is running"),
        "{}",
        stderr(&out)
    );
    let listed = list_json(&cfg);
    assert!(
        listed["backups"].as_array().unwrap().is_empty()
            && listed["unfinished"].as_array().unwrap().is_empty(),
        "nothing uploaded: {listed}"
    );

    let id = ok(&backup_push(&cfg, &standby, &[]));
    // `check --archiving` on the standby: the same cluster, but no archive test (a standby
    // cannot write a restore point or switch WAL), and no failure for it.
    let text = ok(&run(
        &cfg,
        &[
            vec!["check".into(), "--archiving".into()],
            pg_args(&standby),
        ]
        .concat(),
        base.path(),
    ));
    assert!(
        text.contains("standby") && text.contains("archive test ok   skipped: a standby"),
        "{text}"
    );
    let listed = list_json(&cfg);
    assert_eq!(listed["backups"][0]["id"], id.as_str());
    assert_eq!(listed["backups"][0]["from_standby"], true);
    assert!(
        listed["backups"][0]["next_xid"]
            .as_u64()
            .is_some_and(|x| x > 3),
        "a standby's backup records the next xid too: {listed}"
    );

    primary.psql("insert into marks (note) values ('after backup')");
    let want = accounts(&primary);
    let last = primary.switch_wal();
    primary.wait_archived(&last);
    common::wait_until(
        "the standby to replay the second mark",
        Duration::from_secs(60),
        || standby.try_psql("select count(*) from marks").as_deref() == Some("2"),
    );

    // Failover: the primary goes away and the standby, which archives with the same settings,
    // is promoted to timeline 2. A restore point made right away names timeline 2's segment (the
    // server's checkpoint record still says timeline 1 until its first checkpoint ends).
    // The old primary archived the segment it was writing before it went (here by hand: a
    // failover that lost what it held past the fork point). The promoted standby forks in that
    // segment and archives its own streamed copy as .partial, which tells the failover from a
    // restore drill that replayed to the end of the archive.
    let forks_in = primary.psql("select pg_walfile_name(pg_current_wal_insert_lsn() + 1)");
    primary.stop();
    let out = run(
        &cfg,
        &[
            "wal-push".into(),
            primary
                .data
                .join("pg_wal")
                .join(&forks_in)
                .display()
                .to_string(),
        ],
        base.path(),
    );
    ok(&out);
    assert_eq!(standby.psql("select pg_promote()"), "t");
    standby.psql("insert into marks (note) values ('after failover')");
    let out = run(
        &cfg,
        &[
            vec![
                "restore-point".into(),
                "after_failover".into(),
                "--wal-wait-secs".into(),
                "60".into(),
            ],
            pg_args(&standby),
        ]
        .concat(),
        base.path(),
    );
    assert!(ok(&out).starts_with("after_failover "), "{}", stderr(&out));
    standby.psql("insert into marks (note) values ('after the point')");
    let last = standby.switch_wal();
    standby.wait_archived(&last);
    standby.stop();
    assert!(
        base.path()
            .join("repo/wal")
            .join(&forks_in[..16])
            .join(format!("{forks_in}.partial"))
            .exists(),
        "the promoted standby archived {forks_in}.partial"
    );
    let listed = ok(&run(&cfg, &["backup-list".into()], base.path()));
    assert!(listed.contains("through timeline 2"), "{listed}");
    let newest = &list_json(&cfg)["newest_recoverable"];
    assert_eq!(newest["timeline"], 2, "{newest}");
    assert_eq!(
        newest["through_timelines"],
        serde_json::json!([2]),
        "{newest}"
    );
    assert!(
        newest["last_segment"]
            .as_str()
            .unwrap()
            .starts_with("00000002"),
        "{newest}"
    );

    // A standby restored from the backup follows the failover with PostgreSQL's 'latest', which
    // goes on to follow later ones too.
    let out = restore(
        &cfg,
        &base.path().join("standby-copy"),
        &["--standby", "--dry-run"],
    );
    let plan = ok(&out);
    assert!(
        stderr(&out).contains("goes on along timeline 2")
            && stderr(&out).contains("'latest', which follows later failovers too"),
        "{}",
        stderr(&out)
    );
    assert!(
        plan.contains("standby.signal") && plan.contains("recovery_target_timeline = 'latest'"),
        "{plan}"
    );

    // Told to stay on the backup's timeline, where the point is not: refused before anything is
    // downloaded (PostgreSQL would replay all of timeline 1 and never find it).
    let out = restore(
        &cfg,
        &base.path().join("wrong-timeline"),
        &[
            "--target-name",
            "after_failover",
            "--target-timeline",
            "current",
        ],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("made on timeline 2") && err.contains("--target-timeline 2"),
        "{err}"
    );
    assert!(!base.path().join("wrong-timeline/PG_VERSION").exists());

    // The backup (timeline 1) restored to the point on timeline 2: walship follows the failover
    // without being told, since timeline 1's archived WAL ends where timeline 2 forked.
    let at_point = base.path().join("at-point");
    let out = restore(
        &cfg,
        &at_point,
        &[
            "--target-name",
            "after_failover",
            "--target-action",
            "promote",
            "--archive-mode",
            "off",
        ],
    );
    ok(&out);
    assert!(
        stderr(&out).contains("goes on along timeline 2"),
        "{}",
        stderr(&out)
    );
    let auto = std::fs::read_to_string(at_point.join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains("recovery_target_timeline = '2'"), "{auto}");
    let c = start_restored(base.path(), &at_point, "at-point");
    assert_eq!(marks(&c), "before backup,after backup,after failover");
    assert_eq!(accounts(&c), want);
    c.stop();

    // A standby that has replayed past the failover but made no restartpoint on timeline 2 (it
    // has replayed no checkpoint record there: it is paused at the point, which the promoted
    // server wrote before its first checkpoint ended). A backup started there would begin on
    // timeline 1 and end on timeline 2: refused at once, before anything is uploaded.
    let paused = base.path().join("paused");
    ok(&restore(
        &cfg,
        &paused,
        &[
            "--standby",
            "--target-name",
            "after_failover",
            "--target-action",
            "pause",
        ],
    ));
    let c = Cluster::at(base.path(), paused, "paused");
    c.start();
    common::wait_until(
        "the standby to pause at the point on timeline 2",
        Duration::from_secs(120),
        || {
            c.try_psql("select pg_get_wal_replay_pause_state()")
                .as_deref()
                == Some("paused")
        },
    );
    let out = backup_push(&cfg, &c, &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("went from timeline 1 to 2") && err.contains("CHECKPOINT"),
        "{err}"
    );
    let listed = list_json(&cfg);
    assert_eq!(listed["backups"].as_array().unwrap().len(), 1, "{listed}");
    assert!(
        listed["unfinished"].as_array().unwrap().is_empty(),
        "{listed}"
    );
    c.stop();

    // The backup holds the standby's standby.signal; restore replaces it with recovery.signal,
    // so recovery ends and the copy promotes instead of waiting for a primary.
    let restored = base.path().join("restored");
    ok(&restore(
        &cfg,
        &restored,
        &["--backup", &id, "--archive-mode", "off"],
    ));
    assert!(restored.join("recovery.signal").exists());
    assert!(!restored.join("standby.signal").exists());
    let c = start_restored(base.path(), &restored, "restored");
    assert_eq!(
        marks(&c),
        "before backup,after backup,after failover,after the point"
    );
    assert_eq!(accounts(&c), want);
    c.stop();

    // A standby restored from the backup replays the archive through the failover and stays in
    // recovery, then goes on to replay what the new primary archives later.
    let copy = base.path().join("standby-restored");
    ok(&restore(&cfg, &copy, &["--standby"]));
    assert!(copy.join("standby.signal").exists() && !copy.join("recovery.signal").exists());
    let c = Cluster::at(base.path(), copy, "standby-restored");
    c.start();
    let replayed = |want: &str| {
        c.try_psql("select string_agg(note, ',' order by id) from marks")
            .is_some_and(|m| m == want)
    };
    let all = "before backup,after backup,after failover,after the point";
    common::wait_until(
        "the restored standby to replay timeline 2",
        Duration::from_secs(120),
        || replayed(all),
    );
    assert_eq!(c.psql("select pg_is_in_recovery()"), "t");
    standby.start();
    standby.psql("insert into marks (note) values ('while a standby follows')");
    let last = standby.switch_wal();
    standby.wait_archived(&last);
    standby.stop();
    common::wait_until(
        "the restored standby to replay newly archived WAL",
        Duration::from_secs(120),
        || replayed(&format!("{all},while a standby follows")),
    );
    assert_eq!(c.psql("select pg_is_in_recovery()"), "t");
    c.stop();

    // Timeline 2's history file damaged in the repository: the listing still shows the backups
    // and says why it stops at timeline 1; a restore that would have to choose the timeline
    // refuses, and names the flag that lets the user choose it.
    let history = base.path().join("repo/wal/history/00000002.history");
    let mut stored = std::fs::read(&history).unwrap();
    let last = stored.len() - 1;
    stored[last] ^= 0x01;
    std::fs::write(&history, stored).unwrap();
    let out = run(&cfg, &["backup-list".into()], base.path());
    let listed = ok(&out);
    assert!(listed.contains(&id), "{listed}");
    assert!(!listed.contains("through timeline"), "{listed}");
    assert!(
        stderr(&out).contains("timeline history 00000002.history cannot be read"),
        "{}",
        stderr(&out)
    );
    assert_eq!(list_json(&cfg)["newest_recoverable"]["timeline"], 1);
    let out = restore(&cfg, &base.path().join("bad-history"), &["--dry-run"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("00000002.history in the repository cannot be read")
            && err.contains("--target-timeline"),
        "{err}"
    );
    ok(&restore(
        &cfg,
        &base.path().join("bad-history"),
        &["--dry-run", "--target-timeline", "current"],
    ));
}

#[test]
fn backups_with_the_store_down_or_the_wrong_key_fail_clearly() {
    let mut server = S3Server::start();
    let base = common::shared_tempdir("backup-s3-faults");
    let keys = common::keygen(base.path());
    let cfg = server.config(base.path(), "faults", &keys);
    let primary = Cluster::init_without_checksums(base.path(), "primary");
    primary.append_conf(&archiving_conf(&cfg));
    primary.start();
    primary.pgbench(&["-i", "-s", "1", "-q"]);
    let id = ok(&backup_push(&cfg, &primary, &[]));
    // Without data checksums there is nothing to check pages against, and the listing says so.
    let listed = list_json(&cfg);
    assert!(listed["backups"][0]["page_checks"].is_null(), "{listed}");
    let text = ok(&run(&cfg, &["backup-list".into()], base.path()));
    assert!(text.contains("not checked"), "{text}");

    // `check --archiving`: the server is the repository's cluster, archives with walship, and a
    // segment it switches to reaches the bucket.
    let check = |cfg: &Path, extra: &[&str]| {
        let mut a = vec!["check".to_string(), "--archiving".into()];
        a.extend(extra.iter().map(|s| s.to_string()));
        a.extend(pg_args(&primary));
        run(cfg, &a, base.path())
    };
    let text = ok(&check(&cfg, &[]));
    let lines: Vec<&str> = text.lines().collect();
    let line = |what: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(what))
            .copied()
            .unwrap_or_default()
    };
    assert!(line("cluster").contains(" ok "), "{text}");
    assert!(line("archiving").contains("wal-push"), "{text}");
    assert!(
        line("archive test").contains(" ok ") && line("archive test").contains("reached"),
        "{text}"
    );
    // The same server checked against another prefix, where its archive_command does not push:
    // the test segment never arrives, and the check fails saying where to look.
    let elsewhere = server.config(&base.path().join("elsewhere"), "elsewhere", &keys);
    let out = check(&elsewhere, &["--wal-wait-secs", "3"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(6), "{text}{}", stderr(&out));
    let failed = text
        .lines()
        .find(|l| l.starts_with("archive test"))
        .unwrap_or_default();
    assert!(
        failed.contains("FAIL") && failed.contains("did not reach") && failed.contains("elsewhere"),
        "{text}"
    );

    // PostgreSQL refuses the connection, or nothing listens: one line with what the server or
    // the socket said (not tokio-postgres's bare "db error"), exit 3.
    let connect = |host: &str, port: u16, user: &str| {
        let a = [
            "backup-push",
            "--pg-host",
            host,
            "--pg-port",
            &port.to_string(),
            "--pg-user",
            user,
        ]
        .map(String::from);
        let out = run(&cfg, &a, base.path());
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(3), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        err
    };
    let sock = primary.sock.display().to_string();
    let err = connect(&sock, primary.port, "nobody");
    assert!(
        err.contains("cannot connect to PostgreSQL")
            && err.contains("FATAL: role \"nobody\" does not exist (28000)"),
        "{err}"
    );
    let err = connect("127.0.0.1", common::free_port(), "postgres");
    assert!(err.contains("Connection refused"), "{err}");

    // A file in the data directory that the user walship runs as cannot read: the error names
    // that file (not the backup part it was going into) and what to do, exit 7.
    let root_only = primary.data.join("root-only.conf");
    std::fs::write(&root_only, b"secret").unwrap();
    std::fs::set_permissions(&root_only, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut a: Vec<String> = vec![
        "--config".into(),
        cfg.display().to_string(),
        "backup-push".into(),
    ];
    a.extend(pg_args(&primary));
    let out = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--", common::WALSHIP])
        .args(&a)
        .current_dir(base.path())
        .env_remove("WALSHIP_LOG")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(
        err.contains(&format!(
            "cannot read {}: Permission denied",
            root_only.display()
        )) && err.contains("give that user access")
            && !err.contains("part-"),
        "{err}"
    );
    std::fs::remove_file(&root_only).unwrap();

    // The store goes away: one clear line, exit 3, and no new backup once it is back.
    server.kill();
    let out = backup_push(&cfg, &primary, &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("cannot reach the S3 endpoint"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    server.up();
    let listed = list_json(&cfg);
    assert_eq!(listed["backups"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed["backups"][0]["id"], id.as_str());

    // Another key: exit 4 and a message that names the identity; nothing PostgreSQL could start.
    let other_dir = base.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other = common::keygen(&other_dir);
    let wrong = server.config(&other_dir, "faults", &other);
    let dest = base.path().join("wrong-key");
    let out = backup_fetch(&wrong, &id, &dest);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("identity"), "{err}");
    assert!(!dest.join("global/pg_control").exists());
}

#[test]
fn old_targets_corrupt_parts_killed_backups_and_non_empty_targets_fail_clearly() {
    let base = common::shared_tempdir("backup-faults");
    let keys = common::keygen(base.path());
    let repo = base.path().join("repo");
    let cfg = common::dir_config(base.path(), &repo, &keys);
    let primary = Cluster::init(base.path(), "primary");
    primary.append_conf(&archiving_conf(&cfg));
    primary.start();
    primary.pgbench(&["-i", "-s", "2", "-q"]);

    // Killed mid-upload: small parts, one upload at a time, killed once the first part is there.
    let mut child = common::walship_cmd(
        &cfg,
        &[
            &["backup-push"][..],
            &pg_args(&primary)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            &["--part-size-mb", "1", "--uploads", "1", "--threads", "1"],
        ]
        .concat(),
        base.path(),
    )
    .spawn()
    .unwrap();
    common::wait_until("a first part", Duration::from_secs(60), || {
        walkdir_has_part(&repo.join("backups"))
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let listed = list_json(&cfg);
    assert_eq!(listed["backups"].as_array().unwrap().len(), 0, "{listed}");
    // backup-list says what it left behind, which takes space but is never restored from.
    let unfinished = listed["unfinished"].as_array().unwrap().clone();
    assert_eq!(unfinished.len(), 1, "{listed}");
    assert!(unfinished[0]["objects"].as_u64().unwrap() >= 1, "{listed}");
    let text = ok(&run(&cfg, &["backup-list".into()], base.path()));
    assert!(
        text.contains("1 unfinished backup(s)")
            && text.contains(unfinished[0]["id"].as_str().unwrap()),
        "{text}"
    );

    // Archiving paused (an empty archive_command): refused before anything is uploaded, rather
    // than failing at the end waiting for WAL that never comes.
    let backup_dirs = || std::fs::read_dir(repo.join("backups")).unwrap().count();
    let before = backup_dirs();
    primary.psql("ALTER SYSTEM SET archive_command = ''");
    primary.psql("SELECT pg_reload_conf()");
    let reloaded = |empty: bool| {
        common::wait_until(
            "the reloaded archive_command",
            Duration::from_secs(30),
            || primary.psql("SHOW archive_command").trim().is_empty() == empty,
        )
    };
    reloaded(true);
    let out = backup_push(&cfg, &primary, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("archive_command is empty"),
        "{}",
        stderr(&out)
    );
    assert_eq!(backup_dirs(), before, "nothing uploaded");
    primary.psql("ALTER SYSTEM RESET archive_command");
    primary.psql("SELECT pg_reload_conf()");
    reloaded(false);

    // The next backup works.
    let id = ok(&backup_push(&cfg, &primary, &[]));
    let listed = list_json(&cfg);
    assert_eq!(listed["backups"][0]["id"], id.as_str(), "{listed}");
    assert_eq!(listed["unfinished"], serde_json::Value::Array(unfinished));
    assert_eq!(listed["backups"][0]["page_checks"]["bad"], 0, "{listed}");

    // Pages the disk corrupted: the backup is taken (it is as good as the server), and says
    // which blocks of which file are bad, the same ones PostgreSQL's pg_checksums names. One has
    // a flipped bit; the other had its LSN hit, which puts it far past the backup's start, where
    // only the stop point shows it cannot be a page PostgreSQL was writing.
    let accounts_file = primary.psql("select pg_relation_filepath('pgbench_accounts')");
    primary.stop();
    let path = primary.data.join(&accounts_file);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[5 * 8192 + 4000] ^= 0x01;
    bytes[9 * 8192..9 * 8192 + 4].copy_from_slice(&0xA5B7_2E0Fu32.to_ne_bytes());
    std::fs::write(&path, bytes).unwrap();
    let pg_checksums = common::as_postgres("pg_checksums")
        .args(["--check", "-D"])
        .arg(&primary.data)
        .output()
        .unwrap();
    let theirs = String::from_utf8_lossy(&pg_checksums.stderr).into_owned();
    for block in [5, 9] {
        assert!(
            theirs.contains(&format!("\"{}\", block {block}", path.display())),
            "{theirs}"
        );
    }
    primary.start();
    let out = backup_push(&cfg, &primary, &[]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let warned: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("failed their checksum"))
        .collect();
    assert_eq!(warned.len(), 1, "{err}");
    assert!(
        warned[0].contains(&format!(": {accounts_file} blocks 5, 9. "))
            && warned[0].contains(" 2 of "),
        "{err}"
    );
    let listed = list_json(&cfg);
    let newest = listed["backups"].as_array().unwrap().last().unwrap();
    assert_eq!(newest["page_checks"]["bad"], 2, "{listed}");
    let text = ok(&run(&cfg, &["backup-list".into()], base.path()));
    assert!(text.contains("2 BAD"), "{text}");
    // More WAL after the backup, for the gap below.
    let mut after = Vec::new();
    for _ in 0..3 {
        primary.psql("insert into pgbench_history (tid, bid, aid, delta) values (1, 1, 1, 1)");
        after.push(primary.switch_wal());
    }
    primary.wait_archived(&after[2]);
    primary.stop();

    // A segment missing from the middle of the archive (deleted by hand, say): a restore to the
    // end would stop at the gap and promote without everything after it. Refused, exit 4.
    let missing = repo.join("wal").join(&after[0][..16]).join(&after[0]);
    let aside = base.path().join("aside");
    std::fs::rename(&missing, &aside).unwrap();
    let out = restore(&cfg, &base.path().join("gap"), &["--dry-run"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("has a gap") && err.contains(&after[1]) && err.contains("--accept-gap"),
        "{err}"
    );
    // Accepting the loss restores to the gap, with a warning.
    let out = restore(
        &cfg,
        &base.path().join("gap"),
        &["--dry-run", "--accept-gap"],
    );
    assert!(ok(&out).starts_with("would restore backup "));
    assert!(stderr(&out).contains("has a gap"), "{}", stderr(&out));
    std::fs::rename(&aside, &missing).unwrap();
    ok(&restore(&cfg, &base.path().join("gap"), &["--dry-run"]));

    // A target older than every backup: a clear error, nothing written.
    let old = base.path().join("old");
    let out = restore(&cfg, &old, &["--target-time", "2001-01-01 00:00:00+00"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no backup can reach"),
        "{}",
        stderr(&out)
    );
    assert!(!old.exists());
    // An xid assigned before every backup ended: the same.
    let out = restore(&cfg, &old, &["--target-xid", "3"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no backup can reach xid 3"),
        "{}",
        stderr(&out)
    );
    assert!(!old.exists());
    // A backup named with --backup that ends after the target: refused before anything is fetched.
    let out = restore(
        &cfg,
        &old,
        &["--backup", &id, "--target-time", "2001-01-01 00:00:00+00"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("after the target: choose an earlier backup"),
        "{}",
        stderr(&out)
    );
    assert!(!old.exists());
    // A target later than the newest archived WAL: a clear error before anything is fetched.
    let late = base.path().join("late");
    let out = restore(&cfg, &late, &["--target-time", "2099-01-01 00:00:00+00"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is past the end of the archive"),
        "{}",
        stderr(&out)
    );
    assert!(!late.exists());
    let out = restore(&cfg, &old, &["--target-time", "2001-01-01 00:00:00"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a time without a zone is a usage error"
    );

    // A non-empty target directory is refused.
    let busy = base.path().join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("keep-me"), b"x").unwrap();
    let out = backup_fetch(&cfg, &id, &busy);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is not empty"), "{}", stderr(&out));
    assert!(busy.join("keep-me").exists());
    let out = restore(&cfg, &busy, &["--dry-run"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("is not empty"), "{}", stderr(&out));

    // A file system too small for the backup: refused before any data is written, rather than
    // on a full disk part-way through.
    let small = SmallFs::mount(&base.path().join("small"), 16);
    let out = backup_fetch(&cfg, &id, &small.dir.join("data"));
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not enough space to restore into")
            && stderr(&out).contains("free some space or restore elsewhere")
            && !stderr(&out).contains("the file system is full"),
        "one piece of advice: {}",
        stderr(&out)
    );
    assert_eq!(
        small.files(),
        vec!["data/walship-restore-incomplete".to_string()],
        "nothing but the marker written"
    );
    // An old copy fills a file system the backup fits on once the copy is gone: --force deletes
    // it first, and a dry run counts what --force would delete as free.
    let tight = SmallFs::mount(&base.path().join("tight"), 80);
    let again = tight.dir.join("data");
    std::fs::create_dir(&again).unwrap();
    std::fs::write(again.join("old-copy"), vec![1u8; 40 << 20]).unwrap();
    let out = restore(&cfg, &again, &["--dry-run"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let out = restore(&cfg, &again, &["--dry-run", "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The newest backup is the one with the corrupt page: the plan says so.
    let plan = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        plan.contains(&format!(
            "pages failed their checksum when it was taken: {accounts_file} (2 blocks)"
        )),
        "{plan}"
    );
    assert!(again.join("old-copy").exists(), "a dry run deletes nothing");
    let out = restore(&cfg, &again, &["--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!again.join("old-copy").exists() && again.join("global/pg_control").exists());
    drop(tight);

    // A key only root can read, and the repository reached through a directory only root can
    // enter: the restore itself works, and says that PostgreSQL's restore_command, which runs as
    // postgres, could read neither.
    let root_key = base.path().join("root-only-identity.txt");
    std::fs::copy(&keys.identity, &root_key).unwrap();
    std::fs::set_permissions(&root_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let root_dir = base.path().join("root-only");
    std::fs::create_dir(&root_dir).unwrap();
    std::fs::set_permissions(&root_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink(&repo, root_dir.join("repo")).unwrap();
    let root_repo = format!("file://{}", root_dir.join("repo").display());
    let out = restore(
        &cfg,
        &base.path().join("root-key"),
        &[
            "--identity-file",
            root_key.to_str().unwrap(),
            "--repo",
            &root_repo,
        ],
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let cannot_read: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("who cannot read"))
        .collect();
    assert_eq!(cannot_read.len(), 2, "{err}");
    // The newest backup holds the corrupt page: the restore says so.
    assert!(
        err.contains("holds 2 page(s) in 1 file(s) that failed their checksum"),
        "{err}"
    );
    assert!(cannot_read[0].contains("root-only-identity.txt"), "{err}");
    assert!(cannot_read[1].contains("root-only/repo"), "{err}");

    // A corrupt part: the restore fails before anything could start PostgreSQL on it.
    let part = repo.join(format!("backups/{id}/part-000000"));
    let mut bytes = std::fs::read(&part).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&part, bytes).unwrap();
    let bad = base.path().join("bad");
    let out = backup_fetch(&cfg, &id, &bad);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("is corrupt") && err.contains("`walship backup-list` shows the others"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(bad.join("walship-restore-incomplete").exists());
    assert!(
        !bad.join("global/pg_control").exists(),
        "PostgreSQL cannot start on it"
    );
    // Trying again says what is there and how to start over.
    let out = backup_fetch(&cfg, &id, &bad);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("did not finish") && stderr(&out).contains("--force"),
        "{}",
        stderr(&out)
    );
    // A part that is gone altogether: damage too (exit 4), not "no such backup" (exit 1).
    std::fs::remove_file(&part).unwrap();
    let gone = base.path().join("gone");
    let out = backup_fetch(&cfg, &id, &gone);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("is missing"), "{}", stderr(&out));
    // A repository URL that names no repository (a wrong prefix): a setup error (exit 6), not
    // "the repository has no backups".
    let empty = base.path().join("empty-repo");
    std::fs::create_dir_all(base.path().join("wrong-repo-cfg")).unwrap();
    let wrong = common::dir_config(&base.path().join("wrong-repo-cfg"), &empty, &keys);
    let out = restore(&wrong, &base.path().join("nowhere"), &["--dry-run"]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not a walship repository"),
        "{}",
        stderr(&out)
    );
}

fn is_non_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_some()
}

fn walkdir_has_part(dir: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return false;
    };
    rd.flatten().any(|e| {
        let p = e.path();
        if p.is_dir() {
            walkdir_has_part(&p)
        } else {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("part-"))
        }
    })
}
