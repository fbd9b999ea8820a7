//! The GPU inventory: `nvidia-smi --query-gpu=index,name,memory.total` run once at start,
//! before the worker exists, and what the daemon makes of it. Here because the executor is
//! the only code that spawns processes; what the output means is `crate::gpu`'s.
//!
//! With `[worker] gpus = "auto"` the query is the only source of ids, so an inventory that
//! cannot be read is a configuration error. With a list of ids it only adds names and
//! memory: without nvidia-smi they are unknown, and that is an error only for a caller that
//! needs them (`required`, the trainer API).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tracing::{info, warn};

use crate::config::WorkerConfig;
use crate::gpu::{self, Gpu, QUERY_ARGS};

/// How long the query may take: nvidia-smi answers in well under a second on a healthy
/// box, and one whose driver hangs must not hold the start forever.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// The most read of each of the program's outputs: a GPU list is a line per GPU.
const OUTPUT_LIMIT: u64 = 64 * 1024;

/// The most of the program's output quoted in an error, in characters.
const QUOTED: usize = 200;

/// Why the query gave no inventory. Each message names the program and, where it printed
/// something, quotes it (shortened, on one line).
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("cannot run {program}: {error}")]
    Spawn {
        program: String,
        error: std::io::Error,
    },
    #[error("{program} did not answer within {}s", timeout.as_secs_f64())]
    Timeout { program: String, timeout: Duration },
    #[error("{program} {status}: {output}")]
    Failed {
        program: String,
        /// How it ended: `exited with status 9`, `was killed by signal 9`.
        status: String,
        output: String,
    },
    #[error("{program} printed what is not a GPU list ({why} on line {line}): {output}")]
    Unreadable {
        program: String,
        why: String,
        line: usize,
        output: String,
    },
    #[error("{program} reports no GPU: {output}")]
    Empty { program: String, output: String },
}

/// Runs the query once: `program` with [`QUERY_ARGS`], in a process group of its own that
/// is killed when `timeout` passes. An exit status other than 0, output that does not
/// parse, and no GPU at all are errors.
pub async fn query(program: &Path, timeout: Duration) -> Result<Vec<Gpu>, QueryError> {
    let name = program.display().to_string();
    let mut child = Command::new(program)
        .args(QUERY_ARGS)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| QueryError::Spawn {
            program: name.clone(),
            error,
        })?;
    let group = child.id();
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let run = async {
        let (out, err) = tokio::join!(read_capped(stdout), read_capped(stderr));
        (child.wait().await, out, err)
    };
    let (status, out, err) = match tokio::time::timeout(timeout, run).await {
        Ok(done) => done,
        Err(_) => {
            if let Some(group) = group {
                // SAFETY: kill only sends a signal, to the group this child leads.
                unsafe { libc::kill(-(group as i32), libc::SIGKILL) };
            }
            return Err(QueryError::Timeout {
                program: name,
                timeout,
            });
        }
    };
    let status = status.map_err(|error| QueryError::Spawn {
        program: name.clone(),
        error,
    })?;
    let stdout = String::from_utf8_lossy(&out);
    if !status.success() {
        // nvidia-smi says why on stdout ("NVIDIA-SMI has failed because ..."), others on
        // stderr: quote whichever it used.
        let said = if err.iter().all(u8::is_ascii_whitespace) {
            &out
        } else {
            &err
        };
        use std::os::unix::process::ExitStatusExt;
        let status = match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(signal)) => format!("was killed by signal {signal}"),
            (None, None) => status.to_string(),
        };
        return Err(QueryError::Failed {
            program: name,
            status,
            output: quote(&String::from_utf8_lossy(said)),
        });
    }
    let gpus = gpu::parse_inventory(&stdout).map_err(|e| QueryError::Unreadable {
        program: name.clone(),
        why: e.why,
        line: e.line,
        output: quote(&stdout),
    })?;
    if gpus.is_empty() {
        return Err(QueryError::Empty {
            program: name,
            output: quote(&format!("{stdout}{}", String::from_utf8_lossy(&err))),
        });
    }
    Ok(gpus)
}

