//! training-worker: a daemon that runs ML fine-tuning jobs from a durable on-disk queue.
//!
//! A tour in reading order:
//! - [`job`]: the job, its id and status, the legal transitions, its JSON form (one codec
//!   for the wire and the job files).
//! - [`config`]: the settings, loaded and validated once, passed explicitly.
//! - [`gpu`]: the GPU inventory (what nvidia-smi says each id is) and the G.O.D types.
//! - [`layout`]: the names of what lives in the data dir.
//! - [`store`]: the only code that writes job state, behind one boundary with a backend per
//!   kind: the data dir's job files (atomic durable writes, group commit, replay at boot, the
//!   data dir lock) or a PostgreSQL database.
//! - [`executor`]: the only code that spawns processes: trainers, their logs, their ends.
//! - [`worker`]: the actor that owns all job state and the queue order; acts on a change
//!   only once the store has made it durable.
//! - [`metrics`]: the process-wide counters and histograms behind `GET /metrics`.
//! - [`api`]: the HTTP API over a worker handle.
//! - [`notify`]: tells a service manager (systemd) about readiness, stopping and liveness.
//! - [`daemon`]: wires them together under one shutdown token and maps the end to an exit code.
//! - [`check`]: the offline validator of a data dir.
//! - [`migrate`]: copies a store to another (files to PostgreSQL and back) and verifies it.
//! - [`client`]: the command-line client of a running daemon (`submit`, `status`, `list`,
//!   `queue`, `cancel`, `logs`, `wait`, `health`): text for people, `--json` and exit codes
//!   for scripts.

pub mod api;
pub mod check;
pub mod client;
pub mod config;
pub mod daemon;
pub mod executor;
pub mod gpu;
pub mod job;
pub mod layout;
pub mod metrics;
pub mod migrate;
pub mod notify;
pub mod store;
pub mod worker;
