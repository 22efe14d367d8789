//! The prefetch spool: a directory of segments already downloaded, verified, decrypted and
//! decompressed, so that `wal-fetch` for them is a rename.
//!
//! Layout of `<state>/spool/`: complete segments as `<name>.<repo tag>` (only ever created by an
//! atomic rename after verification; the tag names the repository the segment came from, so a call
//! for one repository can never take another's segment, not even one a prefetcher for the old
//! repository renames in after `restore_command` was changed mid-recovery), `.repo` (the repository
//! the spool works for now), `.boot` (the kernel boot id its segments were written under), `.want`
//! (the last segment recovery asked for, written by `wal-fetch`), `.histories` (the timeline
//! history files `wal-fetch` restored for recovery, with the server run they were for: past a fork
//! point the prefetcher takes the segments from the new timeline, as recovery will), `.lock` (held
//! by the one running
//! prefetcher), `.<name>.<repo tag>.inflight` (the prefetcher is downloading that segment: a
//! `wal-fetch` for it waits instead of downloading it a second time),
//! `.<name>.<repo tag>.walship-tmp.*` (decodes in progress, ignored and cleaned). Files whose
//! names start with `.` are never served.
//!
//! Spooled segments are not fsynced: a segment is renamed into the spool only once complete, so a
//! killed process cannot leave a torn one, and a machine crash (which could) changes the boot id,
//! after which nothing in the spool is served. PostgreSQL would take a torn segment for the end of
//! WAL and end recovery early; fsyncing 16 MiB per segment instead would bound prefetch by the
//! disk's flush speed. Where the boot id cannot be read, the spool is not used. A crash-consistent
//! snapshot of the volume started on the same host keeps the boot id, so a prefetcher empties the
//! spool of segments as it takes the lock: only segments the running prefetcher wrote are served,
//! never ones an earlier one left (torn in such a clone, or from a repository since recreated at
//! the same URL). Each segment is checked against the repository's `walship.json` before it
//! enters the spool, as `wal-fetch` checks the ones it downloads itself.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use sha2::{Digest, Sha256};

use super::fetch::{check_restored, FetchContext};
use super::history::History;
use super::name::{SegmentId, WalFileKind, WalFileName};
use super::WalError;
use crate::archive::{ArchiveError, Durability};
use crate::repo;
use crate::storage::StorageError;

/// The prefetch spool of one state directory, as seen by one repository.
pub struct Spool {
    dir: PathBuf,
    repo_id: String,
    /// Short digest of `repo_id`, the suffix of this repository's spooled segments.
    tag: String,
}

