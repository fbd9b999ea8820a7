//! The overview's charts, drawn by the server as inline SVG: no script, no image fetched.
//! Colours come from the stylesheet's classes, so the strict style policy holds.

use maud::{Markup, html};

use crate::job::{Job, Status, Timestamp};

/// Finished jobs per hour over the last `hours` hours, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Hourly {
    pub completed: Vec<u32>,
    pub failed: Vec<u32>,
}

impl Hourly {
    /// Counts each Completed and Failed job in the hour it finished (a cancel is the
    /// operator's doing, not the trainer's, and counts in neither).
    pub fn of<'a>(jobs: impl IntoIterator<Item = &'a Job>, now: Timestamp, hours: usize) -> Hourly {
        let mut hourly = Hourly {
            completed: vec![0; hours],
            failed: vec![0; hours],
        };
        for job in jobs {
            let Some(at) = job.finished_at else { continue };
            let ago = (now - at).num_seconds();
            if ago < 0 {
                continue;
            }
            let back = (ago / 3600) as usize;
            if back >= hours {
                continue;
            }
            let slot = hours - 1 - back;
            match job.status {
                Status::Completed => hourly.completed[slot] += 1,
                Status::Failed => hourly.failed[slot] += 1,
                _ => {}
            }
        }
        hourly
    }
}

const WIDTH: f64 = 480.0;
const HEIGHT: f64 = 120.0;
const LEFT: f64 = 28.0;
const BOTTOM: f64 = 16.0;

/// Stacked bars of completed and failed jobs per hour.
pub(super) fn throughput(h: &Hourly) -> Markup {
    let hours = h.completed.len().max(1);
    let max = (0..hours)
        .map(|i| h.completed[i] + h.failed[i])
        .max()
        .unwrap_or(0)
        .max(1);
    let plot_h = HEIGHT - BOTTOM - 4.0;
    let bar_w = (WIDTH - LEFT) / hours as f64;
    let y = |n: u32| plot_h * n as f64 / max as f64;
    let total_c: u32 = h.completed.iter().sum();
    let total_f: u32 = h.failed.iter().sum();
    html! {
        svg class="chart" viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img"
            aria-labelledby="tp-title" preserveAspectRatio="none" {
            title id="tp-title" { (format!("Jobs finished per hour over the last {hours} hours: {total_c} completed, {total_f} failed")) }
            line class="axis" x1=(LEFT) y1=(plot_h + 4.0) x2=(WIDTH) y2=(plot_h + 4.0) {}
            text class="tick" x="0" y="12" { (max) }
            text class="tick" x="0" y=(plot_h + 4.0) { "0" }
            text class="tick" x=(LEFT) y=(HEIGHT - 2.0) { (format!("-{hours}h")) }
            text class="tick" x=(WIDTH - 24.0) y=(HEIGHT - 2.0) { "now" }
            @for i in 0..hours {
                @let x = LEFT + i as f64 * bar_w + 1.0;
                @let (c, f) = (h.completed[i], h.failed[i]);
                @if c > 0 {
                    rect class="ok" x=(fmt(x)) y=(fmt(plot_h + 4.0 - y(c) - y(f))) width=(fmt(bar_w - 2.0)) height=(fmt(y(c))) {
                        title { (format!("{} h ago: {c} completed", hours - i - 1)) }
                    }
                }
                @if f > 0 {
                    rect class="bad" x=(fmt(x)) y=(fmt(plot_h + 4.0 - y(f))) width=(fmt(bar_w - 2.0)) height=(fmt(y(f))) {
                        title { (format!("{} h ago: {f} failed", hours - i - 1)) }
                    }
                }
            }
        }
    }
}

/// The share of finished jobs that failed, per hour, as a line over the hours that had any.
pub(super) fn failure_rate(h: &Hourly) -> Markup {
    let hours = h.completed.len().max(1);
    let plot_h = HEIGHT - BOTTOM - 4.0;
    let step = (WIDTH - LEFT) / hours as f64;
    let points: Vec<(f64, f64)> = (0..hours)
        .filter_map(|i| {
            let done = h.completed[i] + h.failed[i];
            (done > 0).then(|| {
                let rate = h.failed[i] as f64 / done as f64;
                (LEFT + (i as f64 + 0.5) * step, 4.0 + plot_h * (1.0 - rate))
            })
        })
        .collect();
    let path: Vec<String> = points
        .iter()
        .map(|(x, y)| format!("{},{}", fmt(*x), fmt(*y)))
        .collect();
    let (c, f): (u32, u32) = (h.completed.iter().sum(), h.failed.iter().sum());
    let overall = if c + f == 0 {
        "no job finished".to_string()
    } else {
        format!("{:.0}% failed overall", 100.0 * f as f64 / (c + f) as f64)
    };
    html! {
        svg class="chart" viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img"
            aria-labelledby="fr-title" preserveAspectRatio="none" {
            title id="fr-title" { (format!("Failure rate per hour over the last {hours} hours: {overall}")) }
            line class="axis" x1=(LEFT) y1=(plot_h + 4.0) x2=(WIDTH) y2=(plot_h + 4.0) {}
            line class="grid" x1=(LEFT) y1="4" x2=(WIDTH) y2="4" {}
            text class="tick" x="0" y="12" { "100%" }
            text class="tick" x="0" y=(plot_h + 4.0) { "0%" }
            text class="tick" x=(LEFT) y=(HEIGHT - 2.0) { (format!("-{hours}h")) }
            text class="tick" x=(WIDTH - 24.0) y=(HEIGHT - 2.0) { "now" }
            @if points.len() > 1 {
                polyline class="rate" points=(path.join(" ")) {}
            }
            @for (x, y) in &points {
                circle class="rate-dot" cx=(fmt(*x)) cy=(fmt(*y)) r="3" {}
            }
        }
    }
}

fn fmt(v: f64) -> String {
    format!("{v:.1}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_count_in_the_hour_they_finished() {
        let now = chrono::Utc::now();
        let mut jobs = Vec::new();
        for (status, hours_ago) in [
            (Status::Completed, 0.1),
            (Status::Completed, 0.5),
            (Status::Failed, 2.5),
            (Status::Cancelled, 1.0),
            (Status::Completed, 30.0),
        ] {
            let mut job = crate::job::sample_job(jobs.len() as u128);
            job.status = status;
            job.finished_at = Some(now - chrono::Duration::seconds((hours_ago * 3600.0) as i64));
            jobs.push(job);
        }
        let h = Hourly::of(&jobs, now, 24);
        assert_eq!(h.completed[23], 2);
        assert_eq!(h.failed[21], 1);
        assert_eq!(h.completed.iter().sum::<u32>(), 2);
        assert_eq!(h.failed.iter().sum::<u32>(), 1);
        let svg = throughput(&h).into_string();
        assert!(svg.contains("2 completed, 1 failed"), "{svg}");
        assert!(
            failure_rate(&h)
                .into_string()
                .contains("33% failed overall")
        );
    }
}
