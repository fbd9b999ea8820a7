//! The worker's side of budgets, ordering, estimates and offers: what it hands the pure policy
//! of `schedule.rs` from its state, and what it does with the answers. Apart from `mod.rs`,
//! so that the actor's loop stays as it reads.
//!
//! The same [`schedule::choose`] decides the real starts and, played forward by
//! [`schedule::forecast`], every estimate, so an estimate follows the rules the queue does.

use std::collections::HashMap;

use tokio::time::Instant;
use tracing::{debug, info};
use uuid::Uuid;

use super::Worker;
use super::offers::{Offer, OfferAnswer, Reservation, model_matches};
use super::queue::{Needs, Queue};
use super::schedule::{self, Busy, Capacity, Choice, Forecast, Outlook, Waiting};
use crate::config::{Order, WorkerConfig};
use crate::job::{Job, JobId, Status, Timestamp, format_timestamp};
use crate::metrics::METRICS;
use crate::store::order;

/// How long estimates are reused while nothing changes. Only what the clock alone moves can
/// be stale within it, by no more than this: a start expected "now", a deadline that passes.
pub const ESTIMATES_REUSE: chrono::TimeDelta = chrono::TimeDelta::seconds(1);

/// When a job is expected to start and to end, as the API shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Estimate {
    /// For a queued job: when it is expected to start; `None` when it is not expected to
    /// (the queue is paused, it can never fit, or its deadline passes before its turn).
    pub start: Option<Timestamp>,
    /// When it is expected to end at the latest.
    pub finish: Option<Timestamp>,
}

/// What holds a place in the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Place {
    Job(JobId),
    Reserved(Uuid),
    /// The job of the offer being answered.
    Offered,
}

/// Under `[worker] order = "deadline"`, the ranks of the queued jobs at boot: by deadline,
/// with the interrupted jobs kept at the head. The job files imply this order, so the store
/// only re-ranks them in `queue.json`.
pub(super) fn deadline_ranks(
    queue: &mut Queue,
    jobs: &HashMap<JobId, Job>,
    order: Order,
) -> Vec<(JobId, u64)> {
    if order != Order::Deadline {
        return Vec::new();
    }
    let sorted = order::deadline_order(jobs, &queue.queued());
    queue.rank_by_deadline(
        sorted
            .into_iter()
            .filter_map(|id| jobs.get(&id).map(|j| (id, j.deadline, j.was_interrupted()))),
    )
}

/// The budget in words: `3h`, `1h 30m`.
fn budget(hours: f64) -> String {
    let seconds = (hours * 3600.0).round() as u64;
    humantime::format_duration(std::time::Duration::from_secs(seconds)).to_string()
}

/// A wait in words, to the second.
fn wait(from: Timestamp, to: Timestamp) -> String {
    let seconds = (to - from).num_seconds().max(0) as u64;
    humantime::format_duration(std::time::Duration::from_secs(seconds)).to_string()
}

/// GPUs a job or an offer with this `gpu_count` takes: none without GPU accounting, else what
/// it asks for (one by default).
fn gpus_for(config: &WorkerConfig, gpu_count: Option<u32>) -> usize {
    if config.gpus.is_empty() {
        return 0;
    }
    gpu_count.map_or(1, |n| n as usize)
}

/// What the queue keeps of a job for the start policy.
pub(super) fn needs(config: &WorkerConfig, job: &Job) -> Needs {
    Needs {
        gpus: gpus_for(config, job.gpu_count),
        deadline: job.deadline,
    }
}

/// Merges two rank-ordered sequences into one.
fn by_rank<T>(
    a: impl Iterator<Item = (u64, T)>,
    b: impl Iterator<Item = (u64, T)>,
) -> impl Iterator<Item = T> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    std::iter::from_fn(move || {
        let take_b = match (a.peek(), b.peek()) {
            (Some((ra, _)), Some((rb, _))) => rb < ra,
            (None, Some(_)) => true,
            _ => false,
        };
        if take_b { b.next() } else { a.next() }.map(|(_, item)| item)
    })
}

impl Worker {
    /// GPUs a job or an offer with this `gpu_count` takes: none without GPU accounting, else
    /// what it asks for (one by default).
    pub(super) fn gpus_for(&self, gpu_count: Option<u32>) -> usize {
        gpus_for(&self.config, gpu_count)
    }

