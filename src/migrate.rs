//! `training-worker migrate --from SOURCE --to DESTINATION`: copies a store to another, a
//! data dir's files to a PostgreSQL database or back, with every job's record (status,
//! attempts, times, stages, GPUs, unknown fields) and the queue order, then verifies the copy.
//!
//! Both ends are opened through the store's boundary ([`crate::store::open`]), so the copy is
//! written by the same code that a daemon writes with, and read back by the same code that a
//! daemon boots with. Each end is locked the way a daemon locks it (the data dir's lock, the
//! database's advisory lock), so a migration refuses to run while a daemon holds either; the
//! destination must hold no job.

use std::collections::HashMap;
use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

use crate::config::{
    ClusterConfig, PostgresConfig, StoreConfig, StoreKind, SyncMode, redact_password,
};
use crate::job::{Job, JobId, Status};
use crate::store::lock::{self, DataDirLock, LockError};
use crate::store::{self, Change, FIRST_QUEUED_RANK, OpenError, Placement, Recovered};

/// One end of a migration: a data dir or a database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    Dir(PathBuf),
    Database(String),
}

impl End {
    /// A `postgres://` or `postgresql://` URL, or a libpq string (`host=...`), is a
    /// database; anything else a data dir.
    pub fn parse(text: &str) -> End {
        let trimmed = text.trim();
        if trimmed.starts_with("postgres://")
            || trimmed.starts_with("postgresql://")
            || trimmed.contains("host=")
            || trimmed.contains("dbname=")
        {
            End::Database(trimmed.to_string())
        } else {
            End::Dir(PathBuf::from(text))
        }
    }

    fn describe(&self) -> String {
        match self {
            End::Dir(dir) => dir.display().to_string(),
            End::Database(url) => redact_password(url),
        }
    }

    fn config(&self) -> StoreConfig {
        match self {
            End::Dir(_) => StoreConfig {
                kind: StoreKind::Files {
                    sync: SyncMode::default(),
                },
            },
            End::Database(url) => StoreConfig {
                kind: StoreKind::Postgres(PostgresConfig {
                    url: url.clone(),
                    pool_size: 2,
                    cluster: ClusterConfig::exclusive("training-worker-migrate"),
                }),
            },
        }
    }
}

/// Why a migration did not happen, and its exit code.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Bad arguments (exit 78).
    #[error("{0}")]
    Usage(String),
    /// An end cannot be read or written (exit 74).
    #[error("{0}")]
    Storage(String),
    /// A database cannot be reached (exit 69).
    #[error("{0}")]
    Unreachable(String),
    /// A daemon holds an end (exit 75).
    #[error("{0}")]
    Held(String),
    /// The destination is not empty, or the copy does not read back the same (exit 1).
    #[error("{0}")]
    Refused(String),
}

impl MigrateError {
    pub fn exit_code(&self) -> u8 {
        match self {
            MigrateError::Refused(_) => 1,
            MigrateError::Unreachable(_) => 69,
            MigrateError::Storage(_) => 74,
            MigrateError::Held(_) => 75,
            MigrateError::Usage(_) => 78,
        }
    }
}

impl From<OpenError> for MigrateError {
    fn from(e: OpenError) -> MigrateError {
        match e {
            OpenError::Storage(m) => MigrateError::Storage(m),
            OpenError::Unreachable(m) => MigrateError::Unreachable(m),
            OpenError::Held(m) => MigrateError::Held(m),
        }
    }
}

/// What a migration copied.
#[derive(Debug, PartialEq, Eq)]
pub struct Copied {
    pub jobs: usize,
    pub unfinished: usize,
    /// Records the source could not read, set aside where it keeps them, not copied.
    pub quarantined: usize,
}

/// An end opened as a daemon opens it, with its data dir locked when it has one.
struct Opened {
    store: store::Opened,
    _lock: Option<DataDirLock>,
}

async fn open(end: &End) -> Result<Opened, MigrateError> {
    let lock = match end {
        End::Dir(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| {
                MigrateError::Storage(format!("cannot create {}: {e}", dir.display()))
            })?;
            Some(lock::lock_data_dir(dir).map_err(|e| match e {
                e @ LockError::Held { .. } => MigrateError::Held(e.to_string()),
                e => MigrateError::Storage(e.to_string()),
            })?)
        }
        End::Database(_) => None,
    };
    let data_dir = match end {
        End::Dir(dir) => dir.clone(),
        // The database store keeps nothing in a data dir of its own.
        End::Database(_) => PathBuf::new(),
    };
    let store = store::open(&end.config(), &data_dir, CancellationToken::new()).await?;
    Ok(Opened { store, _lock: lock })
}

/// Closes an end: every handle dropped, the backend's end awaited.
async fn close(opened: Opened) -> Recovered {
    let Opened { store, _lock } = opened;
    let store::Opened {
        handle,
        recovered,
        ended,
        ..
    } = store;
    drop(handle);
    ended.wait().await;
    recovered
}

