//! One daemon per data dir: an exclusive `flock` on `<data dir>/lock`.
//!
//! The kernel releases the lock when the process dies, SIGKILL included, so a crashed daemon
//! never blocks its successor. The file also says who holds it (pid, host, start time), so a
//! second daemon can name the holder in its error.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub use crate::layout::LOCK_FILE;

/// This machine's name, for the messages that name a lock's holder.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown host".into())
}

/// Held for the daemon's whole life; dropping it releases the lock.
#[derive(Debug)]
pub struct DataDirLock {
    /// Kept open: closing the file would release the lock.
    _file: File,
    path: PathBuf,
}

impl DataDirLock {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("data dir {dir} is in use by another training-worker ({holder})")]
    Held { dir: PathBuf, holder: String },
    #[error("cannot lock {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Takes the lock without waiting, and records this process as its holder.
pub fn lock_data_dir(data_dir: &Path) -> Result<DataDirLock, LockError> {
    let path = data_dir.join(LOCK_FILE);
    let io_err = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Err(LockError::Held {
                dir: data_dir.to_path_buf(),
                holder: describe_holder(&mut file),
            });
        }
        Err(TryLockError::Error(e)) => return Err(io_err(e)),
    }
    let host = host_name();
    let holder = format!(
        "pid {} on {}, since {}",
        std::process::id(),
        host,
        crate::job::format_timestamp(&chrono::Utc::now())
    );
    // Only informative: a failure to record the holder does not matter for the lock.
    let _ = file
        .set_len(0)
        .and_then(|_| file.seek(SeekFrom::Start(0)))
        .and_then(|_| file.write_all(holder.as_bytes()))
        .and_then(|_| file.flush());
    Ok(DataDirLock { _file: file, path })
}

/// Who holds the lock. The kernel's word (`/proc/locks`) decides the pid: the file may not
/// name the holder yet (it writes its line just after taking the lock) or may still name a
/// previous, dead holder. The file's line adds the host and start time when it agrees.
fn describe_holder(file: &mut File) -> String {
    let mut recorded = String::new();
    let _ = file.read_to_string(&mut recorded);
    let recorded = recorded.trim().to_string();
    let Some(pid) = file.metadata().ok().and_then(|m| flock_holder(&m)) else {
        return if recorded.is_empty() {
            "holder unknown".into()
        } else {
            recorded
        };
    };
    if recorded.starts_with(&format!("pid {pid} ")) {
        recorded
    } else {
        format!("pid {pid}")
    }
}

/// The pid that holds a `flock` on the file with this metadata, from `/proc/locks`.
fn flock_holder(meta: &std::fs::Metadata) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let dev = meta.dev();
    // Lines look like `1: FLOCK  ADVISORY  WRITE 31213 fe:00:10125629 0 EOF`: the device as
    // hexadecimal major:minor, then the inode.
    let wanted = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&"FLOCK") || fields.get(5) != Some(&wanted.as_str()) {
            return None;
        }
        fields.get(4)?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_fails_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_data_dir(dir.path()).unwrap();
        let err = lock_data_dir(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(first);
        lock_data_dir(dir.path()).unwrap();
    }

    #[test]
    fn the_kernel_names_the_holder_when_the_file_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_data_dir(dir.path()).unwrap();
        // As if a previous daemon's line were still there, or the holder had not written yet.
        std::fs::write(dir.path().join(LOCK_FILE), "pid 1 on elsewhere, since then").unwrap();
        let msg = lock_data_dir(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains(&format!("(pid {})", std::process::id())),
            "{msg}"
        );
        std::fs::write(dir.path().join(LOCK_FILE), "").unwrap();
        let msg = lock_data_dir(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(held);
    }
}
