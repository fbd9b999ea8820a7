//! The queue order: running jobs by start, queued jobs by rank.
//!
//! Ranks are what the store writes `queue.json` from, so they follow one scheme everywhere,
//! and `queue.json` lists the queued jobs in the order they will start:
//!
//! | ranks | who |
//! |---|---|
//! | `[0, 2^62)` | start numbers: running jobs, and jobs a graceful stop put back in the queue |
//! | `[2^62, 2^63)` | `order = "fifo"`: [`FIRST_QUEUED_RANK`] plus the arrival number (replay order at boot, then submissions); under `"deadline"`, only the jobs a crash interrupted, at boot |
//! | `[2^63, 2^63 + 2^62)` | `order = "deadline"`, jobs with a deadline: its Unix second in the high bits, the arrival number below |
//! | `[2^63 + 2^62, 2^64)` | `order = "deadline"`, jobs without a deadline: by arrival number |
//!
//! A job interrupted by a graceful stop goes back to the queue at its start number, and a job
//! a crash interrupted keeps its place at the head of the replay order, so the interrupted
//! jobs start first in either order. Deadline ranks compare deadlines to the second, then
//! arrival: the same order [`crate::store::order::deadline_order`] gives from the job files
//! alone, so the queue can still be rebuilt from them.
//!
//! The queued jobs are also indexed by the GPUs they take and by deadline, so that a backfill
//! scan can skip the jobs it would pass over anyway ([`Queue::backfill_candidates`]) instead
//! of walking the whole queue at every turn of the worker's loop.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::iter::Peekable;

use crate::config::Order;
use crate::job::{JobId, Timestamp};
use crate::store::FIRST_QUEUED_RANK;
use crate::store::order::deadline_second;

/// The first rank of a job with a deadline under `order = "deadline"`.
const DEADLINE_RANKS: u64 = 1 << 63;
/// The first rank of a job without a deadline under `order = "deadline"`.
const NO_DEADLINE_RANKS: u64 = (1 << 63) | (1 << 62);
/// Bits for the arrival number below a deadline's second. 2^29 arrivals in one run of the
/// daemon is far beyond any GPU box; past it, jobs whose deadlines fall in the same second
/// are ordered by id instead of arrival.
const SEQ_BITS: u32 = 29;
/// Bits for a deadline's Unix second: enough until the year 2242.
const SECOND_BITS: u32 = 33;

/// What the start policy asks of a queued job besides its place, fixed when the job is
/// accepted: the GPUs it takes (0 without GPU accounting) and its deadline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    pub gpus: usize,
    pub deadline: Option<Timestamp>,
}

#[derive(Debug)]
pub struct Queue {
    order: Order,
    queued: BTreeSet<(u64, JobId)>,
    running: BTreeSet<(u64, JobId)>,
    /// Where each job is: its rank and whether it runs.
    place: HashMap<JobId, (u64, bool)>,
    /// What each queued job needs, and the queued jobs by the GPUs they take and by deadline:
    /// the indexes of [`Queue::backfill_candidates`].
    needs: HashMap<JobId, Needs>,
    by_gpus: BTreeMap<usize, BTreeSet<(u64, JobId)>>,
    by_deadline: BTreeSet<(Timestamp, u64, JobId)>,
    /// The next FIFO rank.
    next_rank: u64,
    next_start: u64,
    /// The next arrival number under `order = "deadline"`.
    next_seq: u64,
}

impl Queue {
    pub fn new(order: Order) -> Queue {
        Queue {
            order,
            queued: BTreeSet::new(),
            running: BTreeSet::new(),
            place: HashMap::new(),
            needs: HashMap::new(),
            by_gpus: BTreeMap::new(),
            by_deadline: BTreeSet::new(),
            next_rank: FIRST_QUEUED_RANK,
            next_start: 0,
            next_seq: 0,
        }
    }

    /// The rank for a job arriving now with `deadline`.
    pub fn arrival_rank(&mut self, deadline: Option<Timestamp>) -> u64 {
        let rank = self.peek_arrival_rank(deadline);
        match self.order {
            Order::Fifo => self.next_rank += 1,
            Order::Deadline => self.next_seq += 1,
        }
        rank
    }

    /// The rank [`Queue::arrival_rank`] would give, without taking it: where an offered job
    /// would stand.
    pub fn peek_arrival_rank(&self, deadline: Option<Timestamp>) -> u64 {
        match self.order {
            Order::Fifo => self.next_rank,
            Order::Deadline => deadline_rank(deadline.map(|d| deadline_second(&d)), self.next_seq),
        }
    }

    /// The rank for the next start.
    pub fn next_start_rank(&mut self) -> u64 {
        let rank = self.next_start;
        self.next_start += 1;
        rank
    }

