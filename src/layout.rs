//! The data dir's layout: the names of what lives in it, read by the store, the executor,
//! the daemon and `check`, so that none of them takes another's paths.
//!
//! With the file store every entry is used. With the PostgreSQL store the job records and
//! the queue live in the database, and the data dir keeps what is the box's own: the lock,
//! the trainers' logs and the secrets of unfinished jobs.

/// One JSON file per job, `<job_id>.json`: the file store's records.
pub const JOBS_DIR: &str = "jobs";
/// The file store's queue order, derived from the job files.
pub const QUEUE_FILE: &str = "queue.json";
/// Files the file store could not read, set aside at boot.
pub const QUARANTINE_DIR: &str = "quarantine";
/// The trainers' output, `<job_id>.log` (the executor's).
pub const LOGS_DIR: &str = "logs";
/// A job's secrets while it is unfinished (the executor's, like `logs/`).
pub const SECRETS_DIR: &str = "secrets";
/// With the records in a database: a copy of each running job's record, the file its
/// trainer's `JOB_FILE` names (the executor's).
pub const RUN_DIR: &str = "run";
/// One daemon per data dir: the lock file, naming its holder.
pub const LOCK_FILE: &str = "lock";
