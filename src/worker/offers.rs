//! Offers: a client asks whether this box would take a job (its type, model, GPUs and budget)
//! and when it would start, before sending it; an accepted offer may hold the job's place for
//! a short time.
//!
//! Here are the pieces without state: the offer as sent ([`Offer`]), the answer
//! ([`OfferAnswer`]), the model patterns, and the reservations the worker holds
//! ([`Reservations`]). The worker fills the estimate in (see `plan.rs`).
//!
//! Reservations live in the worker's memory only. They last seconds (`offers.reserve_for`,
//! at most an hour), and the client that got one sends its job at once or not at all; after a
//! restart the offer is simply asked again. Writing them to disk would put a durable write on
//! the path of every offer for a promise shorter than a restart.

use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::job::{
    FieldError, Job, JobId, Timestamp, format_timestamp, gpu_count_field, hours_field,
};

/// A job offered, as `POST /v1/offers` sends it. Other fields are ignored, so the job
/// itself may be sent as its own offer.
#[derive(Clone, Debug, PartialEq)]
pub struct Offer {
    /// `TextJob` or `DiffusionJob`.
    pub job_type: &'static str,
    pub model: String,
    /// GPUs it would ask for; `None`: the default (one when GPUs are configured).
    pub gpu_count: Option<u32>,
    pub hours_to_complete: f64,
    /// The id the job will have, when the client knows it: then only that job claims the
    /// reservation.
    pub job_id: Option<JobId>,
}

impl Offer {
    /// Validates an offer the way a submission is validated: a 400 names the field.
    pub fn from_json(value: Value) -> Result<Offer, FieldError> {
        let Value::Object(object) = value else {
            return Err(FieldError::new("body", "must be a JSON object (an offer)"));
        };
        let job_type = match object.get("type") {
            Some(Value::String(s)) if s == "TextJob" => "TextJob",
            Some(Value::String(s)) if s == "DiffusionJob" => "DiffusionJob",
            Some(Value::String(s)) => {
                return Err(FieldError::new(
                    "type",
                    format!("unknown job type {s:?}; \"TextJob\" or \"DiffusionJob\""),
                ));
            }
            _ => {
                return Err(FieldError::new(
                    "type",
                    "required, \"TextJob\" or \"DiffusionJob\"",
                ));
            }
        };
        let model = crate::job::required_string(&object, "model")?;
        let gpu_count = gpu_count_field(&object)?;
        let hours_to_complete = hours_field(&object)?.ok_or_else(|| {
            FieldError::new(
                "hours_to_complete",
                "required: an offer is judged by whether its job can start in time",
            )
        })?;
        let job_id = job_id_field(&object)?;
        Ok(Offer {
            job_type,
            model,
            gpu_count,
            hours_to_complete,
            job_id,
        })
    }
}

fn job_id_field(object: &Map<String, Value>) -> Result<Option<JobId>, FieldError> {
    match object.get("job_id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => s
            .parse()
            .map(Some)
            .map_err(|e: crate::job::InvalidJobId| FieldError::new("job_id", e.to_string())),
        Some(_) => Err(FieldError::new("job_id", "must be a UUID string")),
    }
}

/// The answer to an offer.
#[derive(Clone, Debug, PartialEq)]
pub struct OfferAnswer {
    pub accepted: bool,
    /// When the job would start, if it is expected to.
    pub estimated_start: Option<Timestamp>,
    /// When it would end at the latest: its deadline, for a job that uses its budget.
    pub estimated_finish: Option<Timestamp>,
    /// Why, for people.
    pub message: String,
    /// The place held for the job, when the offer was accepted and reservations are on.
    pub reservation: Option<(Uuid, Timestamp)>,
}

impl OfferAnswer {
    pub fn to_json(&self) -> Value {
        let time = |t: &Option<Timestamp>| t.as_ref().map(format_timestamp);
        json!({
            "accepted": self.accepted,
            "estimated_start": time(&self.estimated_start),
            "estimated_finish": time(&self.estimated_finish),
            "message": self.message,
            "reservation": self.reservation.map(|(id, expires_at)| json!({
                "id": id.to_string(),
                "expires_at": format_timestamp(&expires_at),
            })),
        })
    }
}