    /// The jobs of `queued` (queued jobs in queue order) that `include` admits and the
    /// reservations held at `now`, in queue order.
    fn waiting<'a>(
        &'a self,
        now: Timestamp,
        queued: impl Iterator<Item = (u64, JobId)> + 'a,
        include: impl Fn(JobId) -> bool + 'a,
    ) -> impl Iterator<Item = (u64, Waiting<Place>)> + 'a {
        let jobs = queued.filter_map(move |(rank, id)| {
            let job = self.jobs.get(&id).filter(|_| include(id))?;
            let waiting = Waiting {
                key: Place::Job(id),
                gpus: self.gpus_for(job.gpu_count),
                deadline: job.deadline,
                present: true,
            };
            Some((rank, waiting))
        });
        let mut held: Vec<&Reservation> = self.reservations.held(now).collect();
        held.sort_by_key(|r| r.rank);
        let held = held.into_iter().map(|r| {
            let waiting = Waiting {
                key: Place::Reserved(r.id),
                gpus: r.gpus,
                deadline: Some(r.deadline()),
                present: false,
            };
            (r.rank, waiting)
        });
        by_rank(
            jobs.map(|(rank, w)| (rank, (rank, w))),
            held.map(|(rank, w)| (rank, (rank, w))),
        )
    }

    /// What to do next with the queue at `now`: start a job, fail one that cannot run, or
    /// wait. Jobs with a change in flight or a trainer alive are passed over.
    pub(super) fn next_start(&self, now: Timestamp) -> Choice<JobId> {
        let free = self.free_gpus();
        let capacity = Capacity {
            slots: self
                .config
                .max_concurrent
                .saturating_sub(self.running.len() + self.starting + self.unsurveyed.len()),
            free_gpus: &free,
            total_gpus: self.config.gpus.len(),
            backfill: self.config.backfill,
        };
        // Backfill passes over a job that does not fit and has time left, so the scan sees
        // only the others: a turn of the loop costs the same with 50,000 jobs queued as with
        // 5, also when every GPU is taken. Strict order stops at the first job that does
        // not fit, so it walks no further than that anyway.
        let queued: Box<dyn Iterator<Item = (u64, JobId)> + '_> = if self.config.backfill {
            Box::new(
                self.queue
                    .backfill_candidates(free.len(), self.config.gpus.len(), now),
            )
        } else {
            Box::new(self.queue.queued_ranked())
        };
        let waiting = self
            .waiting(now, queued, |id| {
                // A job of the trainer API runs on its own GPUs only (`start_pinned`).
                !self.busy.contains_key(&id)
                    && !self.running.contains_key(&id)
                    && self.jobs.get(&id).is_none_or(|j| j.trainer_task.is_none())
            })
            .map(|(_, w)| w);
        match schedule::choose(waiting, now, capacity) {
            Choice::Start {
                key: Place::Job(id),
                gpus,
            } => Choice::Start { key: id, gpus },
            Choice::OutOfTime(Place::Job(id)) => Choice::OutOfTime(id),
            Choice::TooBig(Place::Job(id)) => Choice::TooBig(id),
            // A reservation is never started or failed: its job has not arrived.
            _ => Choice::Wait,
        }
    }

    /// Why a job whose deadline has passed fails instead of starting.
    pub(super) fn out_of_time_reason(&self, id: JobId) -> String {
        let Some(job) = self.jobs.get(&id) else {
            return "its time budget ran out before it could start".into();
        };
        match (job.hours_to_complete, job.deadline) {
            (Some(hours), Some(deadline)) => format!(
                "time budget of {} ran out at {} before the job could start",
                budget(hours),
                format_timestamp(&deadline)
            ),
            _ => "its time budget ran out before it could start".into(),
        }
    }

    /// When a trainer that holds a slot is expected to end: at its job's deadline; without
    /// one, `assumed_duration` after its start; at once for a job already finished (a
    /// cancelled trainer on its way out). Never before `now`.
    fn expected_end(&self, id: JobId, now: Timestamp) -> Timestamp {
        let Some(job) = self.jobs.get(&id) else {
            return now;
        };
        if job.status.is_finished() {
            return now;
        }
        let end = match job.deadline {
            Some(deadline) => deadline,
            None => {
                // A job whose start is still being written starts now.
                let started = match job.status {
                    Status::Running => job.started_at.unwrap_or(now),
                    _ => now,
                };
                let assumed = chrono::Duration::from_std(self.config.assumed_duration)
                    .unwrap_or(chrono::Duration::MAX);
                started.checked_add_signed(assumed).unwrap_or(now)
            }
        };
        end.max(now)
    }

    /// Plays the queue forward from `now`, with `offered` (an offer's job at its rank) if
    /// given, until `until` is known.
    fn forecast(
        &self,
        now: Timestamp,
        offered: Option<(u64, Waiting<Place>)>,
        until: Option<Place>,
    ) -> HashMap<Place, Forecast> {
        let outlook = Outlook {
            now,
            slots: self.config.max_concurrent,
            gpus: self.config.gpus.clone(),
            backfill: self.config.backfill,
            assumed: self.config.assumed_duration,
        };
        // Every trainer from the decision to start it until it has exited holds its GPUs in
        // `gpus_in_use` (an empty list without GPU accounting).
        let busy: Vec<Busy> = self
            .gpus_in_use
            .iter()
            .map(|(id, gpus)| Busy {
                ends: self.expected_end(*id, now),
                gpus: gpus.clone(),
            })
            .collect();
        let waiting: Vec<Waiting<Place>> = by_rank(
            self.waiting(now, self.queue.queued_ranked(), |id| {
                !self.gpus_in_use.contains_key(&id)
            }),
            offered.into_iter(),
        )
        .collect();
        schedule::forecast(&outlook, &busy, &waiting, until)
    }

    /// Estimates for the queued and running jobs (only `of`'s, when given). The forecast
    /// covers the whole queue, so it is kept until the state changes or for
    /// [`ESTIMATES_REUSE`]: polling the jobs of a long queue costs one forecast, not one
    /// each.
    pub(super) fn estimates(&mut self, of: Option<JobId>) -> HashMap<JobId, Estimate> {
        let now = self.clock.now();
        let fresh = self.estimates_cache.as_ref().is_some_and(|(made, _)| {
            let age = now - *made;
            age >= chrono::TimeDelta::zero() && age < ESTIMATES_REUSE
        });
        if !fresh {
            self.estimates_cache = Some((now, self.estimate_all(now)));
        }
        let all = &self.estimates_cache.as_ref().expect("made above").1;
        match of {
            None => all.clone(),
            Some(id) => all.get(&id).map(|e| (id, *e)).into_iter().collect(),
        }
    }

    /// Estimates for every queued and running job at `now`.
    fn estimate_all(&self, now: Timestamp) -> HashMap<JobId, Estimate> {
        let mut estimates: HashMap<JobId, Estimate> = self
            .forecast(now, None, None)
            .into_iter()
            .filter_map(|(place, forecast)| {
                let Place::Job(id) = place else { return None };
                let estimate = match forecast {
                    Forecast::Starts { start, finish } => Estimate {
                        start: Some(start),
                        finish: Some(finish),
                    },
                    Forecast::OutOfTime { .. } | Forecast::Never => Estimate::default(),
                };
                Some((id, estimate))
            })
            .collect();
        for id in self.gpus_in_use.keys() {
            if self
                .jobs
                .get(id)
                .is_some_and(|j| j.status == Status::Running)
            {
                let estimate = Estimate {
                    start: None,
                    finish: Some(self.expected_end(*id, now)),
                };
                estimates.insert(*id, estimate);
            }
        }
        estimates
    }

    /// Answers an offer: whether its job would be taken, when it would start and end, and,
    /// when accepted, a reservation of its place.
    pub(super) fn answer_offer(&mut self, offer: Offer) -> OfferAnswer {
        let now = self.clock.now();
        self.expire_reservations(now);
        let gpus = self.gpus_for(offer.gpu_count);
        let deadline = now + crate::job::hours(offer.hours_to_complete);
        let offered = Waiting {
            key: Place::Offered,
            gpus,
            deadline: Some(deadline),
            present: true,
        };
        let rank = self.queue.peek_arrival_rank(Some(deadline));
        let forecast = self
            .forecast(now, Some((rank, offered)), Some(Place::Offered))
            .remove(&Place::Offered)
            .unwrap_or(Forecast::Never);
        let (start, finish) = match forecast {
            Forecast::Starts { start, finish } => (Some(start), Some(finish)),
            _ => (None, None),
        };
        let limits = &self.config.offers;
        let total = self.config.gpus.len();
        let refusal = if !limits.job_types.iter().any(|t| t == offer.job_type) {
            Some(format!(
                "{} jobs are not taken here (offers.job_types: {})",
                offer.job_type,
                limits.job_types.join(", ")
            ))
        } else if !limits.models.iter().any(|p| model_matches(p, &offer.model)) {
            Some(format!(
                "model {} matches none of offers.models ({})",
                offer.model,
                limits.models.join(", ")
            ))
        } else if offer.hours_to_complete > limits.max_hours {
            Some(format!(
                "hours_to_complete {} is above offers.max_hours ({})",
                offer.hours_to_complete, limits.max_hours
            ))
        } else if total > 0 && gpus > total {
            Some(format!(
                "it asks for {gpus} GPUs, and this worker has {total} (worker.gpus)"
            ))
        } else if self.config.max_concurrent == 0 {
            Some("the queue is paused (worker.max_concurrent = 0): nothing starts".into())
        } else {
            match forecast {
                Forecast::Starts { start, .. }
                    if (start - now).to_std().unwrap_or_default() > limits.max_wait =>
                {
                    Some(format!(
                        "it would start in {} (at {}), later than offers.max_wait ({}) allows",
                        wait(now, start),
                        format_timestamp(&start),
                        humantime::format_duration(limits.max_wait)
                    ))
                }
                Forecast::Starts { .. } => None,
                Forecast::OutOfTime { .. } | Forecast::Never => Some(format!(
                    "it could not start before its deadline at {} (a budget of {})",
                    format_timestamp(&deadline),
                    budget(offer.hours_to_complete)
                )),
            }
        };
        let accepted = refusal.is_none();
        METRICS.offer_answered(accepted);
        let message = match (&refusal, start, finish) {
            (Some(reason), _, _) => format!("not accepted: {reason}"),
            (None, Some(start), Some(finish)) => {
                let when = if start <= now {
                    "at once".to_string()
                } else {
                    format!("in {} (at {})", wait(now, start), format_timestamp(&start))
                };
                format!(
                    "accepted: it would start {when} and end by its deadline at {}",
                    format_timestamp(&finish)
                )
            }
            (None, _, _) => "accepted".into(),
        };
        let mut answer = OfferAnswer {
            accepted,
            estimated_start: start,
            estimated_finish: finish,
            message,
            reservation: None,
        };
        if accepted && !limits.reserve_for.is_zero() {
            let expires_at = now
                + chrono::Duration::from_std(limits.reserve_for)
                    .expect("offers.reserve_for is at most an hour");
            let accepted_at = self.now_for_creation();
            let rank = self.queue.arrival_rank(Some(
                accepted_at + crate::job::hours(offer.hours_to_complete),
            ));
            let id = Uuid::new_v4();
            let claim = match offer.job_id {
                Some(job_id) => format!("job {job_id}"),
                None => "the first job sent with this type, model, gpu_count and hours_to_complete"
                    .to_string(),
            };
            answer.message.push_str(&format!(
                "; its place is held until {} for {claim}, whose budget runs from now",
                format_timestamp(&expires_at)
            ));
            answer.reservation = Some((id, expires_at));
            info!(reservation = %id, model = %offer.model, hours = offer.hours_to_complete, expires_at = %format_timestamp(&expires_at), "offer accepted; place reserved");
            self.reservations.add(Reservation::new(
                id,
                &offer,
                gpus,
                accepted_at,
                rank,
                expires_at,
            ));
        } else {
            debug!(accepted, model = %offer.model, hours = offer.hours_to_complete, message = %answer.message, "offer answered");
        }
        answer
    }

    /// Fixes what acceptance fixes for a new job and gives its rank: the reservation's time
    /// and place when the job claims one, else now and the next place.
    pub(super) fn accept(&mut self, job: &mut Job) -> u64 {
        let gpus = self.gpus_for(job.gpu_count);
        let now = self.clock.now();
        if let Some(reservation) = self.reservations.claim(job, gpus, now) {
            info!(job_id = %job.id, reservation = %reservation.id, "job claims its reserved place");
            job.accept(reservation.accepted_at);
            return reservation.rank;
        }
        let now = self.now_for_creation();
        job.accept(now);
        self.queue.arrival_rank(job.deadline)
    }

    /// A submission's write has landed: a reservation it claimed ends when it was stored,
    /// and is held again when it was refused.
    pub(super) fn settle_claim(&mut self, id: JobId, stored: bool) {
        if self.reservations.settle(id, stored).is_some() {
            METRICS.reservations_claimed.inc();
        }
    }

    /// Drops the reservations that expired unclaimed.
    /// Lets go of the reservations unclaimed at their expiry; true if there were any.
    pub(super) fn expire_reservations(&mut self, now: Timestamp) -> bool {
        let expired = self.reservations.expire(now);
        for gone in &expired {
            info!(reservation = %gone.id, model = %gone.model, "reservation expired unclaimed");
            METRICS.reservations_expired.inc();
        }
        !expired.is_empty()
    }

    /// When the loop should wake to let an expired reservation's place go.
    pub(super) fn reservation_wakeup(&self) -> Option<Instant> {
        self.reservations
            .next_expiry()
            .map(|at| self.clock.instant_at(at))
    }

    /// Counts a deadline missed by a job whose end (Completed or Failed) is being recorded:
    /// failed while queued for lack of time, or ended after its deadline.
    pub(super) fn note_deadline(&self, job: &Job) {
        let (Some(deadline), Some(finished)) = (job.deadline, job.finished_at) else {
            return;
        };
        if finished <= deadline {
            return;
        }
        let queued = self
            .jobs
            .get(&job.id)
            .is_some_and(|old| old.status == Status::Queued);
        METRICS.deadline_missed(queued);
    }
}
