//! Which waiting job starts next ([`choose`]), and when each waiting job is expected to start
//! and finish ([`forecast`]): pure functions of the queue, the free slots and GPUs, and the
//! time, so that they are tested without a runtime.
//!
//! [`forecast`] plays [`choose`] forward over the expected ends of the running jobs, so an
//! estimate follows the same rules as the real starts: strict queue order or backfill, GPUs
//! taken lowest first, a job whose deadline has passed failed instead of started, a
//! reservation's place held for the job that is to claim it.
//!
//! The expected run time is the estimate's main assumption. A job with a budget is expected to
//! use all of it: it ends at its deadline, where the executor stops it in any case. A job
//! without one is taken to run for `[worker] assumed_duration`.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::hash::Hash;
use std::time::Duration;

use crate::job::Timestamp;

/// A job waiting to start, or the place a reservation holds for one.
#[derive(Clone, Debug)]
pub struct Waiting<K> {
    pub key: K,
    /// GPUs it takes; 0 without GPU accounting.
    pub gpus: usize,
    pub deadline: Option<Timestamp>,
    /// The job is here and can start. False for a reservation whose job has not arrived: it
    /// holds what its job would take, and nothing starts it.
    pub present: bool,
}

/// What is free now, and the rules.
#[derive(Clone, Copy, Debug)]
pub struct Capacity<'a> {
    /// Trainers that may still start (`max_concurrent` minus those running or starting).
    pub slots: usize,
    /// Free GPUs, in the order they are handed out.
    pub free_gpus: &'a [u32],
    /// GPUs configured; 0: no GPU accounting.
    pub total_gpus: usize,
    /// Whether a job may start ahead of an earlier one that does not fit yet.
    pub backfill: bool,
}

/// The next thing to do with the queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice<K> {
    /// Start this job on these GPUs.
    Start { key: K, gpus: Vec<u32> },
    /// This job's deadline has passed: it fails instead of starting.
    OutOfTime(K),
    /// This job needs more GPUs than are configured: it can never start.
    TooBig(K),
    /// Nothing can start now.
    Wait,
}

/// The first thing to do with `waiting` (in queue order) at `now`.
///
/// Strict order stops at the first job that does not fit; backfill passes it. A reservation
/// that fits takes its slot and GPUs out of what later jobs may have, as its job would if it
/// were here; one that does not fit blocks like a waiting job. A job is failed for lack of
/// time or GPUs when the scan reaches it, so a hopeless job does not block the queue.
pub fn choose<K: Copy>(
    waiting: impl IntoIterator<Item = Waiting<K>>,
    now: Timestamp,
    capacity: Capacity<'_>,
) -> Choice<K> {
    let mut slots = capacity.slots;
    let mut free = capacity.free_gpus;
    for entry in waiting {
        if slots == 0 {
            break;
        }
        let out_of_time = entry.deadline.is_some_and(|d| d <= now);
        let too_big = entry.gpus > capacity.total_gpus;
        if !entry.present {
            // A reservation for a job that could not start anyway holds nothing.
            if out_of_time || too_big {
                continue;
            }
        } else if out_of_time {
            return Choice::OutOfTime(entry.key);
        } else if too_big {
            return Choice::TooBig(entry.key);
        }
        if entry.gpus <= free.len() {
            if entry.present {
                return Choice::Start {
                    key: entry.key,
                    gpus: free[..entry.gpus].to_vec(),
                };
            }
            slots -= 1;
            free = &free[entry.gpus..];
            continue;
        }
        if !capacity.backfill {
            break;
        }
    }
    Choice::Wait
}

/// A trainer that holds a slot and GPUs until `ends`.
#[derive(Clone, Debug)]
pub struct Busy {
    pub ends: Timestamp,
    pub gpus: Vec<u32>,
}