/// Reads up to [`OUTPUT_LIMIT`] bytes, then drops the pipe, so that a program that prints
/// without end gets EPIPE rather than the daemon's memory.
async fn read_capped(pipe: Option<impl AsyncRead + Unpin>) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(pipe) = pipe {
        let _ = pipe.take(OUTPUT_LIMIT).read_to_end(&mut buf).await;
    }
    buf
}

/// The output on one line, quoted (control characters escaped), cut at [`QUOTED`]
/// characters.
fn quote(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return "it printed nothing".into();
    }
    let joined = lines.join(" / ");
    let mut short: String = joined.chars().take(QUOTED).collect();
    if short.len() < joined.len() {
        short.push_str("...");
    }
    format!("{short:?}")
}

/// The GPUs the worker hands out and what they are, resolved at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inventory {
    /// The ids for `WorkerConfig::gpus`: the listed ones, or with `"auto"` those reported.
    pub ids: Vec<u32>,
    /// What is known of them, in the order of `ids`; with a list and no nvidia-smi, empty
    /// (or fewer than `ids` when it does not report every listed id).
    pub gpus: Vec<Gpu>,
}

/// A GPU inventory the configuration needs and cannot get: the daemon's exit 78.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("worker.gpus = \"auto\": cannot read the GPU inventory: {0}")]
    Auto(QueryError),
    #[error("worker.gpus: the GPU names and memory are needed and cannot be read: {0}")]
    Required(QueryError),
    #[error("worker.gpus: GPU {id} is not among those {program} reports ({reported})")]
    Missing {
        id: u32,
        program: String,
        reported: String,
    },
}

/// Works out the inventory for `worker`: no query without GPUs, the ids from the query with
/// `gpus = "auto"`, and names and memory for a list when nvidia-smi can say. `required`:
/// a caller that reports GPUs by name (the trainer API) needs every listed GPU known.
pub async fn inventory(
    worker: &WorkerConfig,
    required: bool,
    timeout: Duration,
) -> Result<Inventory, InventoryError> {
    if !worker.gpus_auto && worker.gpus.is_empty() {
        return Ok(Inventory {
            ids: Vec::new(),
            gpus: Vec::new(),
        });
    }
    let queried = query(&worker.nvidia_smi, timeout).await;
    if worker.gpus_auto {
        let gpus = queried.map_err(InventoryError::Auto)?;
        return Ok(Inventory {
            ids: gpus.iter().map(|g| g.id).collect(),
            gpus,
        });
    }
    let reported = match queried {
        Ok(reported) => reported,
        Err(e) if required => return Err(InventoryError::Required(e)),
        Err(QueryError::Spawn { program, error }) => {
            info!(%program, %error, "GPU names and memory unknown: nvidia-smi cannot be run; worker.gpus is used as listed");
            return Ok(Inventory {
                ids: worker.gpus.clone(),
                gpus: Vec::new(),
            });
        }
        Err(e) => {
            warn!(error = %e, "GPU names and memory unknown; worker.gpus is used as listed");
            return Ok(Inventory {
                ids: worker.gpus.clone(),
                gpus: Vec::new(),
            });
        }
    };
    let mut gpus = Vec::new();
    for id in &worker.gpus {
        match reported.iter().find(|g| g.id == *id) {
            Some(found) => gpus.push(found.clone()),
            None if required => {
                return Err(InventoryError::Missing {
                    id: *id,
                    program: worker.nvidia_smi.display().to_string(),
                    reported: ids_text(&reported),
                });
            }
            None => {
                warn!(gpu = id, reported = %ids_text(&reported), "a GPU of worker.gpus is not among those nvidia-smi reports; its name and memory are unknown");
            }
        }
    }
    Ok(Inventory {
        ids: worker.gpus.clone(),
        gpus,
    })
}

