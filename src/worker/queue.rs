//! The queue order: running jobs by start, queued jobs by rank.
//!
//! Ranks are what the store writes `queue.json` from, so they follow one scheme everywhere:
//! a queued job's rank is [`FIRST_QUEUED_RANK`] plus its arrival number (replay order at
//! boot, then submissions), and a running job's rank is its start number, counted from 0.
//! A job interrupted by a graceful stop goes back to the queue at its start number, below
//! every arrival rank, which puts the interrupted jobs first and in the order they started.

use std::collections::{BTreeSet, HashMap};

use crate::job::JobId;
use crate::store::FIRST_QUEUED_RANK;

#[derive(Debug)]
pub struct Queue {
    queued: BTreeSet<(u64, JobId)>,
    running: BTreeSet<(u64, JobId)>,
    /// Where each job is: its rank and whether it runs.
    place: HashMap<JobId, (u64, bool)>,
    next_rank: u64,
    next_start: u64,
}

impl Default for Queue {
    fn default() -> Queue {
        Queue {
            queued: BTreeSet::new(),
            running: BTreeSet::new(),
            place: HashMap::new(),
            next_rank: FIRST_QUEUED_RANK,
            next_start: 0,
        }
    }
}

impl Queue {
    /// The rank for the next arrival.
    pub fn next_rank(&mut self) -> u64 {
        let rank = self.next_rank;
        self.next_rank += 1;
        rank
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
        self.next_rank = self.next_rank.max(rank + 1);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> JobId {
        JobId::from_uuid(uuid::Uuid::from_u128(n))
    }

    #[test]
    fn arrivals_queue_in_order_and_interrupted_jobs_return_first_in_start_order() {
        let mut q = Queue::default();
        for n in 1..=4 {
            let rank = q.next_rank();
            q.insert_queued(rank, id(n));
        }
        let first = q.next_start_rank();
        q.start(id(2), first);
        let second = q.next_start_rank();
        q.start(id(1), second);
        assert_eq!(q.running(), vec![id(2), id(1)]);
        assert_eq!(q.queued(), vec![id(3), id(4)]);
        // The later start is interrupted first; the order is still by start.
        let r1 = q.requeue_rank(id(1));
        q.insert_queued(r1, id(1));
        let r2 = q.requeue_rank(id(2));
        q.insert_queued(r2, id(2));
        assert_eq!(q.queued(), vec![id(2), id(1), id(3), id(4)]);
        assert!(q.running().is_empty());
        q.remove(id(3));
        assert_eq!(q.queued(), vec![id(2), id(1), id(4)]);
        let rank = q.next_rank();
        q.insert_queued(rank, id(5));
        assert_eq!(q.queued(), vec![id(2), id(1), id(4), id(5)]);
    }
}