/// What an estimate is made from besides the jobs.
#[derive(Clone, Debug)]
pub struct Outlook {
    pub now: Timestamp,
    /// `max_concurrent`.
    pub slots: usize,
    /// The configured GPUs; empty: no GPU accounting.
    pub gpus: Vec<u32>,
    pub backfill: bool,
    /// How long a job without a budget is taken to run.
    pub assumed: Duration,
}

/// What is expected of one waiting job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forecast {
    /// It starts at `start` and ends by `finish`.
    Starts { start: Timestamp, finish: Timestamp },
    /// Its deadline passes before its turn: at `at` it fails without starting.
    OutOfTime { at: Timestamp },
    /// It never starts here: the queue is paused, or it needs more GPUs than there are.
    Never,
}

/// Plays the queue forward from `outlook.now`: `running` end when they are expected to, and
/// `waiting` (in queue order, reservations included as the jobs they stand for) start as
/// [`choose`] decides. With `until`, it stops once that job's forecast is known, and the
/// jobs after it may have none.
pub fn forecast<K: Copy + Eq + Hash>(
    outlook: &Outlook,
    running: &[Busy],
    waiting: &[Waiting<K>],
    until: Option<K>,
) -> HashMap<K, Forecast> {
    // The simulation's own keys are positions in `waiting`.
    let entries: Vec<Waiting<usize>> = waiting
        .iter()
        .enumerate()
        .map(|(i, w)| Waiting {
            key: i,
            gpus: w.gpus,
            deadline: w.deadline,
            present: true,
        })
        .collect();
    let until = until.and_then(|key| waiting.iter().position(|w| w.key == key));
    let mut result: Vec<Option<Forecast>> = vec![None; entries.len()];
    let mut left = entries.len();
    let mut head = 0;

    let mut slots = outlook.slots.saturating_sub(running.len());
    let mut free: BTreeSet<u32> = outlook.gpus.iter().copied().collect();
    let mut ends: BinaryHeap<Reverse<(Timestamp, usize)>> = BinaryHeap::new();
    let mut holds: Vec<Vec<u32>> = Vec::new();
    for busy in running {
        for gpu in &busy.gpus {
            free.remove(gpu);
        }
        ends.push(Reverse((busy.ends.max(outlook.now), holds.len())));
        holds.push(busy.gpus.clone());
    }

    let mut now = outlook.now;
    let assumed = chrono::Duration::from_std(outlook.assumed).unwrap_or(chrono::Duration::MAX);
    'time: loop {
        loop {
            while head < entries.len() && result[head].is_some() {
                head += 1;
            }
            let free_gpus: Vec<u32> = free.iter().copied().collect();
            let capacity = Capacity {
                slots,
                free_gpus: &free_gpus,
                total_gpus: outlook.gpus.len(),
                backfill: outlook.backfill,
            };
            let pending = entries[head..]
                .iter()
                .filter(|w| result[w.key].is_none())
                .cloned();
            let (i, forecast) = match choose(pending, now, capacity) {
                Choice::Start { key, gpus } => {
                    let finish = entries[key]
                        .deadline
                        .unwrap_or_else(|| now.checked_add_signed(assumed).unwrap_or(now));
                    slots -= 1;
                    for gpu in &gpus {
                        free.remove(gpu);
                    }
                    ends.push(Reverse((finish, holds.len())));
                    holds.push(gpus);
                    (key, Forecast::Starts { start: now, finish })
                }
                Choice::OutOfTime(key) => (key, Forecast::OutOfTime { at: now }),
                Choice::TooBig(key) => (key, Forecast::Never),
                Choice::Wait => break,
            };
            result[i] = Some(forecast);
            left -= 1;
            if until == Some(i) {
                break 'time;
            }
        }
        if left == 0 {
            break;
        }
        // The next end frees a slot and its GPUs; ends at the same moment free theirs too.
        let Some(Reverse((end, index))) = ends.pop() else {
            break;
        };
        now = now.max(end);
        let mut freed = vec![index];
        while let Some(Reverse((next, index))) = ends.peek().copied()
            && next <= now
        {
            ends.pop();
            freed.push(index);
        }
        for index in freed {
            slots += 1;
            free.extend(holds[index].drain(..));
        }
    }
    let finished = left == 0 || until.is_none_or(|i| result[i].is_none());
    waiting
        .iter()
        .zip(result)
        .filter_map(|(w, forecast)| match forecast {
            Some(forecast) => Some((w.key, forecast)),
            // Left when nothing will ever end to let it start.
            None if finished => Some((w.key, Forecast::Never)),
            None => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(minutes: i64) -> Timestamp {
        chrono::DateTime::from_timestamp(1_900_000_000, 0).unwrap()
            + chrono::Duration::minutes(minutes)
    }

    fn job(key: u32, gpus: usize, deadline: Option<i64>) -> Waiting<u32> {
        Waiting {
            key,
            gpus,
            deadline: deadline.map(t),
            present: true,
        }
    }

    fn reservation(key: u32, gpus: usize) -> Waiting<u32> {
        Waiting {
            present: false,
            ..job(key, gpus, Some(600))
        }
    }

    fn capacity(
        slots: usize,
        free_gpus: &[u32],
        total_gpus: usize,
        backfill: bool,
    ) -> Capacity<'_> {
        Capacity {
            slots,
            free_gpus,
            total_gpus,
            backfill,
        }
    }

    #[test]
    fn strict_order_waits_for_the_head_and_backfill_passes_it() {
        let queue = [job(1, 2, None), job(2, 1, None)];
        assert_eq!(
            choose(queue.clone(), t(0), capacity(2, &[3], 4, false)),
            Choice::Wait
        );
        assert_eq!(
            choose(queue.clone(), t(0), capacity(2, &[3], 4, true)),
            Choice::Start {
                key: 2,
                gpus: vec![3]
            }
        );
        assert_eq!(
            choose(queue.clone(), t(0), capacity(2, &[1, 3], 4, false)),
            Choice::Start {
                key: 1,
                gpus: vec![1, 3]
            }
        );
        assert_eq!(
            choose(queue.clone(), t(0), capacity(0, &[1, 3], 4, false)),
            Choice::Wait,
            "no slot"
        );
    }

    #[test]
    fn hopeless_jobs_are_failed_when_reached_instead_of_blocking() {
        let late = [job(1, 1, Some(10)), job(2, 1, None)];
        assert_eq!(
            choose(late.clone(), t(10), capacity(1, &[0], 1, false)),
            Choice::OutOfTime(1),
            "a deadline reached is gone"
        );
        assert_eq!(
            choose(late.clone(), t(9), capacity(1, &[0], 1, false)),
            Choice::Start {
                key: 1,
                gpus: vec![0]
            }
        );
        let big = [job(1, 3, None), job(2, 1, None)];
        assert_eq!(
            choose(big.clone(), t(0), capacity(1, &[0], 2, false)),
            Choice::TooBig(1)
        );
    }

    #[test]
    fn a_reservation_holds_its_place_for_its_job() {
        let queue = [reservation(9, 0), job(2, 0, None)];
        // One slot: the reservation has it, so the job behind waits.
        assert_eq!(
            choose(queue.clone(), t(0), capacity(1, &[], 0, false)),
            Choice::Wait
        );
        // Two slots: the job behind takes the one the reservation leaves.
        assert_eq!(
            choose(queue.clone(), t(0), capacity(2, &[], 0, false)),
            Choice::Start {
                key: 2,
                gpus: vec![]
            }
        );
        // GPUs: the reservation holds the lowest free one.
        let queue = [reservation(9, 1), job(2, 1, None)];
        assert_eq!(
            choose(queue.clone(), t(0), capacity(2, &[4, 5], 2, false)),
            Choice::Start {
                key: 2,
                gpus: vec![5]
            }
        );
        // A reservation that does not fit blocks strict order; backfill passes it.
        let big = [reservation(9, 2), job(2, 1, None)];
        assert_eq!(
            choose(big.clone(), t(0), capacity(2, &[4], 2, false)),
            Choice::Wait
        );
        assert_eq!(
            choose(big.clone(), t(0), capacity(2, &[4], 2, true)),
            Choice::Start {
                key: 2,
                gpus: vec![4]
            }
        );
        // A reservation whose deadline has passed holds nothing.
        let stale = [reservation(9, 0), job(2, 0, None)];
        assert_eq!(
            choose(stale.clone(), t(600), capacity(1, &[], 0, false)),
            Choice::Start {
                key: 2,
                gpus: vec![]
            }
        );
    }

    fn outlook(slots: usize, gpus: &[u32], backfill: bool) -> Outlook {
        Outlook {
            now: t(0),
            slots,
            gpus: gpus.to_vec(),
            backfill,
            assumed: Duration::from_secs(3600),
        }
    }

    fn starts(start: i64, finish: i64) -> Forecast {
        Forecast::Starts {
            start: t(start),
            finish: t(finish),
        }
    }

    #[test]
    fn one_slot_runs_the_queue_end_to_end_on_budgets_and_the_assumed_duration() {
        let running = [Busy {
            ends: t(30),
            gpus: vec![],
        }];
        // 1 has a budget to minute 120; 2 has none (60 minutes assumed); 3's deadline comes
        // before its turn.
        let queue = [job(1, 0, Some(120)), job(2, 0, None), job(3, 0, Some(150))];
        let f = forecast(&outlook(1, &[], false), &running, &queue, None);
        assert_eq!(f[&1], starts(30, 120));
        assert_eq!(f[&2], starts(120, 180));
        assert_eq!(f[&3], Forecast::OutOfTime { at: t(180) });
    }

    #[test]
    fn gpu_slots_decide_who_starts_when() {
        // Two GPUs, both held until minute 60 by one running job; three slots.
        let running = [Busy {
            ends: t(60),
            gpus: vec![0, 1],
        }];
        let queue = [
            job(1, 1, Some(90)),
            job(2, 2, Some(200)),
            job(3, 1, Some(100)),
        ];
        let strict = forecast(&outlook(3, &[0, 1], false), &running, &queue, None);
        assert_eq!(strict[&1], starts(60, 90));
        // 2 needs both GPUs: it waits for 1 to end, and 3 waits behind it.
        assert_eq!(strict[&2], starts(90, 200));
        assert_eq!(strict[&3], Forecast::OutOfTime { at: t(200) });
        let backfill = forecast(&outlook(3, &[0, 1], true), &running, &queue, None);
        assert_eq!(backfill[&1], starts(60, 90));
        assert_eq!(backfill[&3], starts(60, 100), "3 fills the idle GPU");
        assert_eq!(backfill[&2], starts(100, 200));
    }

    #[test]
    fn a_paused_queue_or_a_job_too_big_never_starts() {
        let queue = [job(1, 0, None)];
        let f = forecast(&outlook(0, &[], false), &[], &queue, None);
        assert_eq!(f[&1], Forecast::Never);
        let queue = [job(1, 3, None), job(2, 1, None)];
        let f = forecast(&outlook(1, &[0, 1], false), &[], &queue, None);
        assert_eq!(f[&1], Forecast::Never);
        assert_eq!(f[&2], starts(0, 60));
    }

    #[test]
    fn an_overdue_running_job_is_taken_to_end_now_and_until_stops_early() {
        let running = [Busy {
            ends: t(-5),
            gpus: vec![],
        }];
        let queue = [job(1, 0, None), job(2, 0, None), job(3, 0, None)];
        let f = forecast(&outlook(1, &[], false), &running, &queue, Some(2));
        assert_eq!(f[&1], starts(0, 60));
        assert_eq!(f[&2], starts(60, 120));
        assert!(
            !f.contains_key(&3),
            "not looked at: the forecast stopped at 2"
        );
    }
}