impl Spool {
    pub fn new(state_dir: &Path, repo_id: &str) -> Self {
        Self {
            dir: state_dir.join("spool"),
            repo_id: repo_id.to_string(),
            tag: hex::encode(&Sha256::digest(repo_id.as_bytes())[..6]),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The spool file of segment `name` from this repository.
    fn file_name(&self, name: &str) -> String {
        format!("{name}.{}", self.tag)
    }

    /// Whether the spool works for this repository, during this boot.
    fn valid(&self) -> bool {
        let marker = |name: &str| fs::read_to_string(self.dir.join(name)).ok();
        let Some(boot) = boot_id() else {
            return false;
        };
        marker(".repo").as_deref() == Some(self.repo_id.as_str()) && marker(".boot") == Some(boot)
    }

    /// Move a spooled segment to `dest`. `false` when it is not spooled or not usable: the caller
    /// downloads it instead.
    pub fn take(&self, name: &str, dest: &Path) -> bool {
        let src = self.dir.join(self.file_name(name));
        // The name vouches for the file's repository and completeness, `valid` for its boot (see
        // the module docs), and a running prefetcher for the rest: a prefetcher empties the spool
        // of segments as it takes the lock and again as it exits, so a file here while one runs
        // is one it wrote (and checked). Never one a killed prefetcher left, nor one in a copy of
        // the volume taken without a reboot (a snapshot clone, where it may be torn).
        if !src.exists() || !self.valid() || !self.prefetcher_running() {
            return false;
        }
        // The rename needs no directory fsync: after a crash PostgreSQL asks again.
        let moved = match fs::rename(&src, dest) {
            // A spool on another file system (a configured state_dir).
            Err(e) if e.raw_os_error() == Some(EXDEV) => copy_across(&src, dest),
            moved => moved,
        };
        match moved {
            Ok(()) => true,
            // Pruned by the prefetcher since the check above.
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            // One this user may not change, or no room for the copy: the download still works
            // (or says what is wrong).
            Err(e) => {
                tracing::warn!(
                    "cannot move {} to {} ({e}): downloading it instead",
                    src.display(),
                    dest.display()
                );
                false
            }
        }
    }

    pub(super) fn in_flight_marker(&self, name: &str) -> PathBuf {
        self.dir.join(format!(".{}.inflight", self.file_name(name)))
    }

    /// Take `name`, waiting while the prefetcher is downloading it (at most `limit`). `None`
    /// when it is neither spooled nor in flight, the download failed, the prefetcher went away,
    /// or the limit passed: the caller downloads it itself. Otherwise how long it waited (zero:
    /// it was there at the first look).
    pub fn take_when_ready(&self, name: &str, dest: &Path, limit: Duration) -> Option<Duration> {
        if self.take(name, dest) {
            return Some(Duration::ZERO);
        }
        let marker = self.in_flight_marker(name);
        let since = Instant::now();
        while marker.exists() && since.elapsed() < limit && self.prefetcher_running() {
            std::thread::sleep(Duration::from_millis(2));
            if self.take(name, dest) {
                return Some(since.elapsed());
            }
        }
        // The segment is renamed into the spool before its marker goes.
        self.take(name, dest).then(|| since.elapsed())
    }

    /// Remove what earlier prefetchers left: spooled segments (of any repository), in-flight
    /// markers and temp files. Keeps the markers, which say what the spool is for and where
    /// recovery is: `.lock`, `.repo`, `.boot`, `.histories` and `.want` (with the `.want.tmp` and
    /// `.histories.tmp` a `wal-fetch` may be writing right now).
    fn clear_left_behind(&self) {
        for e in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let n = e.file_name();
            let n = n.to_string_lossy();
            if !n.starts_with('.') || n.ends_with(".inflight") || n.contains(".walship-tmp.") {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    /// Tell the prefetcher where recovery is. Creates the spool for this repository if needed.
    pub fn set_want(&self, name: &str) -> io::Result<()> {
        self.claim()?;
        let tmp = self.dir.join(".want.tmp");
        fs::write(&tmp, name)?;
        fs::rename(tmp, self.dir.join(".want"))
    }

    /// Make the spool work for this repository during this boot, emptying it if it worked for
    /// another (or before a reboot).
    fn claim(&self) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        if !self.valid() {
            let boot = boot_id().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::Unsupported,
                    "no kernel boot id to guard the spool",
                )
            })?;
            self.clear()?;
            for marker in [
                HISTORIES_MARKER.to_string(),
                format!("{HISTORIES_MARKER}.tmp"),
            ] {
                let _ = fs::remove_file(self.dir.join(marker));
            }
            fs::write(self.dir.join(".repo"), &self.repo_id)?;
            fs::write(self.dir.join(".boot"), boot)?;
        }
        Ok(())
    }

    /// Tell the prefetcher about a timeline history file, of `timeline`, that the recovery of
    /// `server` (see `ServerWatch::identity`) just fetched. Every one fetched during that run of
    /// the server is kept: PostgreSQL fetches its target timeline's at the start (with 'latest'
    /// after those of the timelines it looks past, and later those of the older timelines
    /// between the checkpoint's and the target), and a standby following 'latest' those of
    /// timelines that appear later, some of which it rejects (a restore drill's, forked before
    /// the point it replayed to). `followed` picks the one recovery follows.
    pub fn note_history(&self, server: &str, timeline: u32, text: &str) -> io::Result<()> {
        self.claim()?;
        let mut noted = self
            .noted_histories(server)
            .unwrap_or_else(|| NotedHistories {
                server: server.to_string(),
                histories: Default::default(),
            });
        noted.histories.insert(timeline, text.to_string());
        let json = serde_json::to_vec(&noted).map_err(io::Error::other)?;
        let tmp = self.dir.join(format!("{HISTORIES_MARKER}.tmp"));
        fs::write(&tmp, json)?;
        fs::rename(tmp, self.dir.join(HISTORIES_MARKER))
    }