    pub fn insert_queued(&mut self, rank: u64, id: JobId, needs: Needs) {
        self.remove(id);
        self.queued.insert((rank, id));
        self.place.insert(id, (rank, false));
        self.needs.insert(id, needs);
        self.by_gpus
            .entry(needs.gpus)
            .or_default()
            .insert((rank, id));
        if let Some(deadline) = needs.deadline {
            self.by_deadline.insert((deadline, rank, id));
        }
        if (FIRST_QUEUED_RANK..DEADLINE_RANKS).contains(&rank) {
            self.next_rank = self.next_rank.max(rank + 1);
        }
    }

    /// Under `order = "deadline"`, ranks the queued jobs that never started by deadline, at
    /// boot: `sorted` is every queued job in deadline order with its deadline, as
    /// [`crate::store::order::deadline_order`] gives it. Jobs that were running keep their
    /// ranks, which are below every deadline rank. Returns the jobs whose rank changed.
    pub fn rank_by_deadline(
        &mut self,
        sorted: impl IntoIterator<Item = (JobId, Option<Timestamp>, bool)>,
    ) -> Vec<(JobId, u64)> {
        let mut moved = Vec::new();
        if self.order != Order::Deadline {
            return moved;
        }
        for (id, deadline, interrupted) in sorted {
            if interrupted {
                continue;
            }
            let rank = self.arrival_rank(deadline);
            if self.place.get(&id) != Some(&(rank, false)) {
                // Every job here is queued already, so it has its needs; the default (no
                // GPUs, no deadline) would only make it a candidate of every scan.
                let needs = self.needs.get(&id).copied().unwrap_or_default();
                self.insert_queued(rank, id, needs);
                moved.push((id, rank));
            }
        }
        moved
    }

    /// Moves a queued job to the running list at start rank `rank`.
    pub fn start(&mut self, id: JobId, rank: u64) {
        self.remove(id);
        self.running.insert((rank, id));
        self.place.insert(id, (rank, true));
    }

    /// The queued rank a running job returns to when a graceful stop interrupts it.
    pub fn requeue_rank(&self, id: JobId) -> u64 {
        match self.place.get(&id) {
            Some((rank, true)) => *rank,
            // Not running: back to the end, which cannot happen for an interrupted job.
            _ => self.next_rank,
        }
    }

    /// A running job's start rank.
    pub fn running_rank(&self, id: JobId) -> Option<u64> {
        match self.place.get(&id) {
            Some((rank, true)) => Some(*rank),
            _ => None,
        }
    }

    pub fn remove(&mut self, id: JobId) {
        if let Some((rank, running)) = self.place.remove(&id) {
            if running {
                self.running.remove(&(rank, id));
            } else {
                self.queued.remove(&(rank, id));
                let needs = self.needs.remove(&id).unwrap_or_default();
                if let Some(same) = self.by_gpus.get_mut(&needs.gpus) {
                    same.remove(&(rank, id));
                    if same.is_empty() {
                        self.by_gpus.remove(&needs.gpus);
                    }
                }
                if let Some(deadline) = needs.deadline {
                    self.by_deadline.remove(&(deadline, rank, id));
                }
            }
        }
    }

    /// The queued jobs, in queue order, that a backfill scan with `free` GPUs free (of
    /// `total`) could stop at by `now`: those that may fit (at most `free` GPUs), those that
    /// can never fit (more than `total`), and those whose deadline has passed. Backfill passes
    /// over every other job without effect ([`super::schedule::choose`]), so a scan of these
    /// alone decides the same, in time that does not grow with the queue's length.
    pub fn backfill_candidates(
        &self,
        free: usize,
        total: usize,
        now: Timestamp,
    ) -> impl Iterator<Item = (u64, JobId)> + '_ {
        let mut overdue: Vec<(u64, JobId)> = self
            .by_deadline
            .iter()
            .take_while(|(deadline, _, _)| *deadline <= now)
            .map(|(_, rank, id)| (*rank, *id))
            .collect();
        overdue.sort_unstable();
        type Source<'a> = Peekable<Box<dyn Iterator<Item = (u64, JobId)> + 'a>>;
        let mut sources: Vec<Source<'_>> = self
            .by_gpus
            .iter()
            .filter(|(gpus, _)| **gpus <= free || **gpus > total)
            .map(|(_, same)| {
                (Box::new(same.iter().copied()) as Box<dyn Iterator<Item = _>>).peekable()
            })
            .collect();
        sources.push((Box::new(overdue.into_iter()) as Box<dyn Iterator<Item = _>>).peekable());
        // Merged by rank; an overdue job that may also fit comes from two sources, once.
        let mut last = None;
        std::iter::from_fn(move || {
            loop {
                let (first, _) = sources
                    .iter_mut()
                    .enumerate()
                    .filter_map(|(i, source)| source.peek().map(|item| (i, *item)))
                    .min_by_key(|(_, item)| *item)?;
                let item = sources[first].next()?;
                if last != Some(item) {
                    last = Some(item);
                    return Some(item);
                }
            }
        })
    }

    /// The queued jobs in the order they start, with their ranks.
    pub fn queued_ranked(&self) -> impl Iterator<Item = (u64, JobId)> + '_ {
        self.queued.iter().copied()
    }

    pub fn queued_iter(&self) -> impl Iterator<Item = JobId> + '_ {
        self.queued.iter().map(|(_, id)| *id)
    }

    pub fn queued(&self) -> Vec<JobId> {
        self.queued_iter().collect()
    }

    pub fn running(&self) -> Vec<JobId> {
        self.running.iter().map(|(_, id)| *id).collect()
    }
}

