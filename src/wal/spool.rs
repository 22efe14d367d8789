//! The prefetch spool: a directory of segments already downloaded, verified, decrypted and
//! decompressed, so that `wal-fetch` for them is a rename.
//!
//! Layout of `<state>/spool/`: complete segments under their own names (only ever created by an
//! atomic rename after verification), `.repo` (the repository they came from: a spool from another
//! repository is never served), `.boot` (the kernel boot id they were written under), `.want`
//! (the last segment recovery asked for, written by `wal-fetch`), `.lock` (held by the one running
//! prefetcher), `.<name>.inflight` (the prefetcher is downloading that segment: a `wal-fetch` for it
//! waits instead of downloading it a second time), `.<name>.walship-tmp.*` (decodes in progress,
//! ignored and cleaned). Files whose names start with `.` are never served.
//!
//! Spooled segments are not fsynced: a segment is renamed into the spool only once complete, so a
//! killed process cannot leave a torn one, and a machine crash (which could) changes the boot id,
//! after which nothing in the spool is served. PostgreSQL would take a torn segment for the end of
//! WAL and end recovery early; fsyncing 16 MiB per segment instead would bound prefetch by the
//! disk's flush speed. Where the boot id cannot be read, the spool is not used.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::fetch::FetchContext;
use super::name::{WalFileKind, WalFileName};
use crate::archive::{ArchiveError, Durability};
use crate::repo;
use crate::storage::StorageError;

pub struct Spool {
    dir: PathBuf,
}

impl Spool {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("spool"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether spooled segments may be served for `repo_id`: same repository, same boot.
    fn valid_for(&self, repo_id: &str) -> bool {
        let marker = |name: &str| fs::read_to_string(self.dir.join(name)).ok();
        let Some(boot) = boot_id() else {
            return false;
        };
        marker(".repo").as_deref() == Some(repo_id) && marker(".boot") == Some(boot)
    }

    /// Move a spooled segment to `dest`. `Ok(false)` when it is not spooled (or not usable).
    pub fn take(&self, name: &str, dest: &Path, repo_id: &str) -> io::Result<bool> {
        let src = self.dir.join(name);
        if !src.exists() || !self.valid_for(repo_id) {
            return Ok(false);
        }
        // `valid_for` vouched for the file: complete, and written during this boot (see the module
        // docs). The rename needs no directory fsync: after a crash PostgreSQL asks again.
        match fs::rename(&src, dest) {
            Ok(()) => Ok(true),
            // Spool on another filesystem (a configured state_dir): fetch directly instead.
            Err(e) if e.raw_os_error() == Some(18) => Ok(false),
            // Pruned by the prefetcher since the check above: fetch directly instead.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn in_flight_marker(&self, name: &str) -> PathBuf {
        self.dir.join(format!(".{name}.inflight"))
    }

    /// Take `name`, waiting while the prefetcher is downloading it (at most `limit`). `Ok(None)`
    /// when it is neither spooled nor in flight, the download failed, the prefetcher went away,
    /// or the limit passed: the caller downloads it itself. Otherwise how long it waited (zero:
    /// it was there at the first look).
    pub fn take_when_ready(
        &self,
        name: &str,
        dest: &Path,
        repo_id: &str,
        limit: Duration,
    ) -> io::Result<Option<Duration>> {
        if self.take(name, dest, repo_id)? {
            return Ok(Some(Duration::ZERO));
        }
        let marker = self.in_flight_marker(name);
        let since = Instant::now();
        while marker.exists() && since.elapsed() < limit && self.prefetcher_running() {
            std::thread::sleep(Duration::from_millis(2));
            if self.take(name, dest, repo_id)? {
                return Ok(Some(since.elapsed()));
            }
        }
        // The segment is renamed into the spool before its marker goes.
        Ok(self.take(name, dest, repo_id)?.then(|| since.elapsed()))
    }

    /// Remove what a killed prefetcher may have left: in-flight markers and temp files.
    fn clear_in_flight(&self) {
        for e in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let n = e.file_name();
            let n = n.to_string_lossy();
            if n.starts_with('.') && (n.ends_with(".inflight") || n.contains(".walship-tmp.")) {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    /// Tell the prefetcher where recovery is. Creates the spool for this repository if needed.
    pub fn set_want(&self, name: &str, repo_id: &str) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        if !self.valid_for(repo_id) {
            let boot = boot_id().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::Unsupported,
                    "no kernel boot id to guard the spool",
                )
            })?;
            self.clear()?;
            fs::write(self.dir.join(".repo"), repo_id)?;
            fs::write(self.dir.join(".boot"), boot)?;
        }
        let tmp = self.dir.join(".want.tmp");
        fs::write(&tmp, name)?;
        fs::rename(tmp, self.dir.join(".want"))
    }

