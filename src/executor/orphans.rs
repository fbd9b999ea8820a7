//! Trainers left behind by a previous daemon of the same data dir.
//!
//! A trainer's direct child dies with the daemon (parent-death signal), but what it started
//! itself (a Python process, a shell's children) may not. Every trainer carries
//! `TW_DATA_DIR=<data dir>` in its environment, which its descendants inherit; at boot, after
//! the data dir lock is taken (so no live daemon owns them), every process that carries this
//! data dir's mark is killed, with its process group, before any job starts again.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use tracing::warn;

use super::OWNER_ENV;

/// Kills every process marked as a trainer of `data_dir` and waits (at most `patience`)
/// until they are gone. Returns how many were found.
pub fn kill_leftovers(data_dir: &Path, patience: Duration) -> usize {
    let mark = format!("{OWNER_ENV}={}", data_dir.display()).into_bytes();
    let found = marked_processes(&mark);
    for &(pid, pgid) in &found {
        warn!(
            pid,
            pgid, "killing a trainer left behind by a previous daemon"
        );
        // SAFETY: kill only sends signals; no memory is involved.
        unsafe {
            if pgid > 1 {
                libc::kill(-pgid, libc::SIGKILL);
            }
            libc::kill(pid, libc::SIGKILL);
        }
    }
    let deadline = Instant::now() + patience;
    while !found.is_empty() && Instant::now() < deadline {
        if marked_processes(&mark).is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    found.len()
}

/// Live processes (not zombies, not this one) whose environment holds `mark` exactly, with
/// their process groups.
fn marked_processes(mark: &[u8]) -> Vec<(libc::pid_t, libc::pid_t)> {
    let me = std::process::id() as libc::pid_t;
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        // Processes of other users are unreadable; they are not ours to kill anyway.
        let Ok(environ) = fs::read(entry.path().join("environ")) else {
            continue;
        };
        if !environ.split(|&b| b == 0).any(|var| var == mark) {
            continue;
        }
        let Some((state, pgid)) = stat_fields(&entry.path().join("stat")) else {
            continue;
        };
        if state == 'Z' || state == 'X' {
            continue;
        }
        found.push((pid, pgid));
    }
    found
}

/// The state letter and process group from `/proc/<pid>/stat`.
fn stat_fields(path: &Path) -> Option<(char, libc::pid_t)> {
    let stat = super::supervisor::parse_stat(&fs::read_to_string(path).ok()?)?;
    Some((stat.state, stat.pgid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn kills_marked_processes_and_their_groups_only() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let spawn = |data_dir: &Path| {
            use std::os::unix::process::CommandExt;
            Command::new("sh")
                .args(["-c", "sleep 300 & sleep 300; wait"])
                .env(OWNER_ENV, data_dir)
                .process_group(0)
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        };
        let mut ours = spawn(dir.path());
        let mut theirs = spawn(other.path());
        // The shell and its two sleeps carry the mark once the shell has forked them.
        let mark = format!("{OWNER_ENV}={}", dir.path().display()).into_bytes();
        let deadline = Instant::now() + Duration::from_secs(10);
        while marked_processes(&mark).len() < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(kill_leftovers(dir.path(), Duration::from_secs(5)), 3);
        let status = ours.wait().unwrap();
        assert!(!status.success());
        assert!(marked_processes(&mark).is_empty());
        assert!(
            theirs.try_wait().unwrap().is_none(),
            "another data dir's trainer lives on"
        );
        theirs.kill().unwrap();
        theirs.wait().unwrap();
        let their_mark = format!("{OWNER_ENV}={}", other.path().display()).into_bytes();
        kill_leftovers(other.path(), Duration::from_secs(5));
        assert!(marked_processes(&their_mark).is_empty());
    }
}
