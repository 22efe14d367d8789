//! Timeline history files: which timelines a timeline descends from, and where each forked.
//! Pure parsing and arithmetic; callers fetch the files.

/// A timeline's ancestry from its history file: `(ancestor, LSN where the next timeline forked
/// from it)`, oldest first. The last entry is the direct parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    pub timeline: u32,
    pub forks: Vec<(u32, u64)>,
}

impl History {
    /// Parse PostgreSQL's history file format: `parentTLI <tab> switchpoint <tab> reason` per
    /// line, `#` comments and blank lines allowed.
    pub fn parse(timeline: u32, text: &str) -> Result<Self, String> {
        let mut forks = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let bad = || format!("history file of timeline {timeline}: bad line '{line}'");
            let parent: u32 = fields.next().and_then(|f| f.parse().ok()).ok_or_else(bad)?;
            let at = fields
                .next()
                .and_then(crate::wal::name::parse_lsn)
                .ok_or_else(bad)?;
            if parent >= timeline || forks.last().is_some_and(|&(p, _)| p >= parent) {
                return Err(bad());
            }
            forks.push((parent, at));
        }
        if forks.is_empty() {
            return Err(format!(
                "history file of timeline {timeline} names no parent"
            ));
        }
        Ok(Self { timeline, forks })
    }

    pub fn parent(&self) -> (u32, u64) {
        *self.forks.last().expect("parse refuses an empty history")
    }

    /// Whether recovery reading segment `segno` of timeline `current` can still follow this
    /// history: `current` is one of its timelines, and the fork from `current` to the next one
    /// (if any) lies in that segment or after it. PostgreSQL refuses to switch to a timeline that
    /// forked before the point it replayed to (a restore drill's, say).
    pub fn still_ahead(&self, current: u32, segno: u64, segment_size: u64) -> bool {
        if current == self.timeline {
            return true;
        }
        self.forks
            .iter()
            .find(|&&(tli, _)| tli == current)
            .is_some_and(|&(_, fork)| fork / segment_size >= segno)
    }

    /// The timeline recovery that follows this history reads segment `segno` from, once it reads
    /// from timeline `current`: as PostgreSQL picks it, the newest timeline of the history that
    /// began in or before that segment (a timeline's first segment is the one holding its fork
    /// point, which it shares with its parent), and never one older than `current`. `None` when
    /// `current` is not on this history: recovery follows another one.
    pub fn timeline_of_segment(&self, current: u32, segno: u64, segment_size: u64) -> Option<u32> {
        // Each timeline of the history with where it began: the oldest at the start of WAL.
        let begins = std::iter::once(0).chain(self.forks.iter().map(|&(_, at)| at));
        let timelines = self
            .forks
            .iter()
            .map(|&(tli, _)| tli)
            .chain([self.timeline]);
        let mut line: Vec<(u32, u64)> = timelines.zip(begins).collect();
        if !line.iter().any(|&(tli, _)| tli == current) {
            return None;
        }
        line.reverse();
        line.into_iter()
            .take_while(|&(tli, _)| tli >= current)
            .find(|&(_, begin)| begin / segment_size <= segno)
            .map(|(tli, _)| tli)
            .or(Some(current))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_postgresqls_history_files() {
        let h = History::parse(
            3,
            "1\t0/3000198\tno recovery target specified\n\n2\t0/5A000028\tbefore 2026-11-24 12:45:00+00\n",
        )
        .unwrap();
        assert_eq!(h.forks, vec![(1, 0x3000198), (2, 0x5A000028)]);
        assert_eq!(h.parent(), (2, 0x5A000028));
        assert!(History::parse(2, "# nothing\n").is_err());
        assert!(History::parse(2, "2\t0/3000000\tself\n").is_err());
        assert!(History::parse(3, "2\t0/1\tx\n1\t0/2\ty\n").is_err());
        assert!(History::parse(2, "1\tnot-an-lsn\tx\n").is_err());
    }

    #[test]
    fn recovery_reads_each_segment_from_the_newest_timeline_begun_by_then() {
        const SEG: u64 = 16 << 20;
        // Timeline 2 forked from 1 inside segment 3, timeline 4 from 2 at the start of segment 6.
        let h = History::parse(4, "1\t0/3000198\tx\n2\t0/6000000\ty\n").unwrap();
        let on = |current, segno| h.timeline_of_segment(current, segno, SEG);
        assert_eq!(on(1, 2), Some(1));
        // The segment holding the fork point is read from the child.
        assert_eq!(on(1, 3), Some(2));
        assert_eq!(on(1, 5), Some(2));
        assert_eq!(on(1, 6), Some(4));
        assert_eq!(on(2, 9), Some(4));
        assert_eq!(on(4, 9), Some(4));
        // Never back to an older timeline than the one recovery reads.
        assert_eq!(on(4, 2), Some(4));
        // Timeline 3 is not on this history (a sibling branch): no say.
        assert_eq!(on(3, 9), None);
        // Recovery on timeline 1 can still switch while it has not passed the fork in segment 3
        // (it may read the fork's segment from timeline 1, if timeline 2's is missing).
        assert!(h.still_ahead(1, 2, SEG) && h.still_ahead(1, 3, SEG));
        assert!(!h.still_ahead(1, 4, SEG), "replayed past the fork");
        assert!(h.still_ahead(2, 6, SEG) && !h.still_ahead(2, 7, SEG));
        assert!(h.still_ahead(4, 100, SEG));
        assert!(!h.still_ahead(3, 2, SEG), "not on this history");
    }
}
