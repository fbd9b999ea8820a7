//! The daemon's metrics, served as Prometheus text at `GET /metrics`.
//!
//! One process-wide set ([`METRICS`]) of `prometheus-client` metrics: the worker, the
//! store and the daemon update it where things happen, and a scrape only reads it. Names
//! follow Prometheus conventions: `training_worker_` prefix, `_total` for counters (which
//! `prometheus-client` adds itself, so counters are registered without it), base units
//! (seconds) in the name. Every label value a family has is created at start, so a scrape
//! shows each at 0 before it first happens.
//!
//! Every sample also carries `node="<cluster.node_id>"`, so that the scrapes of several
//! daemons sharing one queue stay apart under any scrape config. The node's name is known
//! only once the configuration is read, and a metric may count before that, so the
//! registry is built at each scrape from the metrics' registrations, under the label the
//! daemon set once with [`Metrics::set_node`].
//!
//! `prometheus-client` writes OpenMetrics; [`Metrics::render`] serves the same samples in
//! the Prometheus text format 0.0.4 (`GET /metrics` says `text/plain; version=0.0.4`), which
//! every scraper reads: see [`to_prometheus_text`].

use std::borrow::Cow;
use std::sync::atomic::AtomicU64;
use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::text::encode_registry;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::job::Status;

/// The metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

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

/// A label set of one label, as the families here have.
type Label = [(&'static str, &'static str); 1];

/// A distribution of observed values over fixed buckets. A value that is not a finite
/// number above 0 (a clock that went back) counts as 0, so the sum stays meaningful.
#[derive(Clone, Debug)]
pub struct Histogram(prometheus_client::metrics::histogram::Histogram);

impl Histogram {
    fn new(bounds: &[f64]) -> Histogram {
        Histogram(prometheus_client::metrics::histogram::Histogram::new(
            bounds.iter().copied(),
        ))
    }

    pub fn observe(&self, value: f64) {
        let value = if value.is_finite() && value > 0.0 {
            value
        } else {
            0.0
        };
        self.0.observe(value);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }
}

/// Puts one metric (a handle onto it: a clone counts the same) in a registry.
type Registration = Box<dyn Fn(&mut Registry) + Send + Sync>;

/// The registrations of a [`Metrics`], in the order a scrape lists them.
type Registrations = Vec<Registration>;

/// Everything the daemon counts. The fields are handles onto the metrics that
/// `registrations` put in each scrape's registry: updating one updates what a scrape reads.
pub struct Metrics {
    registrations: Registrations,
    /// The `node` label of every sample: `cluster.node_id`, set once at start. Unset (a
    /// unit test that never sets it), the samples have no such label.
    node: OnceLock<String>,
    /// Jobs by status now, kept by the worker as jobs change; in [`Status::ALL`] order.
    jobs: [Gauge; 5],
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
    /// How long the last replay took, in seconds.
    replay_seconds: Gauge<f64, AtomicU64>,
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
    http_connections_open: Gauge,
    /// The most HTTP connections served at once (`[api] max_connections`, bounded by the
    /// descriptor limit), set once the listener is up.
    http_connections_max: Gauge,
    /// Connections turned away at the cap (answered 503, or closed when even that would
    /// take too many descriptors).
    pub http_connections_refused: Counter,
}

/// Registers `metric` under `name` with `help`; `prometheus-client` ends the help with a
/// period itself.
fn register<M>(registrations: &mut Registrations, name: &str, help: &str, metric: M)
where
    M: prometheus_client::registry::Metric + Clone,
{
    let (name, help) = (name.to_string(), help.trim_end_matches('.').to_string());
    registrations.push(Box::new(move |registry: &mut Registry| {
        registry.register(name.as_str(), help.as_str(), metric.clone());
    }));
}

/// A counter registered alone under `name` (without `_total`).
fn counter(registrations: &mut Registrations, name: &str, help: &str) -> Counter {
    let counter = Counter::default();
    register(registrations, name, help, counter.clone());
    counter
}

