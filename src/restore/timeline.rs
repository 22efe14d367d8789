//! Which timeline the WAL after a backup goes on along: the backup's own, or the timelines that
//! promotions (failovers) continued it on. Pure: the caller lists the archive and reads the
//! history files.
//!
//! A promotion writes `<timeline>.history`: every ancestor timeline and the LSN where its child
//! forked from it. Two kinds of promotion leave the same file:
//! - a failover: the old primary is gone, so its timeline's archived WAL ends where the new one
//!   forked;
//! - a restore drill or a copy that archived into the same repository: production goes on
//!   archiving the old timeline past the fork point.
//!
//! A child is the continuation of its parent only in the first case, which the archive shows in
//! one of two ways. Either the parent's segment holding the fork was never archived: a drill
//! restored from this archive can only fork in a segment the archive has, so only a server that
//! streamed the WAL (a standby) can have forked there. Or that segment is archived but nothing
//! after it is, and the promoted standby archived its own copy as `<segment>.partial`, which
//! PostgreSQL does for a segment it streamed and never for one it restored from the archive.
//!
//! A fork exactly on a segment boundary shows neither, and is never followed. One continuation
//! is followed; when several children continue the same point, nobody can tell which is
//! production, and the caller asks the user to choose (`--target-timeline`).

use std::collections::{BTreeMap, BTreeSet};

pub use crate::wal::history::History;

/// A step along the path: `timeline` forked from `parent` at `fork_lsn`, where the parent's
/// archived WAL ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub timeline: u32,
    pub parent: u32,
    pub fork_lsn: u64,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "timeline {} forked from {} at {}",
            self.timeline,
            self.parent,
            crate::wal::name::format_lsn(self.fork_lsn)
        )
    }
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
    /// Timelines that forked from the path's last timeline after the backup and are not
    /// followed: drills and copies, or a failover the archive cannot tell from one.
    pub branches: Vec<Step>,
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

/// What the archive holds, by timeline: segment numbers of complete segments and of `.partial`
/// ones, and the history files.
#[derive(Debug, Default)]
pub struct Archived {
    pub segments: BTreeMap<u32, BTreeSet<u64>>,
    pub partials: BTreeMap<u32, BTreeSet<u64>>,
    pub histories: BTreeMap<u32, History>,
}

