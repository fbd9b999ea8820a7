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
//! arrival: the same order [`crate::store::replay::deadline_order`] gives from the job files
//! alone, so the queue can still be rebuilt from them.

use std::collections::{BTreeSet, HashMap};

use crate::config::Order;
use crate::job::{JobId, Timestamp};
use crate::store::FIRST_QUEUED_RANK;
use crate::store::replay::deadline_second;

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

#[derive(Debug)]
pub struct Queue {
    order: Order,
    queued: BTreeSet<(u64, JobId)>,
    running: BTreeSet<(u64, JobId)>,
    /// Where each job is: its rank and whether it runs.
    place: HashMap<JobId, (u64, bool)>,
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

    pub fn insert_queued(&mut self, rank: u64, id: JobId) {
        self.remove(id);
        self.queued.insert((rank, id));
        self.place.insert(id, (rank, false));
        if (FIRST_QUEUED_RANK..DEADLINE_RANKS).contains(&rank) {
            self.next_rank = self.next_rank.max(rank + 1);
        }
    }

    /// Under `order = "deadline"`, ranks the queued jobs that never started by deadline, at
    /// boot: `sorted` is every queued job in deadline order with its deadline, as
    /// [`crate::store::replay::deadline_order`] gives it. Jobs that were running keep their
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
                self.insert_queued(rank, id);
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
            }
        }
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
            q.insert_queued(rank, id(n));
        }
        let first = q.next_start_rank();
        q.start(id(2), first);
        let second = q.next_start_rank();
        q.start(id(1), second);
        assert_eq!(q.running(), vec![id(2), id(1)]);
        assert_eq!(q.queued(), vec![id(3), id(4)], "fifo ignores deadlines");
        // The later start is interrupted first; the order is still by start.
        let r1 = q.requeue_rank(id(1));
        q.insert_queued(r1, id(1));
        let r2 = q.requeue_rank(id(2));
        q.insert_queued(r2, id(2));
        assert_eq!(q.queued(), vec![id(2), id(1), id(3), id(4)]);
        assert!(q.running().is_empty());
        q.remove(id(3));
        assert_eq!(q.queued(), vec![id(2), id(1), id(4)]);
        let rank = q.arrival_rank(None);
        q.insert_queued(rank, id(5));
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
            q.insert_queued(rank, id(n));
        }
        assert_eq!(q.queued(), vec![id(3), id(4), id(6), id(2), id(1), id(5)]);
        // An offer looks at the place its job would get without taking it.
        assert_eq!(
            q.peek_arrival_rank(Some(at(200))),
            q.peek_arrival_rank(Some(at(200)))
        );
        let rank = q.arrival_rank(Some(at(200)));
        q.insert_queued(rank, id(7));
        assert_eq!(q.queued()[..4], [id(3), id(4), id(7), id(6)]);
        // A job a graceful stop interrupted goes before every deadline.
        let start = q.next_start_rank();
        q.start(id(2), start);
        let back = q.requeue_rank(id(2));
        q.insert_queued(back, id(2));
        assert_eq!(q.queued()[0], id(2));
    }

    #[test]
    fn at_boot_the_deadline_order_keeps_interrupted_jobs_first() {
        let mut q = Queue::new(Order::Deadline);
        // The replay order as the store placed it: the crash-interrupted job 9 first.
        for (i, n) in [9, 1, 2, 3].into_iter().enumerate() {
            q.insert_queued(FIRST_QUEUED_RANK + i as u64, id(n));
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
        q.insert_queued(rank, id(4));
        assert_eq!(q.queued(), vec![id(9), id(3), id(4), id(1), id(2)]);
        // Under fifo, nothing moves at boot.
        let mut fifo = Queue::new(Order::Fifo);
        fifo.insert_queued(FIRST_QUEUED_RANK, id(1));
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
}