    /// The segment recovery asked for last.
    pub fn want(&self) -> Option<WalFileName> {
        let s = fs::read_to_string(self.dir.join(".want")).ok()?;
        WalFileName::parse(s.trim())
            .ok()
            .filter(|n| n.kind() == WalFileKind::Segment)
    }

    /// The lock a running prefetcher holds, created when missing.
    fn open_lock(&self) -> io::Result<File> {
        File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(".lock"))
    }

    /// Whether a prefetcher holds the lock now.
    pub fn prefetcher_running(&self) -> bool {
        let Ok(f) = self.open_lock() else {
            return false;
        };
        match f.try_lock() {
            Ok(()) => false, // dropped at once, releasing it
            Err(_) => true,
        }
    }

    /// Remove every spooled segment and temp file (not the lock or the repository marker).
    pub fn clear(&self) -> io::Result<()> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for e in entries.flatten() {
            let n = e.file_name();
            let n = n.to_string_lossy();
            if n != ".lock" && n != ".repo" && n != ".boot" {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(())
    }

    /// Empty a spool no prefetcher works on: what a killed prefetcher left behind (one that
    /// exits empties its spool). `wal-push` calls this, since on a promoted server nothing else
    /// would look at the spool again, and up to `prefetch` segments and the downloads it had
    /// under way would stay beside pg_wal for good. The prefetcher's lock is held while
    /// emptying, so a prefetcher starting meanwhile leaves the spool to this call and the next
    /// `wal-fetch` starts another. Returns how many files and bytes it removed.
    pub fn sweep_abandoned(&self) -> (usize, u64) {
        // Markers, not leftovers: `.want` is written by every call from recovery, also in the
        // moment before the prefetcher it starts takes the lock.
        const MARKERS: [&str; 4] = [".lock", ".repo", ".boot", ".want"];
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return (0, 0);
        };
        let left: Vec<(String, u64)> = rd
            .flatten()
            .map(|e| {
                let size = e.metadata().map_or(0, |m| m.len());
                (e.file_name().to_string_lossy().into_owned(), size)
            })
            .filter(|(n, _)| !MARKERS.contains(&n.as_str()))
            .collect();
        if left.is_empty() {
            return (0, 0);
        }
        let Ok(lock) = self.open_lock() else {
            return (0, 0);
        };
        if lock.try_lock().is_err() {
            return (0, 0); // a prefetcher works here
        }
        let _ = self.clear();
        (left.len(), left.iter().map(|(_, size)| size).sum())
    }

    /// Segment names currently spooled.
    fn entries(&self) -> Vec<String> {
        fs::read_dir(&self.dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The kernel's id of this boot (Linux); changes with every restart of the machine.
fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The PostgreSQL server a prefetcher works for, known by its `postmaster.pid`.
pub struct ServerWatch {
    pid_file: PathBuf,
    pid: String,
}

fn first_line(path: &Path) -> io::Result<String> {
    Ok(fs::read_to_string(path)?
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string())
}

impl ServerWatch {
    pub fn new(pid_file: &Path) -> io::Result<Self> {
        Ok(Self {
            pid_file: pid_file.to_path_buf(),
            pid: first_line(pid_file)?,
        })
    }

    /// The server's pg_wal, where recovery's `restore_command` places segments.
    pub fn pg_wal(&self) -> PathBuf {
        super::parent_dir(&self.pid_file).join("pg_wal")
    }

    /// The server is gone once its `postmaster.pid` is removed or names another process.
    pub fn running(&self) -> bool {
        first_line(&self.pid_file).is_ok_and(|p| p == self.pid)
    }
}

/// The background prefetcher: keeps the `depth` segments after `.want` in the spool until recovery
/// has not asked for anything for `idle`, or the server stops, then empties the spool and exits.
/// Only one runs per spool.
pub async fn run_prefetcher(
    ctx: Arc<FetchContext>,
    spool: Spool,
    server: ServerWatch,
) -> io::Result<()> {
    fs::create_dir_all(spool.dir())?;
    let lock = spool.open_lock()?;
    if lock.try_lock().is_err() {
        return Ok(()); // another prefetcher is running
    }
    spool.clear_in_flight();
    // Calls served from the spool never sweep pg_wal; after a restart, this process does.
    let swept = crate::archive::sweep_stale_temps(&server.pg_wal());
    if swept > 0 {
        tracing::info!(
            "removed {swept} temp files of interrupted wal-fetch calls from {}",
            server.pg_wal().display()
        );
    }
    let seg_size = match ctx.archive.read_meta().await {
        Ok(Some(m)) => m.wal_segment_size,
        _ => super::name::DEFAULT_SEGMENT_SIZE,
    };
    let depth = ctx.settings.prefetch as u64;
    let sem = Arc::new(Semaphore::new(ctx.settings.download_concurrency));
    let mut last_want: Option<WalFileName> = None;
    let mut last_change = Instant::now();
    // Where the archive ended last time we looked, and when: don't ask again at once.
    let mut end_seen: Option<(String, Instant)> = None;
    let mut tasks: tokio::task::JoinSet<PrefetchResult> = tokio::task::JoinSet::new();
    let mut in_flight: std::collections::HashSet<String> = Default::default();
    let mut short_of_space = false;
    loop {
        let want = spool.want();
        if want != last_want {
            last_want = want.clone();
            last_change = Instant::now();
        }
        if last_change.elapsed() > ctx.settings.prefetch_idle || !server.running() {
            break;
        }
        while let Some(done) = tasks.try_join_next() {
            finished(done, &mut in_flight, &mut end_seen);
        }
        if let Some(id) = want.as_ref().and_then(|w| w.segment()) {
            let window: Vec<String> = (1..=depth)
                .map(|i| id.advance(i, seg_size).file_name().to_string())
                .collect();
            for stale in spool.entries().into_iter().filter(|e| !window.contains(e)) {
                let _ = fs::remove_file(spool.dir().join(stale));
            }
            let free = free_space(spool.dir());
            for name in &window {
                if in_flight.contains(name) || spool.dir().join(name).exists() {
                    continue;
                }
                let fits = room_for_one_more(
                    free,
                    in_flight.len() as u64,
                    seg_size,
                    ctx.settings.prefetch_min_free,
                );
                if fits == short_of_space {
                    short_of_space = !fits;
                    match fits {
                        false => tracing::warn!(
                            "less than {} MiB would stay free in {}: prefetching paused, \
                             wal-fetch downloads segments itself",
                            ctx.settings.prefetch_min_free >> 20,
                            spool.dir().display()
                        ),
                        true => tracing::info!("free space is back: prefetching again"),
                    }
                }
                if !fits {
                    break;
                }
                if let Some((end, at)) = &end_seen {
                    if name >= end && at.elapsed() < Duration::from_secs(2) {
                        break;
                    }
                }
                let permit = match sem.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => break,
                };
                in_flight.insert(name.clone());
                let marker = spool.in_flight_marker(name);
                if let Err(e) = File::create(&marker) {
                    tracing::debug!("cannot create {}: {e}", marker.display());
                }
                let (ctx, dir, name) = (ctx.clone(), spool.dir().to_path_buf(), name.clone());
                tasks.spawn(async move {
                    let _permit = permit;
                    // Gone once the task ends, whatever the outcome; after the segment's rename.
                    let _marker = RemoveOnDrop(marker);
                    let key = repo::wal_key(
                        &WalFileName::parse(&name).expect("generated names are valid"),
                    );
                    let res = ctx
                        .archive
                        .fetch_to(
                            &key,
                            &ctx.identities,
                            &dir.join(&name),
                            Durability::UntilReboot,
                        )
                        .await
                        .map(|_| ());
                    (name, res)
                });
            }
        }
        // Look again after a while, or as soon as a download ends and frees its slot.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                finished(done, &mut in_flight, &mut end_seen)
            }
        }
    }
    tasks.shutdown().await;
    spool.clear()?;
    drop(lock);
    Ok(())
}

