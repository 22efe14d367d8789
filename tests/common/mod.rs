//! Fixtures for integration tests: a real S3 server (minio-test/s3-server), throwaway PostgreSQL
//! clusters run as the unprivileged `postgres` user, and helpers to run the walship binary.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const WALSHIP: &str = env!("CARGO_BIN_EXE_walship");

/// A directory under the system temp dir that the `postgres` user can use too.
pub fn shared_tempdir(tag: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix(&format!("walship-{tag}-"))
        .tempdir()
        .expect("tempdir");
    chown_postgres(d.path());
    d
}

pub fn chown_postgres(p: &Path) {
    run_ok(
        Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(p),
    );
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------- S3 server

/// A real S3 server on loopback, started by minio-test/s3-server, stopped (killed) on drop.
pub struct S3Server {
    pub dir: tempfile::TempDir,
    pub env: BTreeMap<String, String>,
}

fn s3_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("minio-test/s3-server")
}

impl S3Server {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("walship-s3-")
            .tempdir()
            .expect("tempdir");
        let mut s = Self {
            dir,
            env: BTreeMap::new(),
        };
        s.up();
        s
    }

    /// Start (again, after `kill`): same ports and data.
    pub fn up(&mut self) {
        let out = Command::new(s3_script())
            .arg("start")
            .arg(self.dir.path())
            .output()
            .expect("run minio-test/s3-server");
        assert!(
            out.status.success(),
            "the S3 test server did not start (integration tests need it; see minio-test/README.md): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.env = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                l.trim()
                    .strip_prefix("export ")
                    .unwrap_or(l.trim())
                    .split_once('=')
            })
            .map(|(k, v)| {
                (
                    k.to_string(),
                    v.trim_matches(|c| c == '"' || c == '\'').to_string(),
                )
            })
            .collect();
        assert!(
            self.env.contains_key("WALSHIP_S3_ENDPOINT"),
            "s3-server printed no endpoint: {:?}",
            self.env
        );
    }

    /// Kill the server at once: the network goes away.
    pub fn kill(&self) {
        let _ = Command::new(s3_script())
            .arg("kill")
            .arg(self.dir.path())
            .output();
    }

    /// SIGSTOP the server: connections are accepted by the kernel but never answered.
    pub fn pause(&self) {
        run_ok(Command::new(s3_script()).arg("pause").arg(self.dir.path()));
    }

    pub fn resume(&self) {
        run_ok(Command::new(s3_script()).arg("resume").arg(self.dir.path()));
    }

    pub fn bucket(&self) -> &str {
        &self.env["WALSHIP_S3_BUCKET"]
    }

    pub fn endpoint(&self) -> &str {
        &self.env["WALSHIP_S3_ENDPOINT"]
    }

    /// Write a walship config file for `s3://bucket/prefix` with the server's keys.
    pub fn config(&self, dir: &Path, prefix: &str, keys: &Keys) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let secret = dir.join("s3-secret");
        std::fs::write(&secret, &self.env["AWS_SECRET_ACCESS_KEY"]).unwrap();
        let path = dir.join("walship.toml");
        std::fs::write(
            &path,
            format!(
                "repo = \"s3://{}/{prefix}\"\nrecipients = [\"{}\"]\nidentity_file = \"{}\"\n\
                 [s3]\nendpoint = \"{}\"\nregion = \"us-east-1\"\npath_style = true\naccess_key_id = \"{}\"\n\
                 secret_access_key_file = \"{}\"\nmax_attempts = 2\nconnect_timeout_secs = 2\n\
                 [wal]\nfetch_attempts = 2\n",
                self.bucket(),
                keys.recipient,
                keys.identity.display(),
                self.endpoint(),
                self.env["AWS_ACCESS_KEY_ID"],
                secret.display()
            ),
        )
        .unwrap();
        chown_postgres(dir);
        path
    }

    /// A store talking to this server directly, for tests that tamper with the bucket.
    pub async fn store(&self, prefix: &str) -> walship::storage::s3::S3Store {
        walship::storage::s3::S3Store::connect(&self.settings(prefix))
            .await
            .expect("connect to test S3 server")
    }

    /// The settings of `store`, for tests that change some of them.
    pub fn settings(&self, prefix: &str) -> walship::storage::s3::S3Settings {
        walship::storage::s3::S3Settings {
            bucket: self.bucket().to_string(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            region: "us-east-1".into(),
            endpoint: Some(self.endpoint().to_string()),
            path_style: true,
            ca_bundle: None,
            static_credentials: Some((
                self.env["AWS_ACCESS_KEY_ID"].clone(),
                self.env["AWS_SECRET_ACCESS_KEY"].clone(),
            )),
            max_attempts: 2,
            connect_timeout: Duration::from_secs(2),
            operation_timeout: Duration::from_secs(30),
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
        let _ = Command::new(s3_script())
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}

// ---------------------------------------------------------------- a small file system

/// A tmpfs of a fixed size, owned by `postgres`, for disk-full tests: a real file system that
/// really runs out of space. Mounting needs root (CAP_SYS_ADMIN), as the tests already do;
/// unmounted on drop.
pub struct SmallFs {
    pub dir: PathBuf,
}

impl SmallFs {
    pub fn mount(dir: &Path, size_mib: u64) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size_mib}m,mode=0755"))
            .arg("walship-test")
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "cannot mount a {size_mib} MiB tmpfs on {} for a disk-full test (needs root with \
             CAP_SYS_ADMIN): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        chown_postgres(dir);
        SmallFs {
            dir: dir.to_path_buf(),
        }
    }

    pub fn free_bytes(&self) -> u64 {
        let s = rustix::fs::statvfs(&self.dir).unwrap();
        s.f_bavail * s.f_frsize
    }

    /// Fill the file system with root's `filler` file until `leave` bytes are free.
    pub fn fill_leaving(&self, leave: u64) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.dir.join("filler")).unwrap();
        let chunk = vec![0u8; 64 << 10];
        while self.free_bytes() > leave {
            let n = (self.free_bytes() - leave).min(chunk.len() as u64) as usize;
            if f.write_all(&chunk[..n]).is_err() {
                break;
            }
            f.flush().unwrap();
        }
    }

    pub fn free_all(&self) {
        std::fs::remove_file(self.dir.join("filler")).unwrap();
    }

    /// Every file under the mount point, relative to it (the filler left out).
    pub fn files(&self) -> Vec<String> {
        fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, root, out);
                } else {
                    out.push(p.strip_prefix(root).unwrap().display().to_string());
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.dir, &self.dir, &mut out);
        out.retain(|f| f != "filler");
        out.sort();
        out
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
    }
}