/// The changes that put `jobs` in a store in `order`: unfinished jobs at the ranks a boot
/// gives the replay order, jobs that were running as running.
fn changes(jobs: Vec<Job>, order: &[JobId]) -> Vec<Change> {
    let rank: HashMap<JobId, u64> = order
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, i as u64))
        .collect();
    jobs.into_iter()
        .map(|job| {
            let placement = match rank.get(&job.id) {
                None => Placement::Off,
                Some(&i) if job.status == Status::Running => Placement::Running(i),
                Some(&i) => Placement::Queued(FIRST_QUEUED_RANK + i),
            };
            Change { job, placement }
        })
        .collect()
}

/// Copies `from` to `to` and verifies that `to` reads back the same jobs in the same order.
pub async fn migrate(from: &End, to: &End) -> Result<Copied, MigrateError> {
    if from == to {
        return Err(MigrateError::Usage(format!(
            "--from and --to are the same store: {}",
            from.describe()
        )));
    }
    let source = open(from).await?;
    let destination = open(to).await?;
    if !destination.store.recovered.jobs.is_empty() {
        let held = destination.store.recovered.jobs.len();
        close(destination).await;
        close(source).await;
        return Err(MigrateError::Refused(format!(
            "{} already holds {held} jobs; migrate into an empty store",
            to.describe()
        )));
    }
    let quarantined = source.store.recovered.quarantined;
    let jobs = source.store.recovered.jobs.clone();
    let order = source.store.recovered.order.clone();
    let count = jobs.len();
    let written = destination
        .store
        .handle
        .commit(changes(jobs.clone(), &order))
        .await;
    close(destination).await;
    if let Err(e) = written {
        close(source).await;
        return Err(MigrateError::Storage(format!(
            "cannot write {}: {e}",
            to.describe()
        )));
    }

    // Read back as a daemon would boot it, while the source is still held.
    let check = open(to).await?;
    let copy = close(check).await;
    close(source).await;
    verify(&jobs, &order, &copy).map_err(|why| {
        MigrateError::Refused(format!(
            "the copy in {} does not read back the same: {why}",
            to.describe()
        ))
    })?;
    Ok(Copied {
        jobs: count,
        unfinished: order.len(),
        quarantined,
    })
}

/// The copy holds every job with the same record, and the same queue order.
fn verify(jobs: &[Job], order: &[JobId], copy: &Recovered) -> Result<(), String> {
    if copy.jobs.len() != jobs.len() {
        return Err(format!("{} jobs, not {}", copy.jobs.len(), jobs.len()));
    }
    let copied: HashMap<JobId, &Job> = copy.jobs.iter().map(|j| (j.id, j)).collect();
    for job in jobs {
        match copied.get(&job.id) {
            None => return Err(format!("job {} is missing", job.id)),
            Some(other) if other.to_file_bytes() != job.to_file_bytes() => {
                return Err(format!("job {} differs", job.id));
            }
            Some(_) => {}
        }
    }
    if copy.order != order {
        return Err("the queue order differs".into());
    }
    Ok(())
}

/// Runs a migration for the command line: one line on success, one on failure.
pub fn run(from: &str, to: &str) -> u8 {
    let (from, to) = (End::parse(from), End::parse(to));
    for end in [&from, &to] {
        if let End::Dir(dir) = end
            && dir.as_os_str().to_string_lossy().trim().is_empty()
        {
            eprintln!("error: a data dir is blank; name a directory or a postgres:// URL");
            return 78;
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return 74;
        }
    };
    match runtime.block_on(migrate(&from, &to)) {
        Ok(copied) => {
            println!(
                "copied {} jobs ({} unfinished, in their queue order) from {} to {}, and read them back the same",
                copied.jobs,
                copied.unfinished,
                from.describe(),
                to.describe()
            );
            if copied.quarantined > 0 {
                println!(
                    "note: {} unreadable records of {} were set aside (quarantine) and not copied",
                    copied.quarantined,
                    from.describe()
                );
            }
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_end_is_a_database_by_its_url_else_a_directory() {
        assert_eq!(
            End::parse("postgres://u@h/db"),
            End::Database("postgres://u@h/db".into())
        );
        assert_eq!(
            End::parse("postgresql://h/db"),
            End::Database("postgresql://h/db".into())
        );
        assert_eq!(
            End::parse("host=/run/postgresql dbname=tw"),
            End::Database("host=/run/postgresql dbname=tw".into())
        );
        assert_eq!(End::parse("data"), End::Dir("data".into()));
        assert_eq!(End::parse("/srv/tw/data"), End::Dir("/srv/tw/data".into()));
    }

    #[test]
    fn the_changes_keep_the_order_and_the_running_jobs() {
        let mut running = crate::job::sample_job(1);
        running.status = Status::Running;
        let queued = crate::job::sample_job(2);
        let mut done = crate::job::sample_job(3);
        done.status = Status::Completed;
        let order = [running.id, queued.id];
        let placements: Vec<Placement> = changes(vec![running, queued, done], &order)
            .into_iter()
            .map(|c| c.placement)
            .collect();
        assert_eq!(
            placements,
            [
                Placement::Running(0),
                Placement::Queued(FIRST_QUEUED_RANK + 1),
                Placement::Off
            ]
        );
    }
}
