//! The one way a file in the data dir is replaced: write a temporary file in the same
//! directory, fsync it, rename it over the target, fsync the directory.
//!
//! The steps are separate functions so that the store can run them for a whole batch at once:
//! every temporary file first, then every rename, then one fsync per directory. A reader (or a
//! crash) therefore sees either the old file or the new one, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The suffix of temporary files. Replay removes leftovers that end with it.
pub const TEMP_SUFFIX: &str = ".tmp";

/// The temporary name used while `name` is being replaced: hidden, and ending in
/// [`TEMP_SUFFIX`] so that no reader takes it for a job file.
pub fn temp_name(name: &str) -> String {
    format!(".{name}{TEMP_SUFFIX}")
}

/// Whether a directory entry is a temporary file left by an interrupted write.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(TEMP_SUFFIX)
}

/// How a step of a write failed. The distinction matters: after a failed write nothing has
/// changed and the caller may try again later, but after a failed fsync the kernel may have
/// dropped dirty pages, so the only safe move is to stop and replay from disk.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("fsync of {path} failed: {source}")]
    Sync { path: PathBuf, source: io::Error },
    #[error("cannot rename {from} to {to}: {source}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
}

impl WriteError {
    /// A write that failed before anything became visible is not fatal; everything else is.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, WriteError::Write { .. })
    }

    /// Whether the filesystem refused the step before changing anything: a failed write, or
    /// a rename refused for a reason the kernel checks first (a read-only or full
    /// filesystem, a quota, permissions). After such a rename the old file is in place.
    pub fn is_refusal(&self) -> bool {
        match self {
            WriteError::Write { .. } => true,
            WriteError::Rename { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::EROFS | libc::ENOSPC | libc::EDQUOT | libc::EACCES | libc::EPERM)
            ),
            WriteError::Sync { .. } => false,
        }
    }
}

/// A temporary file that holds the new content, fsynced, ready to be renamed into place.
#[derive(Debug)]
pub struct Staged {
    temp: PathBuf,
    target: PathBuf,
}

impl Staged {
    pub fn target(&self) -> &Path {
        &self.target
    }
}

/// Writes `bytes` to the temporary file for `dir/name` and fsyncs it. On a write error the
/// temporary file is removed again, so a failed write leaves no trace.
pub fn stage(dir: &Path, name: &str, bytes: &[u8]) -> Result<Staged, WriteError> {
    stage_with(dir, name, bytes, true)
}

/// Like [`stage`], without the fsync: for a batch made durable by one [`sync_filesystem`]
/// before its renames.
pub fn stage_unsynced(dir: &Path, name: &str, bytes: &[u8]) -> Result<Staged, WriteError> {
    stage_with(dir, name, bytes, false)
}

fn stage_with(dir: &Path, name: &str, bytes: &[u8], sync: bool) -> Result<Staged, WriteError> {
    let temp = dir.join(temp_name(name));
    let target = dir.join(name);
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)?;
        file.write_all(bytes)?;
        Ok::<File, io::Error>(file)
    })();
    let file = match written {
        Ok(file) => file,
        Err(source) => {
            let _ = fs::remove_file(&temp);
            return Err(WriteError::Write { path: temp, source });
        }
    };
    if sync && let Err(source) = file.sync_all() {
        let _ = fs::remove_file(&temp);
        return Err(WriteError::Sync { path: temp, source });
    }
    Ok(Staged { temp, target })
}

/// Removes a staged file that will not be committed.
pub fn discard(staged: Staged) {
    let _ = fs::remove_file(&staged.temp);
}

/// Renames a staged file over its target. The change is visible now, and durable once the
/// directory is synced.
pub fn publish(staged: &Staged) -> Result<(), WriteError> {
    fs::rename(&staged.temp, &staged.target).map_err(|source| WriteError::Rename {
        from: staged.temp.clone(),
        to: staged.target.clone(),
        source,
    })
}

/// Fsyncs a directory, making the renames and removals in it durable.
pub fn sync_dir(dir: &Path) -> Result<(), WriteError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| WriteError::Sync {
            path: dir.to_path_buf(),
            source,
        })
}

/// Flushes the whole filesystem that holds `dir` (syncfs(2)): every file staged on it,
/// whoever wrote it, is durable afterwards.
pub fn sync_filesystem(dir: &Path) -> Result<(), WriteError> {
    use std::os::fd::AsRawFd;
    let sync_error = |source| WriteError::Sync {
        path: dir.to_path_buf(),
        source,
    };
    let handle = File::open(dir).map_err(sync_error)?;
    // SAFETY: syncfs takes a file descriptor that stays open for the call.
    let rc = unsafe { libc::syncfs(handle.as_raw_fd()) };
    if rc != 0 {
        return Err(sync_error(io::Error::last_os_error()));
    }
    Ok(())
}

/// Replaces one file atomically and durably: stage, publish, sync the directory.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), WriteError> {
    let staged = stage(dir, name, bytes)?;
    if let Err(e) = publish(&staged) {
        discard(staged);
        return Err(e);
    }
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), "a.json", b"one").unwrap();
        write_atomic(dir.path(), "a.json", b"two").unwrap();
        assert_eq!(fs::read(dir.path().join("a.json")).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["a.json".to_string()]);
    }

    #[test]
    fn a_failed_write_is_not_fatal_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = write_atomic(&missing, "a.json", b"x").unwrap_err();
        assert!(!err.is_fatal(), "{err}");
        assert!(!missing.exists());
    }

    #[test]
    fn refused_renames_are_told_from_ambiguous_ones() {
        let rename = |errno| WriteError::Rename {
            from: "a".into(),
            to: "b".into(),
            source: io::Error::from_raw_os_error(errno),
        };
        assert!(rename(libc::EROFS).is_refusal());
        assert!(rename(libc::ENOSPC).is_refusal());
        assert!(!rename(libc::EIO).is_refusal());
        assert!(
            rename(libc::EROFS).is_fatal(),
            "for job files a rename stays fatal"
        );
        let sync = WriteError::Sync {
            path: "a".into(),
            source: io::Error::from_raw_os_error(libc::EIO),
        };
        assert!(!sync.is_refusal());
    }

    #[test]
    fn temp_names_are_recognised() {
        assert!(is_temp_name(&temp_name("queue.json")));
        assert!(!is_temp_name("queue.json"));
        assert!(!is_temp_name("123e4567-e89b-12d3-a456-426614174000.json"));
    }
}
