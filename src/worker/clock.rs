//! The worker's wall clock: the system's in the daemon, or one that moves with Tokio's clock,
//! so that tests with paused time can move deadlines, estimates and reservations forward
//! without waiting.
//!
//! Timestamps are wall-clock time because they are written to job files and compared across
//! restarts; a Tokio `Instant` means nothing to the next process.

use tokio::time::Instant;

use crate::job::Timestamp;

/// Where the worker's "now" comes from.
#[derive(Clone, Debug)]
pub struct Clock(Source);

#[derive(Clone, Debug)]
enum Source {
    System,
    /// `origin` at Tokio's `at`, moving as Tokio's clock does.
    Tokio {
        origin: Timestamp,
        at: Instant,
    },
}

impl Clock {
    /// The system's clock.
    pub fn system() -> Clock {
        Clock(Source::System)
    }

    /// A clock that reads `origin` now and then advances as Tokio's clock does: under
    /// `#[tokio::test(start_paused = true)]`, only when the test advances time.
    pub fn following_tokio(origin: Timestamp) -> Clock {
        Clock(Source::Tokio {
            origin,
            at: Instant::now(),
        })
    }

    pub fn now(&self) -> Timestamp {
        match &self.0 {
            Source::System => chrono::Utc::now(),
            Source::Tokio { origin, at } => {
                let elapsed = chrono::Duration::from_std(at.elapsed())
                    .expect("a test does not advance time by centuries");
                *origin + elapsed
            }
        }
    }

    /// The Tokio instant at which this clock should read `when`, for a timer. A moment
    /// already past is now.
    pub fn instant_at(&self, when: Timestamp) -> Instant {
        let wait = (when - self.now()).to_std().unwrap_or_default();
        Instant::now() + wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_tokio_clock_moves_only_with_tokio_time() {
        let origin = chrono::DateTime::parse_from_rfc3339("2030-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let clock = Clock::following_tokio(origin);
        assert_eq!(clock.now(), origin);
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(clock.now(), origin + chrono::Duration::seconds(90));
        let later = origin + chrono::Duration::seconds(100);
        assert_eq!(
            clock.instant_at(later) - Instant::now(),
            Duration::from_secs(10)
        );
        assert_eq!(clock.instant_at(origin), Instant::now(), "the past is now");
    }
}