/// Bytes an unprivileged writer may still use on the filesystem holding `dir`; `None` when the
/// system cannot say.
fn free_space(dir: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Whether one more segment can be spooled beside the `in_flight` ones and still leave `keep`
/// bytes free: the spool lives beside `pg_wal`, and PostgreSQL (the segment wal-fetch places, a
/// restartpoint, the WAL of a promoted server) must not find its disk filled by prefetching.
fn room_for_one_more(free: Option<u64>, in_flight: u64, seg_size: u64, keep: u64) -> bool {
    let need = in_flight.saturating_add(1).saturating_mul(seg_size);
    free.is_none_or(|f| f >= need.saturating_add(keep))
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

type PrefetchResult = (String, Result<(), ArchiveError>);

/// Book a finished prefetch: free its name, and remember where the archive ended.
fn finished(
    done: Result<PrefetchResult, tokio::task::JoinError>,
    in_flight: &mut std::collections::HashSet<String>,
    end_seen: &mut Option<(String, Instant)>,
) {
    let (name, res) = done.expect("prefetch task does not panic");
    in_flight.remove(&name);
    match res {
        Ok(()) => {}
        Err(ArchiveError::Storage(StorageError::NotFound(_))) => {
            *end_seen = Some((name, Instant::now()))
        }
        Err(e) => {
            tracing::warn!("prefetch of {name} failed (wal-fetch will retry it directly): {e}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_only_complete_entries_of_the_same_repository() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        let dest = dir.path().join("RECOVERYXLOG");
        spool
            .set_want("000000010000000000000001", "repo-a")
            .unwrap();
        fs::write(spool.dir().join("000000010000000000000002"), b"seg").unwrap();
        fs::write(
            spool.dir().join(".000000010000000000000003.walship-tmp.1"),
            b"half",
        )
        .unwrap();
        assert!(
            !spool
                .take("000000010000000000000002", &dest, "repo-b")
                .unwrap(),
            "other repository"
        );
        assert!(
            !spool
                .take("000000010000000000000003", &dest, "repo-a")
                .unwrap(),
            "in progress"
        );
        assert!(spool
            .take("000000010000000000000002", &dest, "repo-a")
            .unwrap());
        assert_eq!(fs::read(&dest).unwrap(), b"seg");
        assert!(
            !spool.dir().join("000000010000000000000002").exists(),
            "moved, not copied"
        );
        // Written under another boot (the machine crashed since): never served.
        fs::write(spool.dir().join(".boot"), "another-boot").unwrap();
        fs::write(spool.dir().join("000000010000000000000005"), b"seg").unwrap();
        assert!(
            !spool
                .take("000000010000000000000005", &dest, "repo-a")
                .unwrap(),
            "spooled before a reboot"
        );
        spool
            .set_want("000000010000000000000004", "repo-a")
            .unwrap();
        assert!(spool.entries().is_empty(), "a stale boot empties the spool");
        // Switching repository empties the spool.
        fs::write(spool.dir().join("000000010000000000000004"), b"seg").unwrap();
        spool
            .set_want("000000010000000000000003", "repo-b")
            .unwrap();
        assert!(spool.entries().is_empty());
    }

    #[test]
    fn a_spool_no_prefetcher_holds_is_swept_and_a_held_one_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        assert_eq!(spool.sweep_abandoned(), (0, 0), "no spool at all");
        spool
            .set_want("000000010000000000000001", "repo-a")
            .unwrap();
        assert!(spool.dir().join(".repo").exists() && spool.dir().join(".boot").exists());
        // Markers alone (a call from recovery whose prefetcher has yet to take the lock): kept.
        assert_eq!(spool.sweep_abandoned(), (0, 0));
        assert!(spool.want().is_some());
        let leave = |spool: &Spool| {
            fs::write(spool.dir().join("000000010000000000000002"), vec![1; 100]).unwrap();
            fs::write(spool.dir().join(".000000010000000000000003.inflight"), b"").unwrap();
            fs::write(
                spool.dir().join(".000000010000000000000003.walship-tmp.9"),
                vec![1; 50],
            )
            .unwrap();
        };
        leave(&spool);
        // A prefetcher holds the lock: its spool is its own.
        let held = File::create(spool.dir().join(".lock")).unwrap();
        held.try_lock().unwrap();
        assert_eq!(spool.sweep_abandoned(), (0, 0));
        assert_eq!(spool.entries().len(), 1);
        // Killed: the lock is free, and what it left goes (the .want too), the markers stay.
        drop(held);
        assert_eq!(spool.sweep_abandoned(), (3, 150));
        let mut left: Vec<String> = fs::read_dir(spool.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".boot", ".lock", ".repo"]);
        assert_eq!(spool.sweep_abandoned(), (0, 0), "nothing left to sweep");
    }

    #[test]
    fn prefetching_leaves_the_configured_space_free() {
        let seg = 16 << 20;
        let keep = 1 << 30;
        assert!(room_for_one_more(Some(keep + seg), 0, seg, keep));
        assert!(!room_for_one_more(Some(keep + seg - 1), 0, seg, keep));
        // Downloads in flight will take their share too.
        assert!(!room_for_one_more(Some(keep + 2 * seg), 2, seg, keep));
        assert!(room_for_one_more(Some(keep + 3 * seg), 2, seg, keep));
        // Unknown free space: prefetch as before rather than never.
        assert!(room_for_one_more(None, 9, seg, keep));
        // No overflow on absurd settings: nothing fits.
        assert!(!room_for_one_more(
            Some(u64::MAX - 1),
            u64::MAX,
            seg,
            u64::MAX
        ));
        let dir = tempfile::tempdir().unwrap();
        assert!(free_space(dir.path()).is_some_and(|f| f > 0));
    }

    #[test]
    fn server_watch_notices_a_stopped_or_replaced_server() {
        let dir = tempfile::tempdir().unwrap();
        let pid = dir.path().join("postmaster.pid");
        fs::write(&pid, "4242\n/data\n").unwrap();
        let watch = ServerWatch::new(&pid).unwrap();
        assert!(watch.running());
        fs::write(&pid, "4343\n/data\n").unwrap();
        assert!(!watch.running(), "another postmaster");
        fs::remove_file(&pid).unwrap();
        assert!(!watch.running(), "server stopped");
    }

    #[test]
    fn lock_tells_whether_a_prefetcher_runs() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        fs::create_dir_all(spool.dir()).unwrap();
        assert!(!spool.prefetcher_running());
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(spool.dir().join(".lock"))
            .unwrap();
        f.lock().unwrap();
        assert!(spool.prefetcher_running());
    }

    #[test]
    fn a_call_waits_for_an_in_flight_download_only_while_it_can_arrive() {
        const SEG: &str = "000000010000000000000002";
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        let dest = dir.path().join("RECOVERYXLOG");
        spool.set_want("000000010000000000000001", "r").unwrap();
        let limit = Duration::from_secs(20);
        let quick = Duration::from_secs(5);

        let since = Instant::now();
        assert_eq!(spool.take_when_ready(SEG, &dest, "r", limit).unwrap(), None);
        assert!(since.elapsed() < quick, "not in flight: no wait");

        // In flight, but no prefetcher holds the lock (it was killed): no wait.
        File::create(spool.in_flight_marker(SEG)).unwrap();
        let since = Instant::now();
        assert_eq!(spool.take_when_ready(SEG, &dest, "r", limit).unwrap(), None);
        assert!(since.elapsed() < quick);

        let lock = File::create(spool.dir().join(".lock")).unwrap();
        lock.lock().unwrap();
        // The download fails: the marker goes, no segment comes; the caller downloads it.
        let marker = spool.in_flight_marker(SEG);
        let failing = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            fs::remove_file(marker).unwrap();
        });
        assert_eq!(spool.take_when_ready(SEG, &dest, "r", limit).unwrap(), None);
        failing.join().unwrap();

        // The download succeeds: the segment is renamed in, then the marker goes.
        File::create(spool.in_flight_marker(SEG)).unwrap();
        let (dir_path, marker) = (spool.dir().to_path_buf(), spool.in_flight_marker(SEG));
        let landing = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            fs::write(dir_path.join(".tmp"), b"seg").unwrap();
            fs::rename(dir_path.join(".tmp"), dir_path.join(SEG)).unwrap();
            fs::remove_file(marker).unwrap();
        });
        let waited = spool.take_when_ready(SEG, &dest, "r", limit).unwrap();
        landing.join().unwrap();
        assert!(waited.unwrap() >= Duration::from_millis(90), "{waited:?}");
        assert_eq!(fs::read(&dest).unwrap(), b"seg");

        // Already spooled: taken at the first look.
        fs::write(spool.dir().join(SEG), b"seg2").unwrap();
        assert_eq!(
            spool.take_when_ready(SEG, &dest, "r", limit).unwrap(),
            Some(Duration::ZERO)
        );
        // A stuck download is waited for no longer than the limit.
        File::create(spool.in_flight_marker(SEG)).unwrap();
        let since = Instant::now();
        let short = Duration::from_millis(200);
        assert_eq!(spool.take_when_ready(SEG, &dest, "r", short).unwrap(), None);
        assert!(since.elapsed() >= short && since.elapsed() < quick);
    }
}