/// A family of counters by `label`, one per value of `values`, registered under `name`.
fn counters<const N: usize>(
    registrations: &mut Registrations,
    name: &str,
    help: &str,
    label: &'static str,
    values: [&'static str; N],
) -> [Counter; N] {
    let family = Family::<Label, Counter>::default();
    let counters = values.map(|value| family.get_or_create_owned(&[(label, value)]));
    register(registrations, name, help, family);
    counters
}

fn histogram(
    registrations: &mut Registrations,
    name: &str,
    help: &str,
    bounds: &[f64],
) -> Histogram {
    let histogram = Histogram::new(bounds);
    register(registrations, name, help, histogram.0.clone());
    histogram
}

fn gauge(registrations: &mut Registrations, name: &str, help: &str) -> Gauge {
    let gauge = Gauge::default();
    register(registrations, name, help, gauge.clone());
    gauge
}

impl Metrics {
    /// A registry with every metric at 0, in the order a scrape lists them.
    fn new() -> Metrics {
        let r = &mut Registrations::new();
        let jobs_family = Family::<Label, Gauge>::default();
        let jobs = Status::ALL.map(|status| {
            let value: &'static str = match status {
                Status::Queued => "queued",
                Status::Running => "running",
                Status::Completed => "completed",
                Status::Failed => "failed",
                Status::Cancelled => "cancelled",
            };
            jobs_family.get_or_create_owned(&[("status", value)])
        });
        register(r, "jobs", "Jobs by status.", jobs_family);
        let enqueued = counter(r, "jobs_enqueued", "Jobs accepted by POST /v1/jobs.");
        let started = counter(r, "jobs_started", "Trainer starts.");
        let completed = counter(r, "jobs_completed", "Jobs whose trainer exited 0.");
        let failed = counter(
            r,
            "jobs_failed",
            "Jobs that failed (exit status, signal, timeout, out of attempts).",
        );
        let cancelled = counter(r, "jobs_cancelled", "Jobs cancelled by request.");
        let retried = counter(
            r,
            "jobs_retried",
            "Finished jobs queued again for a fresh run by POST /v1/jobs/{id}/retry.",
        );
        let recovered = counter(
            r,
            "jobs_recovered",
            "Unfinished jobs put back in the queue at boot.",
        );
        let quarantined = counter(
            r,
            "quarantined_files",
            "Unreadable files moved to quarantine/ at boot.",
        );
        let store_refusals = counter(
            r,
            "store_refused_writes",
            "Writes the storage refused (disk full, I/O error); nothing was stored.",
        );
        let spawn_failures = counter(
            r,
            "trainer_spawn_failures",
            "Trainers that could not be started; each job went back to the queue, its attempt not counted.",
        );
        let http_connections_refused = counter(
            r,
            "http_connections_refused",
            "HTTP connections turned away because max_connections were open (answered 503, or closed).",
        );
        let [deadline_missed_queued, deadline_missed_running] = counters(
            r,
            "deadline_misses",
            "Jobs that missed their deadline: failed while queued because their time ran out, or a trainer's end (completed or failed) recorded after it.",
            "phase",
            ["queued", "running"],
        );
        let [offers_accepted, offers_refused] = counters(
            r,
            "offers",
            "Offers answered (POST /v1/offers), by answer.",
            "accepted",
            ["true", "false"],
        );
        let [reservations_claimed, reservations_expired] = counters(
            r,
            "reservations",
            "Reservations of accepted offers that ended: their job claimed them, or they expired.",
            "outcome",
            ["claimed", "expired"],
        );
        let queue_wait = histogram(
            r,
            "queue_wait_seconds",
            "Time from arrival (or requeue) to start.",
            &SECONDS_BUCKETS,
        );
        let run_time = histogram(
            r,
            "run_seconds",
            "Time from a trainer's start to its end.",
            &SECONDS_BUCKETS,
        );
        let batch_jobs = histogram(
            r,
            "store_batch_jobs",
            "Job records written per store batch.",
            &BATCH_BUCKETS,
        );
        let flush = histogram(
            r,
            "store_flush_seconds",
            "Time to make a store batch durable.",
            &FLUSH_BUCKETS,
        );
        let http_connections_open = gauge(
            r,
            "http_connections_open",
            "HTTP connections being served now.",
        );
        let http_connections_max = gauge(
            r,
            "http_connections_max",
            "The most HTTP connections served at once: [api] max_connections, lowered to fit the descriptor limit.",
        );
        let replay_seconds = Gauge::<f64, AtomicU64>::default();
        register(
            r,
            "replay_seconds",
            "How long the replay of the data dir took at boot.",
            replay_seconds.clone(),
        );
        Metrics {
            registrations: std::mem::take(r),
            node: OnceLock::new(),
            jobs,
            enqueued,
            started,
            completed,
            failed,
            cancelled,
            retried,
            recovered,
            quarantined,
            store_refusals,
            spawn_failures,
            queue_wait,
            run_time,
            batch_jobs,
            flush,
            replay_seconds,
            deadline_missed_queued,
            deadline_missed_running,
            offers_accepted,
            offers_refused,
            reservations_claimed,
            reservations_expired,
            http_connections_open,
            http_connections_max,
            http_connections_refused,
        }
    }

    pub fn http_connection_opened(&self) {
        self.http_connections_open.inc();
    }

    pub fn http_connection_closed(&self) {
        self.http_connections_open.dec();
    }

    pub fn http_connections_open(&self) -> i64 {
        self.http_connections_open.get()
    }

    pub fn set_http_connections_max(&self, max: usize) {
        self.http_connections_max
            .set(i64::try_from(max).unwrap_or(i64::MAX));
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
            self.jobs[Self::index(old)].dec();
        }
        self.jobs[Self::index(new)].inc();
    }

    pub fn jobs(&self, status: Status) -> i64 {
        self.jobs[Self::index(status)].get()
    }

    pub fn set_replay_duration(&self, d: Duration) {
        self.replay_seconds.set(d.as_secs_f64());
    }

    /// Names the node every sample is labelled with, once (a daemon is one node for its
    /// whole life); a later call changes nothing.
    pub fn set_node(&self, node: &str) {
        // Set once by the daemon at start; a second call would be a bug with no effect.
        let _ = self.node.set(node.to_string());
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let labels = self
            .node
            .get()
            .map(|node| (Cow::Borrowed("node"), Cow::Owned(node.clone())));
        let mut registry = Registry::with_prefix_and_labels("training_worker", labels.into_iter());
        for registration in &self.registrations {
            registration(&mut registry);
        }
        let mut openmetrics = String::with_capacity(8192);
        encode_registry(&mut openmetrics, &registry)
            .expect("writing the exposition to a String cannot fail");
        to_prometheus_text(&openmetrics)
    }
}