/// Follow the archived WAL from the segment `start_segno` of `timeline` (a backup's first
/// segment), through promotions that forked at or after `min_fork` (the backup's stop point: a
/// timeline forked before it cannot be reached from this backup).
pub fn follow(
    timeline: u32,
    start_segno: u64,
    min_fork: u64,
    segment_size: u64,
    archived: &Archived,
) -> WalPath {
    let Archived {
        segments,
        partials,
        histories,
    } = archived;
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
        branches: Vec::new(),
    };
    let (mut tli, mut from, mut min_fork) = (timeline, start_segno, min_fork);
    loop {
        // A child continues this timeline when the archived WAL here reaches the segment before
        // the one holding the fork and stops there, or holds that one too while a streamed copy
        // of it was archived as .partial (see the module's doc); past it, the parent went on.
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
                // A fork on a segment boundary leaves no trace of how the parent's WAL got to
                // the promoted server: a drill that replayed to the end of the archive forks
                // there as often as not. Never taken for a failover.
                if at % segment_size == 0 {
                    return false;
                }
                // The segment holding the fork: the child's first, with the parent's WAL up to
                // the fork copied into it.
                let fork_seg = seg_of(at);
                let streamed = || partials.get(&tli).is_some_and(|p| p.contains(&fork_seg));
                // WAL of the parent after a gap past the fork: it went on, whatever was lost.
                let went_on = || {
                    segments
                        .get(&tli)
                        .is_some_and(|s| s.range(fork_seg + 1..).next().is_some())
                };
                (end + 1 == fork_seg || (end == fork_seg && streamed())) && !went_on()
            })
            .collect();
        match continuations.as_slice() {
            [] => {
                path.branches = histories
                    .values()
                    .filter(|h| h.parent().0 == tli && h.parent().1 >= min_fork)
                    .map(|h| Step {
                        timeline: h.timeline,
                        parent: tli,
                        fork_lsn: h.parent().1,
                    })
                    .collect();
                return path;
            }
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

/// The timelines a server on `timeline` descends from, oldest first, each with the LSN where its
/// history leaves it (`u64::MAX` for `timeline` itself). `None` for a timeline after the first
/// whose history file the archive lacks: PostgreSQL cannot recover along it.
pub fn lineage(timeline: u32, histories: &BTreeMap<u32, History>) -> Option<Vec<(u32, u64)>> {
    let mut line = match histories.get(&timeline) {
        Some(h) => h.forks.clone(),
        None if timeline == 1 => Vec::new(),
        None => return None,
    };
    line.push((timeline, u64::MAX));
    Some(line)
}

/// Whether recovery along `line` (see `lineage`) can start from a backup on `timeline` that
/// becomes consistent at `stop`: PostgreSQL requires the backup's end on that history.
pub fn on_lineage(line: &[(u32, u64)], timeline: u32, stop: u64) -> bool {
    line.iter()
        .any(|&(t, leaves)| t == timeline && stop <= leaves)
}

/// A history that parted from a backup's before the backup became consistent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rival {
    pub fork: Step,
    /// True when the other history is the parent going on past the fork (the backup descends
    /// from the child); false when it is the child and the timelines forked from it.
    pub parent_side: bool,
    /// The timelines of the other history.
    pub timelines: Vec<u32>,
}

impl Rival {
    /// The first segment of the other history's WAL: for `parent_side`, the parent's past the
    /// fork (the one holding it counts only without the promoted server's `.partial` of it).
    pub fn from_segno(&self, segment_size: u64, partials: &BTreeMap<u32, BTreeSet<u64>>) -> u64 {
        if !self.parent_side {
            return 0;
        }
        let fork_seg = self.fork.fork_lsn / segment_size;
        let streamed = partials
            .get(&self.fork.parent)
            .is_some_and(|p| p.contains(&fork_seg));
        fork_seg + u64::from(streamed)
    }
}