/// The rank of a job under `order = "deadline"`: by its deadline's Unix second, then `seq`;
/// jobs without a deadline after all of those, by `seq`.
fn deadline_rank(second: Option<i64>, seq: u64) -> u64 {
    match second {
        Some(second) => {
            let second = second.clamp(0, (1 << SECOND_BITS) - 1) as u64;
            DEADLINE_RANKS + (second << SEQ_BITS) + seq.min((1 << SEQ_BITS) - 1)
        }
        None => NO_DEADLINE_RANKS + seq.min((1 << 62) - 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> JobId {
        JobId::from_uuid(uuid::Uuid::from_u128(n))
    }

    fn at(seconds: i64) -> Timestamp {
        chrono::DateTime::from_timestamp(1_900_000_000 + seconds, 0).unwrap()
    }

    #[test]
    fn arrivals_queue_in_order_and_interrupted_jobs_return_first_in_start_order() {
        let mut q = Queue::new(Order::Fifo);
        for n in 1..=4 {
            let rank = q.arrival_rank(Some(at(100 - n as i64)));
            q.insert_queued(rank, id(n), Needs::default());
        }
        let first = q.next_start_rank();
        q.start(id(2), first);
        let second = q.next_start_rank();
        q.start(id(1), second);
        assert_eq!(q.running(), vec![id(2), id(1)]);
        assert_eq!(q.queued(), vec![id(3), id(4)], "fifo ignores deadlines");
        // The later start is interrupted first; the order is still by start.
        let r1 = q.requeue_rank(id(1));
        q.insert_queued(r1, id(1), Needs::default());
        let r2 = q.requeue_rank(id(2));
        q.insert_queued(r2, id(2), Needs::default());
        assert_eq!(q.queued(), vec![id(2), id(1), id(3), id(4)]);
        assert!(q.running().is_empty());
        q.remove(id(3));
        assert_eq!(q.queued(), vec![id(2), id(1), id(4)]);
        let rank = q.arrival_rank(None);
        q.insert_queued(rank, id(5), Needs::default());
        assert_eq!(q.queued(), vec![id(2), id(1), id(4), id(5)]);
    }

    #[test]
    fn deadline_order_puts_earlier_deadlines_first_and_jobs_without_one_last() {
        let mut q = Queue::new(Order::Deadline);
        let arrivals = [
            (1, None),
            (2, Some(at(500))),
            (3, Some(at(100))),
            // The same second as 3, later: behind it.
            (4, Some(at(100) + chrono::Duration::milliseconds(10))),
            (5, None),
            (6, Some(at(300))),
        ];
        for (n, deadline) in arrivals {
            let rank = q.arrival_rank(deadline);
            q.insert_queued(rank, id(n), Needs::default());
        }
        assert_eq!(q.queued(), vec![id(3), id(4), id(6), id(2), id(1), id(5)]);
        // An offer looks at the place its job would get without taking it.
        assert_eq!(
            q.peek_arrival_rank(Some(at(200))),
            q.peek_arrival_rank(Some(at(200)))
        );
        let rank = q.arrival_rank(Some(at(200)));
        q.insert_queued(rank, id(7), Needs::default());
        assert_eq!(q.queued()[..4], [id(3), id(4), id(7), id(6)]);
        // A job a graceful stop interrupted goes before every deadline.
        let start = q.next_start_rank();
        q.start(id(2), start);
        let back = q.requeue_rank(id(2));
        q.insert_queued(back, id(2), Needs::default());
        assert_eq!(q.queued()[0], id(2));
    }

    #[test]
    fn at_boot_the_deadline_order_keeps_interrupted_jobs_first() {
        let mut q = Queue::new(Order::Deadline);
        // The replay order as the store placed it: the crash-interrupted job 9 first.
        for (i, n) in [9, 1, 2, 3].into_iter().enumerate() {
            q.insert_queued(FIRST_QUEUED_RANK + i as u64, id(n), Needs::default());
        }
        let sorted = [
            (id(9), Some(at(900)), true),
            (id(3), Some(at(10)), false),
            (id(1), Some(at(20)), false),
            (id(2), None, false),
        ];
        let moved = q.rank_by_deadline(sorted);
        assert_eq!(moved.len(), 3, "the interrupted job keeps its rank");
        assert_eq!(q.queued(), vec![id(9), id(3), id(1), id(2)]);
        // Arrivals after boot come after the jobs of the same second that were there.
        let rank = q.arrival_rank(Some(at(10)));
        q.insert_queued(rank, id(4), Needs::default());
        assert_eq!(q.queued(), vec![id(9), id(3), id(4), id(1), id(2)]);
        // Under fifo, nothing moves at boot.
        let mut fifo = Queue::new(Order::Fifo);
        fifo.insert_queued(FIRST_QUEUED_RANK, id(1), Needs::default());
        assert!(
            fifo.rank_by_deadline([(id(1), Some(at(1)), false)])
                .is_empty()
        );
    }

    #[test]
    fn deadline_ranks_stay_in_their_bands() {
        assert!(deadline_rank(Some(0), 0) >= DEADLINE_RANKS);
        assert!(deadline_rank(Some(i64::MAX), u64::MAX) < NO_DEADLINE_RANKS);
        assert!(deadline_rank(Some(-5), 0) == deadline_rank(Some(0), 0));
        assert_eq!(deadline_rank(None, u64::MAX), u64::MAX);
        assert!(deadline_rank(Some(7), 3) < deadline_rank(Some(8), 0));
    }

    #[test]
    fn a_backfill_scan_of_the_candidates_decides_what_a_scan_of_the_whole_queue_does() {
        use crate::worker::schedule::{Capacity, Waiting, choose};
        // A small deterministic generator: the same cases every run.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |below: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % below
        };
        for case in 0..300 {
            let total = next(5) as usize;
            let mut q = Queue::new(if case % 2 == 0 {
                Order::Fifo
            } else {
                Order::Deadline
            });
            let mut needs = HashMap::new();
            for n in 0..next(40) as u128 {
                let gpus = if total == 0 {
                    0
                } else {
                    next(total as u64 + 2) as usize
                };
                let deadline = (next(3) > 0).then(|| at(next(100) as i64));
                let rank = q.arrival_rank(deadline);
                let need = Needs { gpus, deadline };
                q.insert_queued(rank, id(n), need);
                needs.insert(id(n), need);
                if next(6) == 0 {
                    q.remove(id(n));
                    needs.remove(&id(n));
                }
            }
            let free: Vec<u32> = (0..next(total as u64 + 1) as u32).collect();
            let now = at(next(120) as i64);
            let capacity = Capacity {
                slots: 1 + next(3) as usize,
                free_gpus: &free,
                total_gpus: total,
                backfill: true,
            };
            let waiting = |(_, id): (u64, JobId)| Waiting {
                key: id,
                gpus: needs[&id].gpus,
                deadline: needs[&id].deadline,
                present: true,
            };
            let whole = choose(q.queued_ranked().map(waiting), now, capacity);
            let candidates = q.backfill_candidates(free.len(), total, now);
            assert_eq!(
                choose(candidates.map(waiting), now, capacity),
                whole,
                "case {case}"
            );
        }
    }

    #[test]
    fn backfill_candidates_leave_out_the_jobs_that_fit_nowhere_in_time() {
        let mut q = Queue::new(Order::Fifo);
        let cases = [
            (1, 2, None),
            (2, 1, None),
            (3, 2, Some(at(5))),
            (4, 9, None),
            (5, 0, None),
            (6, 2, Some(at(50))),
        ];
        for (n, gpus, deadline) in cases {
            let rank = q.arrival_rank(deadline);
            q.insert_queued(rank, id(n), Needs { gpus, deadline });
        }
        fn ids(q: &Queue, free: usize, now: Timestamp) -> Vec<JobId> {
            q.backfill_candidates(free, 4, now)
                .map(|(_, id)| id)
                .collect()
        }
        // One GPU free at 10: the one-GPU job, the overdue one, the too-big one, the GPU-less.
        assert_eq!(ids(&q, 1, at(10)), vec![id(2), id(3), id(4), id(5)]);
        assert_eq!(ids(&q, 0, at(0)), vec![id(4), id(5)]);
        assert_eq!(
            ids(&q, 2, at(0)),
            vec![id(1), id(2), id(3), id(4), id(5), id(6)]
        );
        // Removed and started jobs leave the indexes too.
        q.remove(id(4));
        let start = q.next_start_rank();
        q.start(id(3), start);
        assert_eq!(ids(&q, 0, at(100)), vec![id(5), id(6)]);
    }
}