    /// What `note_history` kept for `server`.
    fn noted_histories(&self, server: &str) -> Option<NotedHistories> {
        let text = fs::read(self.dir.join(HISTORIES_MARKER)).ok()?;
        serde_json::from_slice::<NotedHistories>(&text)
            .ok()
            .filter(|n| n.server == server)
    }

    /// The history recovery of `server` follows, now that it reads segment `at`: of the history
    /// files it fetched, the newest whose timelines `at` lies on and whose next fork is not
    /// behind `at` (PostgreSQL rejects a timeline that forked before the point it replayed to).
    /// `None` when there is none: recovery stays on its timeline.
    pub fn followed(&self, server: &str, at: &SegmentId, seg_size: u64) -> Option<History> {
        let noted = self.noted_histories(server)?;
        noted
            .histories
            .iter()
            .rev()
            .filter_map(|(&timeline, text)| History::parse(timeline, text).ok())
            .find(|h| h.still_ahead(at.timeline, at.segno(seg_size), seg_size))
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

    /// The prefetcher's lock, when no other prefetcher holds it: whoever has it is the one
    /// prefetcher of this spool until it drops it. Taking it empties the spool of what earlier
    /// prefetchers left (see `clear_left_behind`): from now on `take` serves what this one
    /// writes, and only that (see the module docs).
    pub fn lock_for_prefetcher(&self) -> io::Result<Option<File>> {
        fs::create_dir_all(&self.dir)?;
        let lock = self.open_lock()?;
        if lock.try_lock().is_err() {
            return Ok(None);
        }
        self.clear_left_behind();
        Ok(Some(lock))
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

    /// Remove every spooled segment, temp file and `.want` (not the lock, the markers of what the
    /// spool is for, or the history files recovery fetched: PostgreSQL fetched them before the
    /// first segment, and does not fetch them again when a prefetcher that went idle starts anew).
    pub fn clear(&self) -> io::Result<()> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for e in entries.flatten() {
            let n = e.file_name();
            let n = n.to_string_lossy();
            if !is_kept_marker(&n) {
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
        // Markers, not leftovers: `.want` too, written by every call from recovery, also in the
        // moment before the prefetcher it starts takes the lock.
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return (0, 0);
        };
        let left: Vec<(String, u64)> = rd
            .flatten()
            .map(|e| {
                let size = e.metadata().map_or(0, |m| m.len());
                (e.file_name().to_string_lossy().into_owned(), size)
            })
            .filter(|(n, _)| !is_kept_marker(n) && n != ".want")
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

    /// Files of spooled segments, of any repository.
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

/// `rename` across file systems (Linux's errno).
const EXDEV: i32 = 18;

/// Serve a spooled segment to `dest` on another file system: copied to a temp file beside
/// `dest`, then renamed, so PostgreSQL never sees part of it; then taken out of the spool. Not
/// fsynced, as a renamed one is not (after a crash PostgreSQL restores it again).
fn copy_across(src: &Path, dest: &Path) -> io::Result<()> {
    let tmp = crate::archive::temp_beside(dest);
    let copied = fs::copy(src, &tmp).and_then(|_| fs::rename(&tmp, dest));
    match copied {
        Ok(()) => {
            let _ = fs::remove_file(src);
            Ok(())
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// The history files recovery fetched (see `Spool::note_history`).
const HISTORIES_MARKER: &str = ".histories";

/// Files `clear` keeps: the lock, what the spool is for, and the history files recovery fetched
/// (with the temp file a `wal-fetch` may be writing them through).
fn is_kept_marker(name: &str) -> bool {
    [".lock", ".repo", ".boot"].contains(&name) || name.starts_with(HISTORIES_MARKER)
}

/// The history files one run of the server fetched during recovery, by timeline.
#[derive(serde::Serialize, serde::Deserialize)]
struct NotedHistories {
    server: String,
    histories: std::collections::BTreeMap<u32, String>,
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
    identity: String,
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
        let text = fs::read_to_string(pid_file)?;
        let mut lines = text.lines().map(str::trim);
        let pid = lines.next().unwrap_or("").to_string();
        // The third line is the server's start time: a pid can come round again.
        let started = lines.nth(1).unwrap_or("");
        Ok(Self {
            pid_file: pid_file.to_path_buf(),
            identity: format!("{pid} {started}"),
            pid,
        })
    }

    /// Tells this run of the server from any other: its pid and start time.
    pub fn identity(&self) -> &str {
        &self.identity
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
/// Only one runs per spool. A segment enters the spool only once it passed the checks `wal-fetch`
/// makes (verified, and its page header agrees with its name and `walship.json`).
/// `lock` is the spool's, from `lock_for_prefetcher` (which emptied the spool).
pub async fn run_prefetcher(
    ctx: Arc<FetchContext>,
    spool: Spool,
    lock: File,
    server: ServerWatch,
) -> io::Result<()> {
    // Calls served from the spool never sweep pg_wal; after a restart, this process does.
    let swept = crate::archive::sweep_stale_temps(&server.pg_wal());
    if swept > 0 {
        tracing::info!(
            "removed {swept} temp files of interrupted wal-fetch calls from {}",
            server.pg_wal().display()
        );
    }
    // Without the segment size every name after a log's last segment would be wrong, and without
    // walship.json no segment can be checked before it enters the spool: give up for now, and
    // the next call from recovery starts another prefetcher.
    let meta = match ctx.archive.read_meta().await {
        Ok(Some(m)) => Arc::new(m),
        Ok(None) => return spool.clear(), // nothing archived yet: nothing to prefetch
        Err(e) => {
            tracing::warn!("cannot read the repository's metadata, not prefetching: {e}");
            return spool.clear();
        }
    };
    let seg_size = meta.wal_segment_size;
    let repository = ctx.archive.store().describe();
    let depth = ctx.settings.prefetch as u64;
    let sem = Arc::new(Semaphore::new(ctx.settings.download_concurrency));
    let mut last_want: Option<WalFileName> = None;
    let mut last_change = Instant::now();
    // Where the archive ended last time we looked, and when: don't ask again at once.
    let mut end_seen: Option<(String, Instant)> = None;
    let mut tasks: tokio::task::JoinSet<PrefetchResult> = tokio::task::JoinSet::new();
    let mut in_flight: HashSet<String> = Default::default();
    // Segments this prefetcher spooled while in the window: one missing since was taken by
    // recovery (perhaps just before it wrote the `.want` that moves the window past it), and is
    // not downloaded again.
    let mut spooled: HashSet<String> = Default::default();
    // Alive while a decode runs: a cancelled task's decode goes on, and could rename a segment
    // into the spool after the spool was emptied.
    let decoding = Arc::new(());
    let mut short_of_space = false;
    let mut followed: Option<u32> = None;
    // The segments after `.want`, and their spool files.
    let (mut window, mut files): (Vec<String>, Vec<String>) = Default::default();
    loop {
        let want = spool.want();
        if want != last_want {
            last_want = want.clone();
            last_change = Instant::now();
            // Recovery fetches a history file before it asks for the first segment it follows
            // the history for: the history is looked up again only when it asks for another.
            let id = want.as_ref().and_then(|w| w.segment());
            let history = id.and_then(|id| spool.followed(server.identity(), &id, seg_size));
            let follows = history.as_ref().map(|h| h.timeline);
            if follows != followed {
                followed = follows;
                if let Some(t) = follows {
                    tracing::info!("recovery follows timeline {t}: prefetching along its history");
                }
            }
            window = id.map_or_else(Vec::new, |id| {
                segments_after(&id, depth, seg_size, history.as_ref())
            });
            files = window.iter().map(|n| spool.file_name(n)).collect();
        }
        if last_change.elapsed() > ctx.settings.prefetch_idle || !server.running() {
            break;
        }
        if !spool.valid() {
            // restore_command now names another repository: recovery's calls ask that one, and
            // the prefetcher they start will work for it once this one is gone.
            tracing::info!("recovery now fetches from another repository: prefetcher stopping");
            break;
        }
        while let Some(done) = tasks.try_join_next() {
            finished(done, &mut in_flight, &mut spooled, &mut end_seen);
        }
        if !window.is_empty() {
            for stale in spool.entries().into_iter().filter(|e| !files.contains(e)) {
                let _ = fs::remove_file(spool.dir().join(stale));
            }
            spooled.retain(|n| window.contains(n));
            let free = free_space(spool.dir());
            for (name, file) in window.iter().zip(&files) {
                if in_flight.contains(name)
                    || spooled.contains(name)
                    || spool.dir().join(file).exists()
                {
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
                    if name >= end && at.elapsed() < END_SEEN_FOR {
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
                let (ctx, name, busy) = (ctx.clone(), name.clone(), decoding.clone());
                let (meta, repository) = (meta.clone(), repository.clone());
                let dest = spool.dir().join(file);
                tasks.spawn(async move {
                    let _permit = permit;
                    // Gone once the task ends, whatever the outcome; after the segment's rename.
                    let _marker = RemoveOnDrop(marker);
                    let seg = WalFileName::parse(&name).expect("generated names are valid");
                    let key = repo::wal_key(&seg);
                    let res = async {
                        let object = ctx.archive.download(&key).await?;
                        crate::archive::place(
                            object,
                            &key,
                            &ctx.identities,
                            &dest,
                            Durability::UntilReboot,
                            busy,
                            move |restored: &Path| {
                                check_restored(restored, &seg, &meta, &repository)
                            },
                        )
                        .await
                        .map(|_| ())
                    }
                    .await;
                    (name, res)
                });
            }
        }
        // Look again after a while, or as soon as a download ends and frees its slot.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                finished(done, &mut in_flight, &mut spooled, &mut end_seen)
            }
        }
    }
    tasks.shutdown().await;
    // Decodes take a fraction of a second; the bound is for a machine stalled far worse.
    let since = Instant::now();
    while Arc::strong_count(&decoding) > 1 && since.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    spool.clear()?;
    drop(lock);
    Ok(())
}

/// The names of the `depth` segments recovery reads after `want`: on `want`'s timeline, or, where
/// recovery follows a timeline's `history`, on the timeline it says each segment is read from
/// (past a fork point, the child's).
fn segments_after(
    want: &SegmentId,
    depth: u64,
    seg_size: u64,
    history: Option<&History>,
) -> Vec<String> {
    let (current, first) = (want.timeline, want.segno(seg_size));
    (first + 1..=first + depth)
        .map(|segno| {
            let timeline = history
                .and_then(|h| h.timeline_of_segment(current, segno, seg_size))
                .unwrap_or(current);
            SegmentId::from_segno(timeline, segno, seg_size)
                .file_name()
                .to_string()
        })
        .collect()
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

type PrefetchResult = (String, Result<(), WalError>);

/// How long a segment found missing counts as the end of the archive.
const END_SEEN_FOR: Duration = Duration::from_secs(2);

/// Book a finished prefetch: free its name, and remember where the archive ended.
fn finished(
    done: Result<PrefetchResult, tokio::task::JoinError>,
    in_flight: &mut HashSet<String>,
    spooled: &mut HashSet<String>,
    end_seen: &mut Option<(String, Instant)>,
) {
    let (name, res) = done.expect("prefetch task does not panic");
    in_flight.remove(&name);
    match res {
        Ok(()) => {
            spooled.insert(name);
        }
        Err(WalError::Archive(ArchiveError::Storage(StorageError::NotFound(_)))) => {
            // The lowest name found missing is where the archive ends, whichever answer came
            // last; else the names between would be asked for again at once.
            let lower = match end_seen {
                Some((end, at)) => at.elapsed() >= END_SEEN_FOR || name < *end,
                None => true,
            };
            if lower {
                *end_seen = Some((name, Instant::now()))
            }
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
        let (a, b) = (
            Spool::new(dir.path(), "s3://bucket/a"),
            Spool::new(dir.path(), "s3://bucket/b"),
        );
        let dest = dir.path().join("RECOVERYXLOG");
        let spooled = |spool: &Spool, name: &str| {
            fs::write(spool.dir().join(spool.file_name(name)), b"seg").unwrap();
        };
        a.set_want("000000010000000000000001").unwrap();
        spooled(&a, "000000010000000000000002");
        // Spooled files are served only while a prefetcher runs: one killed left these.
        assert!(!a.take("000000010000000000000002", &dest));
        let _prefetcher = a.lock_for_prefetcher().unwrap().expect("the lock is free");
        assert!(
            !a.take("000000010000000000000002", &dest),
            "nor by the next prefetcher: it empties the spool as it starts"
        );
        assert!(a.entries().is_empty());
        assert!(
            a.lock_for_prefetcher().unwrap().is_none(),
            "one prefetcher per spool"
        );
        // The running prefetcher spools a segment.
        spooled(&a, "000000010000000000000002");
        fs::write(
            a.dir().join(format!(
                ".{}.walship-tmp.1",
                a.file_name("000000010000000000000003")
            )),
            b"half",
        )
        .unwrap();
        assert!(
            !b.take("000000010000000000000002", &dest),
            "other repository"
        );
        assert!(!a.take("000000010000000000000003", &dest), "in progress");
        assert!(a.take("000000010000000000000002", &dest));
        assert_eq!(fs::read(&dest).unwrap(), b"seg");
        assert!(a.entries().is_empty(), "moved, not copied");
        // Written under another boot (the machine crashed since): never served.
        fs::write(a.dir().join(".boot"), "another-boot").unwrap();
        spooled(&a, "000000010000000000000005");
        assert!(
            !a.take("000000010000000000000005", &dest),
            "spooled before a reboot"
        );
        a.set_want("000000010000000000000004").unwrap();
        assert!(a.entries().is_empty(), "a stale boot empties the spool");
        // Switching repository empties the spool.
        spooled(&a, "000000010000000000000004");
        b.set_want("000000010000000000000003").unwrap();
        assert!(a.entries().is_empty());
        assert!(b.valid() && !a.valid(), "a's prefetcher sees it must stop");
        // A prefetcher for the old repository renames a download in after the switch (it was
        // under way): the spool now works for b, and b never takes it, though the name matches.
        spooled(&a, "000000010000000000000004");
        assert!(!b.take("000000010000000000000004", &dest));
        spooled(&b, "000000010000000000000004");
        assert!(b.take("000000010000000000000004", &dest));
    }

    #[test]
    fn a_spool_on_another_file_system_serves_a_copy() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        // /dev/shm is a tmpfs on Linux machines: another file system than the temp dir's.
        let Some(other) = tempfile::tempdir_in("/dev/shm")
            .ok()
            .filter(|o| o.path().metadata().unwrap().dev() != dir.path().metadata().unwrap().dev())
        else {
            eprintln!("skipped: no second file system at /dev/shm");
            return;
        };
        let spool = Spool::new(other.path(), "r");
        let pg_wal = dir.path().join("pg_wal");
        fs::create_dir_all(&pg_wal).unwrap();
        let dest = pg_wal.join("RECOVERYXLOG");
        spool.set_want("000000010000000000000001").unwrap();
        let _prefetcher = spool.lock_for_prefetcher().unwrap().expect("lock is free");
        let seg = spool
            .dir()
            .join(spool.file_name("000000010000000000000002"));
        fs::write(&seg, vec![7; 1 << 20]).unwrap();
        assert!(spool.take("000000010000000000000002", &dest));
        assert_eq!(fs::read(&dest).unwrap(), vec![7; 1 << 20]);
        assert!(!seg.exists(), "taken out of the spool");
        let left: Vec<_> = fs::read_dir(&pg_wal).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "no temp file left beside it");
        // Gone from the spool meanwhile: not served, nothing placed.
        fs::remove_file(&dest).unwrap();
        assert!(!spool.take("000000010000000000000002", &dest));
        assert!(!dest.exists());
    }

    #[test]
    fn a_spool_no_prefetcher_holds_is_swept_and_a_held_one_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path(), "repo-a");
        assert_eq!(spool.sweep_abandoned(), (0, 0), "no spool at all");
        spool.set_want("000000010000000000000001").unwrap();
        assert!(spool.dir().join(".repo").exists() && spool.dir().join(".boot").exists());
        // Markers alone (a call from recovery whose prefetcher has yet to take the lock): kept.
        assert_eq!(spool.sweep_abandoned(), (0, 0));
        assert!(spool.want().is_some());
        let leave = |spool: &Spool| {
            let seg = spool.file_name("000000010000000000000002");
            fs::write(spool.dir().join(seg), vec![1; 100]).unwrap();
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

    /// Regression: a prefetcher served what an earlier one left in the spool, which a
    /// crash-consistent snapshot clone started on the same host (same boot id) may hold torn,
    /// and a repository recreated at the same URL may hold from another cluster.
    #[test]
    fn a_new_prefetcher_serves_nothing_an_earlier_one_left() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path(), "repo-a");
        let other = Spool::new(dir.path(), "repo-b");
        let dest = dir.path().join("RECOVERYXLOG");
        spool.set_want("000000010000000000000001").unwrap();
        let left = [
            spool.file_name("000000010000000000000002"),
            other.file_name("000000010000000000000003"),
            format!(".{}.inflight", spool.file_name("000000010000000000000004")),
            format!(
                ".{}.walship-tmp.1",
                spool.file_name("000000010000000000000004")
            ),
        ];
        for n in &left {
            fs::write(spool.dir().join(n), b"torn").unwrap();
        }
        fs::write(spool.dir().join(".want.tmp"), b"000000010000000000000002").unwrap();
        let _prefetcher = spool
            .lock_for_prefetcher()
            .unwrap()
            .expect("the lock is free");
        assert!(!spool.take("000000010000000000000002", &dest));
        assert!(!dest.exists());
        let mut kept: Vec<String> = fs::read_dir(spool.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        kept.sort();
        // The markers stay: the spool still works for this repository, recovery is where it was.
        assert_eq!(kept, [".boot", ".lock", ".repo", ".want", ".want.tmp"]);
        assert!(spool.valid());
        assert_eq!(
            spool.want().map(|w| w.to_string()).as_deref(),
            Some("000000010000000000000001")
        );
        // What the running prefetcher writes is served.
        fs::write(
            spool
                .dir()
                .join(spool.file_name("000000010000000000000002")),
            b"seg",
        )
        .unwrap();
        assert!(spool.take("000000010000000000000002", &dest));
        assert_eq!(fs::read(&dest).unwrap(), b"seg");
    }

    #[test]
    fn recovery_follows_the_newest_history_it_fetched_and_can_still_switch_to() {
        const SEG: u64 = 16 << 20;
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path(), "repo-a");
        let at = |name: &str| WalFileName::parse(name).unwrap().segment().unwrap();
        let (run, restarted) = ("100 1700000000", "100 1700000099");
        let followed =
            |server: &str, name: &str| spool.followed(server, &at(name), SEG).map(|h| h.timeline);
        // Timeline 2 forked from 1 in segment 5; a drill's timeline 3 forked from 1 in segment 3.
        let (h2, h3) = ("1\t0/5000198\tx\n", "1\t0/3000000\tdrill\n");
        spool.note_history(run, 2, h2).unwrap();
        assert!(spool.valid(), "noting claims the spool for the repository");
        assert_eq!(followed(run, "000000010000000000000002"), Some(2));
        // Fetched later, newer, but forked before where recovery is: PostgreSQL rejects it.
        spool.note_history(run, 3, h3).unwrap();
        assert_eq!(followed(run, "000000010000000000000004"), Some(2));
        // Had recovery been before the drill's fork, it would have followed timeline 3.
        assert_eq!(followed(run, "000000010000000000000003"), Some(3));
        // Past timeline 2's fork on timeline 1: neither (recovery stays on timeline 1).
        assert_eq!(followed(run, "000000010000000000000006"), None);
        // On timeline 2: its own history.
        assert_eq!(followed(run, "000000020000000000000009"), Some(2));
        // Another run of the server (restarted: another start time) never sees them.
        assert_eq!(followed(restarted, "000000010000000000000002"), None);
        spool.note_history(restarted, 3, h3).unwrap();
        assert_eq!(followed(restarted, "000000010000000000000002"), Some(3));
        assert_eq!(followed(run, "000000010000000000000002"), None);
        // Kept while prefetchers come and go (PostgreSQL fetched it before the first segment),
        // and so is the temp file of a call killed while writing it: not reported as left over.
        fs::write(spool.dir().join(".histories.tmp"), b"{").unwrap();
        spool.clear().unwrap();
        drop(spool.lock_for_prefetcher().unwrap().expect("lock is free"));
        assert_eq!(spool.sweep_abandoned(), (0, 0));
        assert_eq!(followed(restarted, "000000010000000000000002"), Some(3));
        // Not for another repository.
        let other = Spool::new(dir.path(), "repo-b");
        other.set_want("000000010000000000000002").unwrap();
        assert!(!other.dir().join(".histories.tmp").exists());
        assert!(other
            .followed(restarted, &at("000000010000000000000002"), SEG)
            .is_none());
        // A history that does not parse is no history.
        other.note_history(restarted, 2, "garbage\n").unwrap();
        assert!(other
            .followed(restarted, &at("000000010000000000000002"), SEG)
            .is_none());
    }

    #[test]
    fn the_window_follows_the_history_past_the_fork() {
        let seg = 16 << 20;
        let want = WalFileName::parse("000000010000000000000002")
            .unwrap()
            .segment()
            .unwrap();
        assert_eq!(
            segments_after(&want, 3, seg, None),
            [
                "000000010000000000000003",
                "000000010000000000000004",
                "000000010000000000000005"
            ]
        );
        let history = History::parse(2, "1\t0/4000000\tx\n").unwrap();
        assert_eq!(
            segments_after(&want, 3, seg, Some(&history)),
            [
                "000000010000000000000003",
                "000000020000000000000004",
                "000000020000000000000005"
            ]
        );
        // Recovery on a timeline of another branch: the history says nothing about it.
        let sibling = History::parse(3, "1\t0/4000000\tx\n").unwrap();
        let on_two = WalFileName::parse("000000020000000000000002")
            .unwrap()
            .segment()
            .unwrap();
        assert!(segments_after(&on_two, 2, seg, Some(&sibling))
            .iter()
            .all(|n| n.starts_with("00000002")));
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
        fs::write(&pid, "4242\n/data\n1700000000\n5432\n").unwrap();
        let watch = ServerWatch::new(&pid).unwrap();
        assert!(watch.running());
        assert_eq!(watch.identity(), "4242 1700000000");
        fs::write(&pid, "4343\n/data\n").unwrap();
        assert!(!watch.running(), "another postmaster");
        fs::remove_file(&pid).unwrap();
        assert!(!watch.running(), "server stopped");
    }

    #[test]
    fn lock_tells_whether_a_prefetcher_runs() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path(), "r");
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
        let spool = Spool::new(dir.path(), "r");
        let dest = dir.path().join("RECOVERYXLOG");
        spool.set_want("000000010000000000000001").unwrap();
        let limit = Duration::from_secs(20);
        let quick = Duration::from_secs(5);

        let since = Instant::now();
        assert_eq!(spool.take_when_ready(SEG, &dest, limit), None);
        assert!(since.elapsed() < quick, "not in flight: no wait");

        // In flight, but no prefetcher holds the lock (it was killed): no wait.
        File::create(spool.in_flight_marker(SEG)).unwrap();
        let since = Instant::now();
        assert_eq!(spool.take_when_ready(SEG, &dest, limit), None);
        assert!(since.elapsed() < quick);

        let lock = File::create(spool.dir().join(".lock")).unwrap();
        lock.lock().unwrap();
        // The download fails: the marker goes, no segment comes; the caller downloads it.
        let marker = spool.in_flight_marker(SEG);
        let failing = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            fs::remove_file(marker).unwrap();
        });
        assert_eq!(spool.take_when_ready(SEG, &dest, limit), None);
        failing.join().unwrap();

        // The download succeeds: the segment is renamed in, then the marker goes.
        File::create(spool.in_flight_marker(SEG)).unwrap();
        let (dir_path, marker) = (spool.dir().to_path_buf(), spool.in_flight_marker(SEG));
        let file = spool.file_name(SEG);
        let landing = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            fs::write(dir_path.join(".tmp"), b"seg").unwrap();
            fs::rename(dir_path.join(".tmp"), dir_path.join(file)).unwrap();
            fs::remove_file(marker).unwrap();
        });
        let waited = spool.take_when_ready(SEG, &dest, limit);
        landing.join().unwrap();
        assert!(waited.unwrap() >= Duration::from_millis(90), "{waited:?}");
        assert_eq!(fs::read(&dest).unwrap(), b"seg");

        // Already spooled: taken at the first look.
        fs::write(spool.dir().join(spool.file_name(SEG)), b"seg2").unwrap();
        assert_eq!(
            spool.take_when_ready(SEG, &dest, limit),
            Some(Duration::ZERO)
        );
        // A stuck download is waited for no longer than the limit.
        File::create(spool.in_flight_marker(SEG)).unwrap();
        let since = Instant::now();
        let short = Duration::from_millis(200);
        assert_eq!(spool.take_when_ready(SEG, &dest, short), None);
        assert!(since.elapsed() >= short && since.elapsed() < quick);
    }
}