// ---------------------------------------------------------------- keys

pub struct Keys {
    pub identity: PathBuf,
    pub recipient: String,
}

pub fn keygen(dir: &Path) -> Keys {
    let identity = dir.join("identity.txt");
    let out = run_ok(
        Command::new(WALSHIP)
            .arg("keygen")
            .arg("--output")
            .arg(&identity),
    );
    chown_postgres(&identity);
    Keys {
        identity,
        recipient: String::from_utf8(out.stdout).unwrap().trim().to_string(),
    }
}

/// The walship command with a config file, run in `cwd`, logging as a user would see it.
pub fn walship_cmd(config: &Path, args: &[&str], cwd: &Path) -> Command {
    let mut c = Command::new(WALSHIP);
    c.arg("--config")
        .arg(config)
        .args(args)
        .current_dir(cwd)
        .env_remove("WALSHIP_REPO")
        .env_remove("WALSHIP_LOG");
    c
}

/// Run walship with a config file; returns the output, whatever the exit code.
pub fn walship(config: &Path, args: &[&str], cwd: &Path) -> Output {
    walship_cmd(config, args, cwd)
        .output()
        .expect("run walship")
}

/// One answer of [`serve_http`]: status, header lines (each ending in `\r\n`), body.
pub type HttpAnswer = (u16, &'static str, &'static str);

/// A loopback HTTP/1.1 server answering each request with `answer(method, path)` and closing
/// the connection: a stand-in for a service walship only reads answers from (the instance
/// metadata service). Serves until the test process ends; returns its base URL.
pub fn serve_http(answer: fn(&str, &str) -> HttpAnswer) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut reader = BufReader::new(&conn);
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            // The rest of the head; the requests this answers have no body.
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let mut words = request.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let (status, headers, body) = answer(method, path);
            let _ = write!(
                &conn,
                "HTTP/1.1 {status} X\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

/// A walship config file for a `file://` repository at `repo`.
pub fn dir_config(dir: &Path, repo: &Path, keys: &Keys) -> PathBuf {
    std::fs::create_dir_all(repo).unwrap();
    let path = dir.join("walship-dir.toml");
    std::fs::write(
        &path,
        format!(
            "repo = \"file://{}\"\nrecipients = [\"{}\"]\nidentity_file = \"{}\"\n",
            repo.display(),
            keys.recipient,
            keys.identity.display()
        ),
    )
    .unwrap();
    chown_postgres(dir);
    path
}

// ---------------------------------------------------------------- PostgreSQL

/// A PostgreSQL program: from `PG_BINDIR`, else PostgreSQL 15's (what the tests are for), else
/// `pg_config`'s, else a later version's.
pub fn pg_bin(tool: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BINDIR") {
        return Path::new(&dir).join(tool);
    }
    let fifteen = PathBuf::from(format!("/usr/lib/postgresql/15/bin/{tool}"));
    if fifteen.exists() {
        return fifteen;
    }
    let out = Command::new("pg_config").arg("--bindir").output();
    if let Ok(out) = out {
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !dir.is_empty() && Path::new(&dir).join(tool).exists() {
            return Path::new(&dir).join(tool);
        }
    }
    for v in ["16", "17"] {
        let p = PathBuf::from(format!("/usr/lib/postgresql/{v}/bin/{tool}"));
        if p.exists() {
            return p;
        }
    }
    panic!("PostgreSQL's {tool} not found: install postgresql-15 or set PG_BINDIR");
}

