//! Fuzzes the job codec (src/job.rs): arbitrary bytes, parsed as JSON the way the API parses
//! a body, through `Job::from_submission` (the wire) and `Job::from_stored` (a job file).
//!
//! Neither may panic, and whatever either accepts must survive the job file round trip:
//! written with `to_file_bytes`, read back with `from_stored`, it is the same job; a
//! submission always comes out Queued with a lowercase id that names its file.
//!
//! Run (stable toolchain; libFuzzer needs unstable flags, hence RUSTC_BOOTSTRAP):
//!
//!     cargo install cargo-fuzz
//!     cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -s none job_decoder -- -max_total_time=60
//!
//! `-s none` builds without AddressSanitizer (the codec is safe Rust; this saves a long
//! build). Inputs that crash land in fuzz/artifacts/job_decoder/.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use training_worker::job::{Job, Status, Timestamp};

fn round_trip(job: &Job) {
    let bytes = job.to_file_bytes();
    let value: Value = serde_json::from_slice(&bytes).expect("a job file is JSON");
    let back = Job::from_stored(value).expect("a job file written by the daemon reads back");
    assert_eq!(&back, job, "the job file round trip changed the job");
}

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    // Microsecond precision, as job files store times, so that the round trip is exact.
    let now: Timestamp = "2026-01-02T03:04:05.123456Z".parse().expect("a valid time");
    if let Ok(job) = Job::from_submission(value.clone(), now) {
        assert_eq!(job.status, Status::Queued);
        assert_eq!(job.attempts, 0);
        let id = job.id.to_string();
        assert_eq!(id, id.to_lowercase());
        assert_eq!(job.to_json()["job_id"], Value::String(id));
        round_trip(&job);
    }
    if let Ok(job) = Job::from_stored(value) {
        round_trip(&job);
    }
});
