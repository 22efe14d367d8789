//! Which timeline the WAL after a backup goes on along: the backup's own, or the timelines that
//! promotions (failovers) continued it on. Pure: the caller lists the archive and reads the
//! history files.
//!
//! A promotion writes `<timeline>.history`: every ancestor timeline and the LSN where its child
//! forked from it. Two kinds of promotion leave the same file:
//! - a failover: the old primary is gone, so its timeline's archived WAL ends where the new one
//!   forked (at most the segment holding the fork point was finished on the old timeline);
//! - a restore drill or a copy that archived into the same repository: the old timeline goes on
//!   being archived past the fork point, because production still writes it.
//!
//! A child is the continuation of its parent only in the first case. One continuation is
//! followed; when several children continue the same point, nobody can tell which is production,
//! and the caller asks the user to choose (`--target-timeline`).

use std::collections::BTreeMap;

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

    fn parent(&self) -> (u32, u64) {
        *self.forks.last().expect("parse refuses an empty history")
    }
}

/// A step along the path: `timeline` forked from `parent` at `fork_lsn`, where the parent's
/// archived WAL ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub timeline: u32,
    pub parent: u32,
    pub fork_lsn: u64,
}

/// The way the WAL after a backup goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalPath {
    /// The promotions followed, in order; empty when the backup's own timeline is where it ends.
    pub steps: Vec<Step>,
    /// The last segment number archived without a gap along the path, and its timeline.
    pub end: Option<(u32, u64)>,
    /// Where the path stops because several timelines continue the same point.
    pub ambiguous: Option<Ambiguity>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ambiguity {
    pub parent: u32,
    pub children: Vec<u32>,
}

impl WalPath {
    /// The timeline recovery ends on.
    pub fn last_timeline(&self, own: u32) -> u32 {
        self.steps.last().map_or(own, |s| s.timeline)
    }
}