/// The Prometheus text format (0.0.4) of an OpenMetrics exposition without exemplars, units
/// or `# EOF`, as `prometheus-client` writes ours. The samples are the same in both but for
/// two spellings, kept as this endpoint has always written them:
/// - a counter's `# HELP` and `# TYPE` lines: OpenMetrics names the family without the
///   `_total` its samples carry, the older format names it as its samples are named (a
///   strict 0.0.4 parser would otherwise read the samples as untyped);
/// - a bucket's bound: `le="30"`, not `le="30.0"`, which a Prometheus before 3.0 would store
///   as another series than the one a dashboard selects.
fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None if line.starts_with('#') => out.push_str(line),
            None => out.push_str(&with_plain_bound(line)),
        }
        out.push('\n');
    }
    out
}

/// A sample line with its `le` bound, if any, written as Rust writes the number (`30`,
/// `0.00025`), as the buckets were always written here.
fn with_plain_bound(line: &str) -> String {
    let Some(start) = line.find("le=\"").map(|i| i + "le=\"".len()) else {
        return line.to_string();
    };
    let Some(len) = line[start..].find('"') else {
        return line.to_string();
    };
    match line[start..start + len].parse::<f64>() {
        Ok(bound) if bound.is_finite() => {
            format!("{}{bound}{}", &line[..start], &line[start + len..])
        }
        _ => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_cumulative_buckets() {
        let mut registrations = Registrations::new();
        let h = histogram(&mut registrations, "x", "X.", &SECONDS_BUCKETS);
        h.observe(0.002);
        h.observe(0.002);
        h.observe(7.0);
        h.observe(1e9);
        let mut registry = Registry::default();
        registrations.iter().for_each(|r| r(&mut registry));
        let mut openmetrics = String::new();
        encode_registry(&mut openmetrics, &registry).unwrap();
        let out = to_prometheus_text(&openmetrics);
        assert!(out.contains("x_bucket{le=\"0.001\"} 0\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"30\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_count 4\n"), "{out}");
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
        // Help ends with one period, as before.
        assert!(
            text.contains("# HELP training_worker_jobs Jobs by status.\n"),
            "{text}"
        );
    }

    #[test]
    fn every_sample_carries_the_node_once_it_is_set() {
        let metrics = Metrics::new();
        metrics.enqueued.inc();
        let unset = metrics.render();
        assert!(!unset.contains("node="), "{unset}");
        metrics.set_node("gpu-box-1");
        // A second name changes nothing: a daemon is one node for its whole life.
        metrics.set_node("gpu-box-2");
        let text = metrics.render();
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples.len(),
            unset.lines().filter(|l| !l.starts_with('#')).count()
        );
        for sample in samples {
            assert!(sample.contains("{node=\"gpu-box-1\""), "{sample}");
        }
        assert!(
            text.contains("training_worker_jobs_enqueued_total{node=\"gpu-box-1\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("training_worker_jobs{node=\"gpu-box-1\",status=\"queued\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("training_worker_run_seconds_bucket{node=\"gpu-box-1\",le=\"30\"} 0\n"),
            "{text}"
        );
    }

    #[test]
    fn counters_are_typed_under_the_name_their_samples_have() {
        let metrics = Metrics::new();
        metrics.enqueued.inc_by(3);
        let text = metrics.render();
        assert!(
            text.contains(
                "# TYPE training_worker_jobs_enqueued_total counter\n\
                 training_worker_jobs_enqueued_total 3\n"
            ),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
    }
}