fn ids_text(gpus: &[Gpu]) -> String {
    let ids: Vec<String> = gpus.iter().map(|g| g.id.to_string()).collect();
    ids.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    /// A stand-in nvidia-smi: a shell script with `body`.
    fn fake(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn worker(program: PathBuf, gpus: &[u32], auto: bool) -> WorkerConfig {
        WorkerConfig {
            gpus: gpus.to_vec(),
            gpus_auto: auto,
            nvidia_smi: program,
            ..WorkerConfig::default()
        }
    }

    const TWO: &str =
        "echo '0, NVIDIA H100 80GB HBM3, 81559'; echo '1, NVIDIA H100 80GB HBM3, 81559'";

    #[tokio::test]
    async fn auto_takes_the_ids_reported_and_a_list_takes_names_for_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let smi = fake(dir.path(), "smi", TWO);
        let got = inventory(&worker(smi.clone(), &[], true), false, QUERY_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(got.ids, [0, 1]);
        assert_eq!(got.gpus[1].name, "NVIDIA H100 80GB HBM3");
        let got = inventory(&worker(smi.clone(), &[1, 5], false), false, QUERY_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(got.ids, [1, 5], "the list is used as written");
        assert_eq!(got.gpus.iter().map(|g| g.id).collect::<Vec<_>>(), [1]);
        let err = inventory(&worker(smi, &[1, 5], false), true, QUERY_TIMEOUT)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("GPU 5 is not among") && err.contains("(0, 1)"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn without_nvidia_smi_a_list_is_enough_unless_names_are_required() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-smi");
        let got = inventory(
            &worker(missing.clone(), &[0, 1], false),
            false,
            QUERY_TIMEOUT,
        )
        .await
        .unwrap();
        assert_eq!((got.ids, got.gpus), (vec![0, 1], vec![]));
        let err = inventory(&worker(missing.clone(), &[0], false), true, QUERY_TIMEOUT)
            .await
            .unwrap_err();
        assert!(matches!(err, InventoryError::Required(_)), "{err}");
        let err = inventory(&worker(missing, &[], true), false, QUERY_TIMEOUT)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("no-such-smi") && err.contains("auto"), "{err}");
        // No GPUs configured: nothing is asked.
        let never = fake(dir.path(), "never", "exit 1");
        let got = inventory(&worker(never, &[], false), true, QUERY_TIMEOUT)
            .await
            .unwrap();
        assert!(got.ids.is_empty());
    }

    #[tokio::test]
    async fn failures_name_the_program_and_quote_what_it_printed_on_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                "echo 'NVIDIA-SMI has failed because it couldn'\"'\"'t communicate with the NVIDIA driver.'; exit 9",
                "exited with status 9: \"NVIDIA-SMI has failed",
            ),
            ("echo oops >&2; echo ignored; exit 1", "\"oops\""),
            ("echo 'hello world'; echo 'bye'", "not a GPU list"),
            (
                "echo 'x, NVIDIA H100, 81559'",
                "the index is not a whole number on line 1",
            ),
            ("echo; echo", "reports no GPU: it printed nothing"),
            ("yes 'a long line of nonsense'; exit 1", "..."),
        ];
        for (body, want) in cases {
            let smi = fake(dir.path(), "smi", body);
            let err = query(&smi, QUERY_TIMEOUT).await.unwrap_err().to_string();
            assert!(err.contains(want), "{body}: {err}");
            assert!(err.contains(&*smi.to_string_lossy()), "{err}");
            assert!(!err.contains('\n'), "{err}");
            assert!(err.len() < 600, "shortened: {err}");
        }
    }

    #[tokio::test]
    async fn a_program_that_hangs_is_killed_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let smi = fake(dir.path(), "smi", "sleep 30 & sleep 30");
        let started = std::time::Instant::now();
        let err = query(&smi, Duration::from_millis(300)).await.unwrap_err();
        assert!(matches!(err, QueryError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