/// Follow the archived WAL from the segment `start_segno` of `timeline` (a backup's first
/// segment), through promotions that forked at or after `min_fork` (the backup's stop point: a
/// timeline forked before it cannot be reached from this backup).
///
/// `segments` holds the archived segment numbers of each timeline, `histories` the history files
/// of the timelines that have one.
pub fn follow(
    timeline: u32,
    start_segno: u64,
    min_fork: u64,
    segment_size: u64,
    segments: &BTreeMap<u32, std::collections::BTreeSet<u64>>,
    histories: &BTreeMap<u32, History>,
) -> WalPath {
    let seg_of = |lsn: u64| lsn / segment_size;
    let chain_end = |tli: u32, from: u64| -> Option<u64> {
        let have = segments.get(&tli)?;
        let mut end = None;
        let mut n = from;
        while have.contains(&n) {
            end = Some(n);
            n += 1;
        }
        end
    };
    let mut path = WalPath {
        steps: Vec::new(),
        end: chain_end(timeline, start_segno).map(|e| (timeline, e)),
        ambiguous: None,
    };
    let (mut tli, mut from, mut min_fork) = (timeline, start_segno, min_fork);
    loop {
        // A child continues this timeline when the archived WAL here reaches the segment holding
        // the fork (the parent's copy of that one may be missing: the old primary died before
        // finishing it) and goes no further: past it, the parent went on after the fork.
        let Some(end) = chain_end(tli, from) else {
            return path;
        };
        let continuations: Vec<&History> = histories
            .values()
            .filter(|h| {
                let (parent, at) = h.parent();
                if parent != tli || at < min_fork || at == 0 {
                    return false;
                }
                // The last segment the parent wrote before the fork (the one holding it, unless
                // the fork is on a segment boundary).
                let last_old = seg_of(at - 1);
                end + 1 >= last_old && end <= last_old
            })
            .collect();
        match continuations.as_slice() {
            [] => return path,
            [child] => {
                let (parent, at) = child.parent();
                path.steps.push(Step {
                    timeline: child.timeline,
                    parent,
                    fork_lsn: at,
                });
                tli = child.timeline;
                from = seg_of(at);
                min_fork = at;
                if let Some(e) = chain_end(tli, from) {
                    path.end = Some((tli, e));
                }
            }
            many => {
                path.ambiguous = Some(Ambiguity {
                    parent: tli,
                    children: many.iter().map(|h| h.timeline).collect(),
                });
                return path;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const SEG: u64 = 16 << 20;

    fn segs(list: &[(u32, std::ops::RangeInclusive<u64>)]) -> BTreeMap<u32, BTreeSet<u64>> {
        let mut m: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
        for (tli, r) in list {
            m.entry(*tli).or_default().extend(r.clone());
        }
        m
    }

    fn hist(list: &[(u32, &[(u32, u64)])]) -> BTreeMap<u32, History> {
        list.iter()
            .map(|(tli, forks)| {
                (
                    *tli,
                    History {
                        timeline: *tli,
                        forks: forks.to_vec(),
                    },
                )
            })
            .collect()
    }

    /// An LSN inside segment `n`.
    fn mid(n: u64) -> u64 {
        n * SEG + 0x1000
    }

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
    fn a_failover_is_followed_and_a_drill_is_not() {
        // Timeline 1 archived 3..=9; the old primary never finished segment 10. Timeline 2 forked
        // in segment 10 and goes on to 14.
        let failover = follow(
            1,
            3,
            mid(4),
            SEG,
            &segs(&[(1, 3..=9), (2, 10..=14)]),
            &hist(&[(2, &[(1, mid(10))])]),
        );
        assert_eq!(
            failover.steps,
            vec![Step {
                timeline: 2,
                parent: 1,
                fork_lsn: mid(10)
            }]
        );
        assert_eq!(failover.end, Some((2, 14)));
        assert_eq!(failover.last_timeline(1), 2);
        // The old primary did finish segment 10 (holding WAL past the fork that was lost): still
        // the continuation.
        let finished = follow(
            1,
            3,
            mid(4),
            SEG,
            &segs(&[(1, 3..=10), (2, 10..=14)]),
            &hist(&[(2, &[(1, mid(10))])]),
        );
        assert_eq!(finished.end, Some((2, 14)));
        // A drill promoted at segment 6 while production went on archiving timeline 1.
        let drill = follow(
            1,
            3,
            mid(4),
            SEG,
            &segs(&[(1, 3..=20), (2, 6..=8)]),
            &hist(&[(2, &[(1, mid(6))])]),
        );
        assert!(drill.steps.is_empty() && drill.ambiguous.is_none());
        assert_eq!(drill.end, Some((1, 20)));
        // Forked before the backup's stop point: not reachable from this backup.
        let early = follow(
            1,
            3,
            mid(4),
            SEG,
            &segs(&[(1, 3..=3), (2, 3..=9)]),
            &hist(&[(2, &[(1, mid(3))])]),
        );
        assert!(early.steps.is_empty());
        // A gap on timeline 1 before the fork: the path ends at the gap.
        let gap = follow(
            1,
            3,
            mid(4),
            SEG,
            &segs(&[(1, 3..=5), (1, 8..=9), (2, 10..=14)]),
            &hist(&[(2, &[(1, mid(10))])]),
        );
        assert!(gap.steps.is_empty());
        assert_eq!(gap.end, Some((1, 5)));
    }

    #[test]
    fn failovers_chain_and_drills_off_the_path_are_left_alone() {
        // 1 -> 2 (failover at 10) -> 4 (failover at 20); 3 is a drill forked from 2 at 12 while
        // 2 went on; 5 a drill forked from 1 at 6.
        let path = follow(
            1,
            3,
            mid(4),
            SEG,
            &segs(&[
                (1, 3..=9),
                (2, 10..=20),
                (3, 12..=13),
                (4, 20..=25),
                (5, 6..=7),
            ]),
            &hist(&[
                (2, &[(1, mid(10))]),
                (3, &[(1, mid(10)), (2, mid(12))]),
                (4, &[(1, mid(10)), (2, mid(20))]),
                (5, &[(1, mid(6))]),
            ]),
        );
        let tlis: Vec<u32> = path.steps.iter().map(|s| s.timeline).collect();
        assert_eq!(tlis, vec![2, 4]);
        assert_eq!(path.end, Some((4, 25)));
        assert!(path.ambiguous.is_none());
    }

    #[test]
    fn two_timelines_continuing_one_point_are_ambiguous() {
        // Timeline 1 ends in segment 10; both 2 and 3 forked there (a failover, and a drill that
        // restored to the end of the archive before production archived more).
        let path = follow(
            1,
            3,
            mid(4),
            SEG,
            &segs(&[(1, 3..=9), (2, 10..=12), (3, 10..=11)]),
            &hist(&[(2, &[(1, mid(10))]), (3, &[(1, mid(10) + 8)])]),
        );
        assert!(path.steps.is_empty());
        assert_eq!(path.end, Some((1, 9)));
        assert_eq!(
            path.ambiguous,
            Some(Ambiguity {
                parent: 1,
                children: vec![2, 3]
            })
        );
    }

    #[test]
    fn a_fork_on_a_segment_boundary_starts_the_child_at_the_next_segment() {
        // The switch point is the first byte of segment 10: timeline 1 holds all of 9, the child
        // starts with 10.
        let path = follow(
            1,
            3,
            mid(4),
            SEG,
            &segs(&[(1, 3..=9), (2, 10..=11)]),
            &hist(&[(2, &[(1, 10 * SEG)])]),
        );
        assert_eq!(path.end, Some((2, 11)));
        // ... and timeline 1 having 10 too means it went on after the fork: a drill.
        let drill = follow(
            1,
            3,
            mid(4),
            SEG,
            &segs(&[(1, 3..=10), (2, 10..=11)]),
            &hist(&[(2, &[(1, 10 * SEG)])]),
        );
        assert!(drill.steps.is_empty());
    }
}
