//! The queue order both stores give back at boot: one recovery policy, whatever holds the
//! records (CONTRACT.md 6).
//!
//! Jobs that were running go first, in the order they had started (status Running, and
//! Queued jobs with a start time, which were running when an earlier crash or a graceful
//! stop interrupted them); then Queued jobs in the order the backend wrote down; then
//! Queued jobs it did not list, by `created_at`. Since each backend writes its order in
//! exactly that order, the queue rebuilt from the job records alone is the queue that was
//! lost.

use std::collections::{HashMap, HashSet};

use crate::job::{Job, JobId, Status, Timestamp};

/// The requeue order from the job records and the order a backend last wrote down
/// (`queue.json`'s lists, or the database's ranks): the ids listed as running and as
/// queued. With empty lists, the order the job records alone give. Listed ids without a
/// job are pushed to `missing`, once each.
pub fn requeue_order(
    jobs: &HashMap<JobId, Job>,
    listed_running: &[String],
    listed_queued: &[String],
    missing: &mut Vec<String>,
) -> Vec<JobId> {
    // Positions in queue.json; the first mention of an id wins.
    let mut running_pos: HashMap<JobId, usize> = HashMap::new();
    let mut queued_pos: HashMap<JobId, usize> = HashMap::new();
    let mut seen: HashSet<String> = HashSet::new();
    for (list, positions) in [
        (listed_running, &mut running_pos),
        (listed_queued, &mut queued_pos),
    ] {
        for (i, text) in list.iter().enumerate() {
            let known = text
                .parse::<JobId>()
                .ok()
                .filter(|id| jobs.contains_key(id));
            match known {
                Some(id) => {
                    positions.entry(id).or_insert(i);
                }
                None => {
                    if seen.insert(text.clone()) {
                        missing.push(text.clone());
                    }
                }
            }
        }
    }

    // Jobs that were running go first, in the order they had started: those still Running
    // on disk, and Queued ones with a start time, which were running when an earlier crash
    // or a graceful stop interrupted them. One group: a crash in the middle of the write
    // that requeues several of them leaves some of each, and their order must not change.
    let mut running: Vec<&Job> = jobs
        .values()
        .filter(|j| j.status == Status::Running || j.was_interrupted())
        .collect();
    running.sort_by_key(|j| {
        (
            j.started_at.is_none(),
            j.started_at,
            running_pos
                .get(&j.id)
                .or(queued_pos.get(&j.id))
                .copied()
                .unwrap_or(usize::MAX),
            j.created_at,
            j.id,
        )
    });

    let (mut listed, mut orphans): (Vec<&Job>, Vec<&Job>) = jobs
        .values()
        .filter(|j| j.status == Status::Queued && !j.was_interrupted())
        .partition(|j| queued_pos.contains_key(&j.id));
    listed.sort_by_key(|j| queued_pos[&j.id]);
    orphans.sort_by_key(|j| (j.created_at, j.id));

    running
        .into_iter()
        .chain(listed)
        .chain(orphans)
        .map(|j| j.id)
        .collect()
}

/// A deadline's Unix second: under `[worker] order = "deadline"`, deadlines are compared to
/// the second, and jobs whose deadlines share one start in arrival order.
pub fn deadline_second(deadline: &Timestamp) -> i64 {
    deadline.timestamp()
}

/// `order` (the unfinished jobs in requeue order) as `[worker] order = "deadline"` runs it:
/// the jobs that were running keep their places at the head; the others follow by deadline
/// to the second, then by `created_at` (arrival), and those without a deadline come last,
/// by `created_at`. It depends on the job files alone.
pub fn deadline_order(jobs: &HashMap<JobId, Job>, order: &[JobId]) -> Vec<JobId> {
    let (head, mut rest): (Vec<&Job>, Vec<&Job>) = order
        .iter()
        .filter_map(|id| jobs.get(id))
        .partition(|j| j.status == Status::Running || j.was_interrupted());
    rest.sort_by_key(|j| {
        (
            j.deadline.as_ref().map_or(i64::MAX, deadline_second),
            j.created_at,
            j.id,
        )
    });
    head.into_iter().chain(rest).map(|j| j.id).collect()
}