/// Whether `model` matches `pattern`: `*` stands for any run of characters, `?` for one, and
/// letters match in either case (model names on the Hub are case-insensitive).
pub fn model_matches(pattern: &str, model: &str) -> bool {
    let p: Vec<char> = pattern.chars().flat_map(char::to_lowercase).collect();
    let m: Vec<char> = model.chars().flat_map(char::to_lowercase).collect();
    let (mut pi, mut mi) = (0, 0);
    // The last `*` seen and where in the model its run began: on a mismatch, the run grows
    // by one and matching resumes after the `*`.
    let mut star: Option<(usize, usize)> = None;
    while mi < m.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == m[mi]) {
            pi += 1;
            mi += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, mi));
            pi += 1;
        } else if let Some((sp, sm)) = star {
            star = Some((sp, sm + 1));
            pi = sp + 1;
            mi = sm + 1;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// A place held for an offered job.
#[derive(Clone, Debug, PartialEq)]
pub struct Reservation {
    pub id: Uuid,
    pub expires_at: Timestamp,
    /// When the job counts as accepted: the offer's time. A job that claims the reservation
    /// gets it as its `created_at`, and its budget runs from it, as the offer's estimate did.
    pub accepted_at: Timestamp,
    /// The job's place in the queue, taken when the offer was accepted.
    pub rank: u64,
    pub job_type: &'static str,
    pub model: String,
    /// GPUs the job takes (0 without GPU accounting).
    pub gpus: usize,
    pub hours: f64,
    pub job_id: Option<JobId>,
    /// The submission that claimed it, while that job's write is in flight.
    claimed_by: Option<JobId>,
}

impl Reservation {
    pub fn new(
        id: Uuid,
        offer: &Offer,
        gpus: usize,
        accepted_at: Timestamp,
        rank: u64,
        expires_at: Timestamp,
    ) -> Reservation {
        Reservation {
            id,
            expires_at,
            accepted_at,
            rank,
            job_type: offer.job_type,
            model: offer.model.clone(),
            gpus,
            hours: offer.hours_to_complete,
            job_id: offer.job_id,
            claimed_by: None,
        }
    }

    /// The deadline its job will have.
    pub fn deadline(&self) -> Timestamp {
        self.accepted_at + crate::job::hours(self.hours)
    }

    /// Whether `job` (taking `gpus`) is the job this reservation was made for.
    fn fits(&self, job: &Job, gpus: usize) -> bool {
        self.job_type == job.kind.type_name()
            && self.model == job.model
            && self.gpus == gpus
            && job.hours_to_complete == Some(self.hours)
            && self.job_id.is_none_or(|id| id == job.id)
    }
}

/// The reservations held now, oldest first.
#[derive(Debug, Default)]
pub struct Reservations(Vec<Reservation>);

impl Reservations {
    pub fn add(&mut self, reservation: Reservation) {
        self.0.push(reservation);
    }

    /// Drops the unclaimed reservations that have expired by `now`; returns them.
    pub fn expire(&mut self, now: Timestamp) -> Vec<Reservation> {
        let (gone, kept) = std::mem::take(&mut self.0)
            .into_iter()
            .partition(|r| r.claimed_by.is_none() && r.expires_at <= now);
        self.0 = kept;
        gone
    }

    /// The reservations that hold a place at `now`: unexpired, or claimed by a job whose
    /// write is in flight.
    pub fn held(&self, now: Timestamp) -> impl Iterator<Item = &Reservation> {
        self.0
            .iter()
            .filter(move |r| r.claimed_by.is_some() || r.expires_at > now)
    }

    /// When the next unclaimed reservation expires.
    pub fn next_expiry(&self) -> Option<Timestamp> {
        self.0
            .iter()
            .filter(|r| r.claimed_by.is_none())
            .map(|r| r.expires_at)
            .min()
    }

    /// Claims the reservation `job` was offered under, if one is held at `now`: one that
    /// names the job's id first, else the oldest that fits it. It stays held until
    /// [`Reservations::settle`] says whether the job was stored.
    pub fn claim(&mut self, job: &Job, gpus: usize, now: Timestamp) -> Option<&Reservation> {
        let open =
            |r: &Reservation| r.claimed_by.is_none() && r.expires_at > now && r.fits(job, gpus);
        let index = self
            .0
            .iter()
            .position(|r| open(r) && r.job_id == Some(job.id))
            .or_else(|| self.0.iter().position(|r| open(r) && r.job_id.is_none()))?;
        let reservation = &mut self.0[index];
        reservation.claimed_by = Some(job.id);
        Some(reservation)
    }

    /// The claiming job's write has landed: `stored` ends the reservation, a refused write
    /// gives it back (its expiry still applies).
    pub fn settle(&mut self, job: JobId, stored: bool) -> Option<Reservation> {
        let index = self.0.iter().position(|r| r.claimed_by == Some(job))?;
        if stored {
            return Some(self.0.remove(index));
        }
        self.0[index].claimed_by = None;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(seconds: i64) -> Timestamp {
        chrono::DateTime::from_timestamp(1_900_000_000 + seconds, 0).unwrap()
    }

    fn offer(value: Value) -> Result<Offer, FieldError> {
        Offer::from_json(value)
    }

    #[test]
    fn an_offer_is_validated_like_a_job_and_a_job_is_an_offer() {
        let good =
            json!({"type": "TextJob", "model": "m/x", "hours_to_complete": 2, "gpu_count": 2});
        let parsed = offer(good.clone()).unwrap();
        assert_eq!(parsed.job_type, "TextJob");
        assert_eq!((parsed.gpu_count, parsed.hours_to_complete), (Some(2), 2.0));
        for (field, bad) in [
            ("body", json!([1])),
            ("type", json!({"model": "m", "hours_to_complete": 1})),
            (
                "type",
                json!({"type": "ImageJob", "model": "m", "hours_to_complete": 1}),
            ),
            ("model", json!({"type": "TextJob", "hours_to_complete": 1})),
            (
                "model",
                json!({"type": "TextJob", "model": " ", "hours_to_complete": 1}),
            ),
            (
                "hours_to_complete",
                json!({"type": "TextJob", "model": "m"}),
            ),
            (
                "hours_to_complete",
                json!({"type": "TextJob", "model": "m", "hours_to_complete": 0}),
            ),
            (
                "hours_to_complete",
                json!({"type": "TextJob", "model": "m", "hours_to_complete": "2"}),
            ),
            (
                "gpu_count",
                json!({"type": "TextJob", "model": "m", "hours_to_complete": 1, "gpu_count": -1}),
            ),
            (
                "job_id",
                json!({"type": "TextJob", "model": "m", "hours_to_complete": 1, "job_id": "x"}),
            ),
        ] {
            assert_eq!(offer(bad.clone()).unwrap_err().field, field, "{bad}");
        }
        // A whole job, dataset and all, is an offer for itself.
        let job = json!({
            "type": "DiffusionJob", "model": "sdxl", "dataset_zip": "z.zip",
            "hours_to_complete": 1.5, "job_id": "123e4567-e89b-12d3-a456-426614174000",
        });
        let parsed = offer(job).unwrap();
        assert_eq!(parsed.hours_to_complete, 1.5);
        assert!(parsed.job_id.is_some());
    }

    #[test]
    fn model_patterns_take_stars_question_marks_and_any_case() {
        for (pattern, model, expected) in [
            ("*", "anything/at-all", true),
            ("unsloth/*", "unsloth/Llama-3.2-1B", true),
            ("unsloth/*", "Unsloth/llama", true),
            ("unsloth/*", "meta/unsloth", false),
            ("*/llama-3.?-1b", "unsloth/Llama-3.2-1B", true),
            ("*/llama-3.?-1b", "unsloth/Llama-3.12-1B", false),
            ("*qwen*instruct", "Qwen/Qwen2.5-0.5B-Instruct", true),
            ("*qwen*instruct", "Qwen/Qwen2.5-0.5B", false),
            ("exact/name", "exact/name", true),
            ("exact/name", "exact/name2", false),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
        ] {
            assert_eq!(
                model_matches(pattern, model),
                expected,
                "{pattern} ~ {model}"
            );
        }
    }

    fn job(model: &str, hours: f64, id: u128) -> Job {
        let mut job = crate::job::sample_job(id);
        job.model = model.into();
        job.hours_to_complete = Some(hours);
        job
    }

    fn reserve(
        reservations: &mut Reservations,
        n: u128,
        job_id: Option<JobId>,
        expires: i64,
    ) -> Uuid {
        let id = Uuid::from_u128(n);
        let offer = Offer {
            job_type: "DiffusionJob",
            model: "m".into(),
            gpu_count: None,
            hours_to_complete: 2.0,
            job_id,
        };
        reservations.add(Reservation::new(
            id,
            &offer,
            1,
            t(0),
            100 + n as u64,
            t(expires),
        ));
        id
    }

    #[test]
    fn a_submission_claims_the_reservation_made_for_it() {
        let mut held = Reservations::default();
        let named = job("m", 2.0, 7);
        let first = reserve(&mut held, 1, None, 30);
        let for_named = reserve(&mut held, 2, Some(named.id), 30);
        // Another model, budget or GPU count is another job.
        assert!(held.claim(&job("other", 2.0, 8), 1, t(1)).is_none());
        assert!(held.claim(&job("m", 3.0, 8), 1, t(1)).is_none());
        assert!(held.claim(&job("m", 2.0, 8), 2, t(1)).is_none());
        // The job the offer named takes its own reservation, not the older open one.
        assert_eq!(held.claim(&named, 1, t(1)).map(|r| r.id), Some(for_named));
        // Any fitting job takes the open one; a third finds none.
        assert_eq!(
            held.claim(&job("m", 2.0, 9), 1, t(1)).map(|r| r.id),
            Some(first)
        );
        assert!(held.claim(&job("m", 2.0, 10), 1, t(1)).is_none());
        // A refused write gives it back; a stored one ends it.
        assert!(held.settle(job("m", 2.0, 9).id, false).is_none());
        assert_eq!(
            held.claim(&job("m", 2.0, 11), 1, t(2)).map(|r| r.id),
            Some(first)
        );
        assert_eq!(
            held.settle(job("m", 2.0, 11).id, true).map(|r| r.id),
            Some(first)
        );
        assert_eq!(held.held(t(2)).count(), 1);
    }

    #[test]
    fn reservations_expire_unless_claimed() {
        let mut held = Reservations::default();
        let early = reserve(&mut held, 1, None, 30);
        let late = reserve(&mut held, 2, None, 60);
        assert_eq!(held.next_expiry(), Some(t(30)));
        assert!(held.expire(t(29)).is_empty());
        assert_eq!(
            held.expire(t(30)).iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![early]
        );
        assert_eq!(
            held.held(t(30)).map(|r| r.id).collect::<Vec<_>>(),
            vec![late]
        );
        // A claimed reservation outlives its expiry until its job's write lands.
        let claimer = job("m", 2.0, 5);
        assert!(held.claim(&claimer, 1, t(59)).is_some());
        assert_eq!(held.next_expiry(), None);
        assert!(held.expire(t(61)).is_empty());
        assert_eq!(held.held(t(61)).count(), 1);
        // Given back after its expiry, it is gone at the next look.
        held.settle(claimer.id, false);
        assert_eq!(held.held(t(61)).count(), 0);
        assert_eq!(held.expire(t(61)).len(), 1);
        assert!(held.claim(&job("m", 2.0, 6), 1, t(61)).is_none());
    }
}