/// Run a PostgreSQL tool as the `postgres` user.
pub fn as_postgres(tool: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(pg_bin(tool));
    c
}

static NEXT_PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

/// A loopback port nothing listens on (until something takes it).
pub fn free_port() -> u16 {
    // Ports handed out by the kernel, then released: good enough on a test machine.
    let _ = NEXT_PORT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A throwaway cluster in a temp dir, stopped on drop.
pub struct Cluster {
    pub data: PathBuf,
    pub port: u16,
    pub sock: PathBuf,
}

impl Cluster {
    /// initdb a new cluster under `base` (owned by postgres), with data checksums, as
    /// PostgreSQL 18's initdb makes them by default.
    pub fn init(base: &Path, name: &str) -> Self {
        Self::init_with(base, name, &["--data-checksums"])
    }

    /// initdb a cluster without data checksums, PostgreSQL 15's default.
    pub fn init_without_checksums(base: &Path, name: &str) -> Self {
        Self::init_with(base, name, &[])
    }

    fn init_with(base: &Path, name: &str, initdb_args: &[&str]) -> Self {
        let data = base.join(name);
        let sock = base.join(format!("{name}-sock"));
        std::fs::create_dir_all(&sock).unwrap();
        chown_postgres(&sock);
        run_ok(
            as_postgres("initdb")
                .args(["-A", "trust", "-U", "postgres", "--no-sync"])
                .args(initdb_args)
                .arg("-D")
                .arg(&data),
        );
        Self {
            data,
            port: free_port(),
            sock,
        }
    }

    /// A cluster on an existing data directory (a restored backup).
    pub fn at(base: &Path, data: PathBuf, name: &str) -> Self {
        let sock = base.join(format!("{name}-sock"));
        std::fs::create_dir_all(&sock).unwrap();
        chown_postgres(&sock);
        Self {
            data,
            port: free_port(),
            sock,
        }
    }

    pub fn append_conf(&self, text: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))
            .unwrap();
        writeln!(f, "\n{text}").unwrap();
    }

    pub fn start(&self) {
        self.append_conf(&format!(
            "port = {}\nunix_socket_directories = '{}'\nlisten_addresses = ''\nfsync = off\n",
            self.port,
            self.sock.display()
        ));
        let log = self.data.parent().unwrap().join(format!(
            "{}.log",
            self.data.file_name().unwrap().to_string_lossy()
        ));
        run_ok(
            as_postgres("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "120", "start"]),
        );
    }

    /// Start without waiting (recovery may take a while or stop on purpose).
    pub fn start_nowait(&self) {
        self.append_conf(&format!(
            "port = {}\nunix_socket_directories = '{}'\nlisten_addresses = ''\nfsync = off\n",
            self.port,
            self.sock.display()
        ));
        let log = self.log_path();
        run_ok(
            as_postgres("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(&log)
                .args(["-W", "start"]),
        );
    }

    pub fn log_path(&self) -> PathBuf {
        self.data.parent().unwrap().join(format!(
            "{}.log",
            self.data.file_name().unwrap().to_string_lossy()
        ))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn stop(&self) {
        let _ = as_postgres("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "stop"])
            .output();
    }

    pub fn psql(&self, sql: &str) -> String {
        let out = run_ok(
            as_postgres("psql")
                .args([
                    "-X",
                    "-q",
                    "-t",
                    "-A",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-U",
                    "postgres",
                    "-h",
                ])
                .arg(&self.sock)
                .args(["-p", &self.port.to_string(), "-d", "postgres", "-c", sql]),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn try_psql(&self, sql: &str) -> Option<String> {
        let out = as_postgres("psql")
            .args(["-X", "-q", "-t", "-A", "-U", "postgres", "-h"])
            .arg(&self.sock)
            .args(["-p", &self.port.to_string(), "-d", "postgres", "-c", sql])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    pub fn pgbench(&self, args: &[&str]) {
        run_ok(
            as_postgres("pgbench")
                .args(["-U", "postgres", "-h"])
                .arg(&self.sock)
                .args(["-p", &self.port.to_string()])
                .args(args)
                .arg("postgres"),
        );
    }

    pub fn basebackup(&self, dest: &Path) {
        run_ok(
            as_postgres("pg_basebackup")
                .args(["-U", "postgres", "-h"])
                .arg(&self.sock)
                .args([
                    "-p",
                    &self.port.to_string(),
                    "-X",
                    "none",
                    "-c",
                    "fast",
                    "--no-sync",
                    "-D",
                ])
                .arg(dest),
        );
    }

    /// The name of the current WAL segment (after a switch, the last one to be archived is the one before).
    pub fn switch_wal(&self) -> String {
        self.psql("select pg_walfile_name(pg_switch_wal())")
    }

    pub fn wait_archived(&self, segment: &str) {
        wait_until(
            &format!("{segment} to be archived"),
            Duration::from_secs(120),
            || {
                let last =
                    self.psql("select coalesce(last_archived_wal, '') from pg_stat_archiver");
                !last.is_empty() && last.as_str() >= segment
            },
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = as_postgres("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}