/// The histories that part from the one a backup on `timeline` (consistent at `stop`) lies on,
/// at a fork before `stop`: a promotion this backup does not descend from while its own history
/// went on, or the history the backup's own timeline forked from. Either may be production;
/// whether its archived WAL reaches the target is the caller's to judge. Forks at or after `stop`
/// are `follow`'s.
pub fn rivals(timeline: u32, stop: u64, histories: &BTreeMap<u32, History>) -> Vec<Rival> {
    let Some(line) = lineage(timeline, histories) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for h in histories.values() {
        let (parent, at) = h.parent();
        if at >= stop {
            continue;
        }
        let fork = Step {
            timeline: h.timeline,
            parent,
            fork_lsn: at,
        };
        if line.iter().any(|&(t, _)| t == h.timeline) {
            // The backup descends from this promotion; the parent may have gone on.
            found.push(Rival {
                fork,
                parent_side: true,
                timelines: vec![parent],
            });
        } else if line.iter().any(|&(t, leaves)| t == parent && leaves > at) {
            // The backup's history went on along the parent past this fork.
            let mut timelines = vec![h.timeline];
            timelines.extend(
                histories
                    .values()
                    .filter(|d| d.forks.iter().any(|&(a, _)| a == h.timeline))
                    .map(|d| d.timeline),
            );
            found.push(Rival {
                fork,
                parent_side: false,
                timelines,
            });
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    /// An LSN inside segment `n`.
    fn mid(n: u64) -> u64 {
        n * SEG + 0x1000
    }

    type Forks<'a> = &'a [(u32, &'a [(u32, u64)])];

    /// The path from a backup on timeline 1 that starts in segment 3 and stops in segment 4.
    fn path(
        segments: &[(u32, std::ops::RangeInclusive<u64>)],
        partials: &[(u32, u64)],
        histories: Forks,
    ) -> WalPath {
        let mut a = Archived::default();
        for (tli, r) in segments {
            a.segments.entry(*tli).or_default().extend(r.clone());
        }
        for (tli, n) in partials {
            a.partials.entry(*tli).or_default().insert(*n);
        }
        for (tli, forks) in histories {
            let h = History {
                timeline: *tli,
                forks: forks.to_vec(),
            };
            a.histories.insert(*tli, h);
        }
        follow(1, 3, mid(4), SEG, &a)
    }

    fn timelines(steps: &[Step]) -> Vec<u32> {
        steps.iter().map(|s| s.timeline).collect()
    }

    #[test]
    fn a_failover_is_followed_and_a_drill_is_not() {
        let fork: Forks = &[(2, &[(1, mid(10))])];
        // Timeline 1 archived 3..=9; the old primary never finished segment 10, where timeline 2
        // forked and goes on to 14.
        let failover = path(&[(1, 3..=9), (2, 10..=14)], &[], fork);
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
        // The old primary did finish segment 10 (with WAL past the fork, lost in the failover);
        // the promoted standby archived its streamed copy as .partial.
        let finished = path(&[(1, 3..=10), (2, 10..=14)], &[(1, 10)], fork);
        assert_eq!(finished.end, Some((2, 14)));
        // Segment 10 archived and no .partial: a drill that replayed to the end of the archive
        // and promoted in its last segment, before production archived the next.
        let at_end = path(&[(1, 3..=10), (2, 10..=14)], &[], fork);
        assert!(at_end.steps.is_empty() && at_end.ambiguous.is_none());
        assert_eq!(at_end.end, Some((1, 10)));
        // A drill promoted in segment 6 while production went on archiving timeline 1.
        let drill = path(
            &[(1, 3..=20), (2, 6..=8)],
            &[(1, 6)],
            &[(2, &[(1, mid(6))])],
        );
        assert!(drill.steps.is_empty());
        assert_eq!(drill.end, Some((1, 20)));
        assert_eq!(timelines(&drill.branches), vec![2]);
        // Forked before the backup's stop point: not reachable from this backup.
        let early = path(&[(1, 3..=3), (2, 3..=9)], &[], &[(2, &[(1, mid(3))])]);
        assert!(early.steps.is_empty());
        // A gap on timeline 1 before the fork: the path ends at the gap.
        let gap = path(&[(1, 3..=5), (1, 8..=9), (2, 10..=14)], &[], fork);
        assert!(gap.steps.is_empty());
        assert_eq!(gap.end, Some((1, 5)));
    }

    #[test]
    fn failovers_chain_and_drills_off_the_path_are_left_alone() {
        // 1 -> 2 (failover in 10) -> 4 (failover in 20); 3 is a drill forked from 2 in 12 while
        // 2 went on; 5 a drill forked from 1 in 6.
        let p = path(
            &[
                (1, 3..=9),
                (2, 10..=19),
                (3, 12..=13),
                (4, 20..=25),
                (5, 6..=7),
            ],
            &[],
            &[
                (2, &[(1, mid(10))]),
                (3, &[(1, mid(10)), (2, mid(12))]),
                (4, &[(1, mid(10)), (2, mid(20))]),
                (5, &[(1, mid(6))]),
            ],
        );
        assert_eq!(timelines(&p.steps), vec![2, 4]);
        assert_eq!(p.end, Some((4, 25)));
        assert!(p.ambiguous.is_none());
    }

    #[test]
    fn two_timelines_continuing_one_point_are_ambiguous() {
        // Timeline 1 ends before segment 10; both 2 and 3 forked in it.
        let p = path(
            &[(1, 3..=9), (2, 10..=12), (3, 10..=11)],
            &[],
            &[(2, &[(1, mid(10))]), (3, &[(1, mid(10) + 8)])],
        );
        assert!(p.steps.is_empty());
        assert_eq!(p.end, Some((1, 9)));
        assert_eq!(
            p.ambiguous,
            Some(Ambiguity {
                parent: 1,
                children: vec![2, 3]
            })
        );
    }

    #[test]
    fn a_parent_that_went_on_after_a_gap_is_not_a_failover() {
        // Timeline 1 lost segments 10 and 11 but went on from 12: timeline 2, forked in 10,
        // is not its continuation.
        let p = path(
            &[(1, 3..=9), (1, 12..=20), (2, 10..=14)],
            &[],
            &[(2, &[(1, mid(10))])],
        );
        assert!(p.steps.is_empty());
        assert_eq!(p.end, Some((1, 9)));
        assert_eq!(timelines(&p.branches), vec![2]);
    }

    #[test]
    fn lineages_and_the_histories_that_part_from_a_backups() {
        // 1 -> 2 (in 10) -> 4 (in 20); 3 forked from 2 in 12; 5 from 1 in 6; 6 from 3.
        let mut histories = BTreeMap::new();
        for (tli, forks) in [
            (2, vec![(1, mid(10))]),
            (3, vec![(1, mid(10)), (2, mid(12))]),
            (4, vec![(1, mid(10)), (2, mid(20))]),
            (5, vec![(1, mid(6))]),
            (6, vec![(1, mid(10)), (2, mid(12)), (3, mid(13))]),
        ] {
            histories.insert(
                tli,
                History {
                    timeline: tli,
                    forks,
                },
            );
        }
        let line = lineage(4, &histories).unwrap();
        assert_eq!(line, vec![(1, mid(10)), (2, mid(20)), (4, u64::MAX)]);
        assert!(on_lineage(&line, 2, mid(15)));
        assert!(!on_lineage(&line, 2, mid(21)), "ends after 4 forked off");
        assert!(!on_lineage(&line, 3, mid(13)));
        assert_eq!(lineage(1, &histories), Some(vec![(1, u64::MAX)]));
        assert_eq!(lineage(7, &histories), None, "no history file");

        let partials = BTreeMap::from([(2, BTreeSet::from([20]))]);
        let found = |tli, stop| -> Vec<(u32, bool, Vec<u32>, u64)> {
            rivals(tli, stop, &histories)
                .into_iter()
                .map(|r| {
                    let from = r.from_segno(SEG, &partials);
                    (r.fork.timeline, r.parent_side, r.timelines, from)
                })
                .collect()
        };
        // A backup on 4: the parents 1 and 2 past their forks (2's fork segment is covered by
        // the .partial), and the branches 5 (off 1) and 3 with its child 6 (off 2).
        assert_eq!(
            found(4, mid(22)),
            vec![
                (2, true, vec![1], 10),
                (3, false, vec![3, 6], 0),
                (4, true, vec![2], 21),
                (5, false, vec![5], 0),
            ]
        );
        // A backup on 1 that ended in 8: only 5 forked before it; 2 and 3 are follow's.
        assert_eq!(found(1, mid(8)), vec![(5, false, vec![5], 0)]);
        assert!(found(1, mid(5)).is_empty());
    }

    #[test]
    fn a_fork_on_a_segment_boundary_is_never_followed() {
        // A drill that replayed all of segment 9 forks at the first byte of 10, as a failover
        // there would: nothing tells them apart.
        let boundary: Forks = &[(2, &[(1, 10 * SEG)])];
        assert!(path(&[(1, 3..=9), (2, 10..=11)], &[], boundary)
            .steps
            .is_empty());
        assert!(path(&[(1, 3..=8), (2, 10..=11)], &[], boundary)
            .steps
            .is_empty());
    }
}
