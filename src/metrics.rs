//! The daemon's metrics, served as Prometheus text at `GET /metrics`.
//!
//! One process-wide registry of atomics ([`METRICS`]), as Prometheus clients keep: the
//! worker, the store and the daemon update it where things happen, and a scrape only reads
//! it. Names follow Prometheus conventions: `training_worker_` prefix, `_total` for
//! counters, base units (seconds) in the name.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::job::Status;

/// The registry.
pub static METRICS: Metrics = Metrics::new();

/// A monotonically increasing count.
pub struct Counter(AtomicU64);

impl Counter {
    const fn new() -> Counter {
        Counter(AtomicU64::new(0))
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds of a histogram's buckets (the `+Inf` bucket is implied).
const SECONDS_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 86400.0,
];
const FLUSH_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
const BATCH_BUCKETS: [f64; 14] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];

/// A distribution of observed values over fixed buckets.
pub struct Histogram {
    bounds: &'static [f64; 14],
    /// Counts per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; 15],
    /// The sum of observations, in millionths, so that it fits an integer atomic.
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    const fn new(bounds: &'static [f64; 14]) -> Histogram {
        Histogram {
            bounds,
            buckets: [const { AtomicU64::new(0) }; 15],
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        let value = if value.is_finite() && value > 0.0 {
            value
        } else {
            0.0
        };
        let i = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((value * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str) {
        let mut cumulative = 0;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// Everything the daemon counts.
pub struct Metrics {
    /// Jobs by status now, kept by the worker as jobs change.
    jobs: [AtomicI64; 5],
    pub enqueued: Counter,
    pub started: Counter,
    pub completed: Counter,
    pub failed: Counter,
    pub cancelled: Counter,
    /// Finished jobs queued again for a fresh run (`POST /v1/jobs/{id}/retry`).
    pub retried: Counter,
    /// Unfinished jobs put back in the queue at boot.
    pub recovered: Counter,
    /// Files moved to quarantine at boot.
    pub quarantined: Counter,
    /// Writes the store refused (disk full, I/O error): each a 503 or a retry.
    pub store_refusals: Counter,
    /// Trainers that could not be started (a missing program, no descriptors left): each
    /// put its job back in the queue, uncounted, and paused the starts for a while.
    pub spawn_failures: Counter,
    /// From arrival (or requeue) to start.
    pub queue_wait: Histogram,
    /// From start to end, for every end (completed, failed, cancelled, stopped).
    pub run_time: Histogram,
    /// Job records per store batch.
    pub batch_jobs: Histogram,
    /// From the start of a batch's writes until it is durable.
    pub flush: Histogram,
    /// How long the last replay took, in microseconds.
    replay_micros: AtomicU64,
    /// Deadlines missed: jobs failed while queued because their time ran out, and jobs that
    /// ended (Completed or Failed) after their deadline.
    deadline_missed_queued: Counter,
    deadline_missed_running: Counter,
    /// Offers answered, by answer.
    offers_accepted: Counter,
    offers_refused: Counter,
    /// Reservations whose job arrived, and those that expired without it.
    pub reservations_claimed: Counter,
    pub reservations_expired: Counter,
    /// HTTP connections being served now.
    http_connections_open: AtomicI64,
    /// The most HTTP connections served at once (`[api] max_connections`, bounded by the
    /// descriptor limit), set once the listener is up.
    http_connections_max: AtomicU64,
    /// Connections turned away at the cap (answered 503, or closed when even that would
    /// take too many descriptors).
    pub http_connections_refused: Counter,
}

impl Metrics {
    const fn new() -> Metrics {
        Metrics {
            jobs: [const { AtomicI64::new(0) }; 5],
            enqueued: Counter::new(),
            started: Counter::new(),
            completed: Counter::new(),
            failed: Counter::new(),
            cancelled: Counter::new(),
            retried: Counter::new(),
            recovered: Counter::new(),
            quarantined: Counter::new(),
            store_refusals: Counter::new(),
            spawn_failures: Counter::new(),
            queue_wait: Histogram::new(&SECONDS_BUCKETS),
            run_time: Histogram::new(&SECONDS_BUCKETS),
            batch_jobs: Histogram::new(&BATCH_BUCKETS),
            flush: Histogram::new(&FLUSH_BUCKETS),
            replay_micros: AtomicU64::new(0),
            deadline_missed_queued: Counter::new(),
            deadline_missed_running: Counter::new(),
            offers_accepted: Counter::new(),
            offers_refused: Counter::new(),
            reservations_claimed: Counter::new(),
            reservations_expired: Counter::new(),
            http_connections_open: AtomicI64::new(0),
            http_connections_max: AtomicU64::new(0),
            http_connections_refused: Counter::new(),
        }
    }

    pub fn http_connection_opened(&self) {
        self.http_connections_open.fetch_add(1, Ordering::Relaxed);
    }

    pub fn http_connection_closed(&self) {
        self.http_connections_open.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn http_connections_open(&self) -> i64 {
        self.http_connections_open.load(Ordering::Relaxed)
    }

    pub fn set_http_connections_max(&self, max: usize) {
        self.http_connections_max
            .store(max as u64, Ordering::Relaxed);
    }

    /// A job missed its deadline: `queued`, it failed instead of starting; else it ended late.
    pub fn deadline_missed(&self, queued: bool) {
        if queued {
            self.deadline_missed_queued.inc();
        } else {
            self.deadline_missed_running.inc();
        }
    }

    /// Deadline misses so far: (while queued, while running).
    pub fn deadline_misses(&self) -> (u64, u64) {
        (
            self.deadline_missed_queued.get(),
            self.deadline_missed_running.get(),
        )
    }

    pub fn offer_answered(&self, accepted: bool) {
        if accepted {
            self.offers_accepted.inc();
        } else {
            self.offers_refused.inc();
        }
    }

    fn index(status: Status) -> usize {
        Status::ALL
            .iter()
            .position(|s| *s == status)
            .expect("every status is in Status::ALL")
    }

    /// A job now has `new` (and had `old`, if it existed).
    pub fn job_status_changed(&self, old: Option<Status>, new: Status) {
        if let Some(old) = old {
            self.jobs[Self::index(old)].fetch_sub(1, Ordering::Relaxed);
        }
        self.jobs[Self::index(new)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn jobs(&self, status: Status) -> i64 {
        self.jobs[Self::index(status)].load(Ordering::Relaxed)
    }

    pub fn set_replay_duration(&self, d: Duration) {
        self.replay_micros
            .store(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(out, "# HELP training_worker_jobs Jobs by status.");
        let _ = writeln!(out, "# TYPE training_worker_jobs gauge");
        for status in Status::ALL {
            let _ = writeln!(
                out,
                "training_worker_jobs{{status=\"{}\"}} {}",
                status.as_str().to_lowercase(),
                self.jobs(status)
            );
        }
        for (name, help, counter) in [
            (
                "jobs_enqueued_total",
                "Jobs accepted by POST /v1/jobs.",
                &self.enqueued,
            ),
            ("jobs_started_total", "Trainer starts.", &self.started),
            (
                "jobs_completed_total",
                "Jobs whose trainer exited 0.",
                &self.completed,
            ),
            (
                "jobs_failed_total",
                "Jobs that failed (exit status, signal, timeout, out of attempts).",
                &self.failed,
            ),
            (
                "jobs_cancelled_total",
                "Jobs cancelled by request.",
                &self.cancelled,
            ),
            (
                "jobs_retried_total",
                "Finished jobs queued again for a fresh run by POST /v1/jobs/{id}/retry.",
                &self.retried,
            ),
            (
                "jobs_recovered_total",
                "Unfinished jobs put back in the queue at boot.",
                &self.recovered,
            ),
            (
                "quarantined_files_total",
                "Unreadable files moved to quarantine/ at boot.",
                &self.quarantined,
            ),
            (
                "store_refused_writes_total",
                "Writes the storage refused (disk full, I/O error); nothing was stored.",
                &self.store_refusals,
            ),
            (
                "trainer_spawn_failures_total",
                "Trainers that could not be started; each job went back to the queue, its attempt not counted.",
                &self.spawn_failures,
            ),
            (
                "http_connections_refused_total",
                "HTTP connections turned away because max_connections were open (answered 503, or closed).",
                &self.http_connections_refused,
            ),
        ] {
            let _ = writeln!(out, "# HELP training_worker_{name} {help}");
            let _ = writeln!(out, "# TYPE training_worker_{name} counter");
            let _ = writeln!(out, "training_worker_{name} {}", counter.get());
        }
        for (name, help, label, values) in [
            (
                "deadline_misses_total",
                "Jobs that missed their deadline: failed while queued because their time ran out, or a trainer's end (completed or failed) recorded after it.",
                "phase",
                [
                    ("queued", &self.deadline_missed_queued),
                    ("running", &self.deadline_missed_running),
                ],
            ),
            (
                "offers_total",
                "Offers answered (POST /v1/offers), by answer.",
                "accepted",
                [
                    ("true", &self.offers_accepted),
                    ("false", &self.offers_refused),
                ],
            ),
            (
                "reservations_total",
                "Reservations of accepted offers that ended: their job claimed them, or they expired.",
                "outcome",
                [
                    ("claimed", &self.reservations_claimed),
                    ("expired", &self.reservations_expired),
                ],
            ),
        ] {
            let _ = writeln!(out, "# HELP training_worker_{name} {help}");
            let _ = writeln!(out, "# TYPE training_worker_{name} counter");
            for (value, counter) in values {
                let _ = writeln!(
                    out,
                    "training_worker_{name}{{{label}=\"{value}\"}} {}",
                    counter.get()
                );
            }
        }
        for (name, help, histogram) in [
            (
                "queue_wait_seconds",
                "Time from arrival (or requeue) to start.",
                &self.queue_wait,
            ),
            (
                "run_seconds",
                "Time from a trainer's start to its end.",
                &self.run_time,
            ),
            (
                "store_batch_jobs",
                "Job records written per store batch.",
                &self.batch_jobs,
            ),
            (
                "store_flush_seconds",
                "Time to make a store batch durable.",
                &self.flush,
            ),
        ] {
            let _ = writeln!(out, "# HELP training_worker_{name} {help}");
            let _ = writeln!(out, "# TYPE training_worker_{name} histogram");
            histogram.render(&mut out, &format!("training_worker_{name}"));
        }
        for (name, help, value) in [
            (
                "http_connections_open",
                "HTTP connections being served now.",
                self.http_connections_open(),
            ),
            (
                "http_connections_max",
                "The most HTTP connections served at once: [api] max_connections, lowered to fit the descriptor limit.",
                self.http_connections_max.load(Ordering::Relaxed) as i64,
            ),
        ] {
            let _ = writeln!(out, "# HELP training_worker_{name} {help}");
            let _ = writeln!(out, "# TYPE training_worker_{name} gauge");
            let _ = writeln!(out, "training_worker_{name} {value}");
        }
        let _ = writeln!(
            out,
            "# HELP training_worker_replay_seconds How long the replay of the data dir took at boot."
        );
        let _ = writeln!(out, "# TYPE training_worker_replay_seconds gauge");
        let _ = writeln!(
            out,
            "training_worker_replay_seconds {}",
            self.replay_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_cumulative_buckets() {
        let h = Histogram::new(&SECONDS_BUCKETS);
        h.observe(0.002);
        h.observe(0.002);
        h.observe(7.0);
        h.observe(1e9);
        let mut out = String::new();
        h.render(&mut out, "x");
        assert!(out.contains("x_bucket{le=\"0.001\"} 0\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"30\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_count 4\n"), "{out}");
        assert_eq!(h.count(), 4);
    }

    #[test]
    fn the_exposition_has_help_and_type_for_every_family() {
        let text = Metrics::new().render();
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        assert_eq!(families.len(), 22, "{text}");
        for family in families {
            assert!(family.starts_with("training_worker_"), "{family}");
            assert!(text.contains(&format!("# HELP {family} ")), "{family}");
        }
        assert!(text.contains("training_worker_jobs{status=\"queued\"} 0"));
        assert!(text.contains("training_worker_deadline_misses_total{phase=\"queued\"} 0"));
        assert!(text.contains("training_worker_offers_total{accepted=\"false\"} 0"));
    }
}
