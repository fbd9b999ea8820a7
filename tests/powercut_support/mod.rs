//! The power-cut model of tests/powercut.rs: the recorder (`shim.c`, an LD_PRELOAD library
//! compiled here with the system `cc`), its record, and the data dir that a power cut at a
//! chosen moment would leave, rebuilt from that record.
//!
//! # What a power cut leaves (the model)
//!
//! Conservative, in the spirit of ext4 without its journal's help: only what the program
//! explicitly made durable survives, and nothing else does.
//! - A regular file's content is the content it had when its last successful `fsync` or
//!   `fdatasync` at or before the cut began (or, on a descriptor opened with `O_SYNC` or
//!   `O_DSYNC`, after its last write). Files are identified by inode and birth time, so the
//!   content follows the file across renames, and a reused inode number is another file.
//!   Data written after that point is lost: the file keeps its last synced content
//!   ([`Tail::Lost`]), or, in the variant [`Tail::Zeroed`], that content padded with zeros to
//!   the length the directory entry had when it became durable (the size reached the disk,
//!   the data did not). A file never synced is empty (or all zeros).
//! - A directory's entries are the ones it had when its last successful `fsync` (or
//!   `fdatasync`) at or before the cut began; a name links the file it named then. So a
//!   rename or a new file not followed by an fsync of its directory is not durable, and
//!   neither is a removal. A directory never synced is empty (its own entry in its parent
//!   depends on the parent's syncs).
//! - `syncfs` makes all of the above durable for every file and directory under the data
//!   dir, as they were when it began.
//! - The data dir itself exists (the operator made it; its entry in its parent is not the
//!   daemon's to sync) and starts empty.
//!
//! A real ext4 keeps more: any fsync commits the journal, and with it every rename before
//! it. So whatever survives this model survives ext4 in its default mode; the converse is
//! the point of being conservative.
//!
//! Each sync is stamped with CLOCK_MONOTONIC after the call returned, and the clients stamp
//! their answers with the same clock: a job whose 2xx came at or before the cut must have been
//! made durable by syncs stamped before it.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The recorder's source.
pub const SHIM_SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/powercut_support/shim.c");

/// CLOCK_MONOTONIC in nanoseconds, the clock of the recorder's stamps.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec it is given.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Compiles the recorder into `dir`; `Err` says why it could not (no `cc`, a failed build).
pub fn build_shim(dir: &Path) -> Result<PathBuf, String> {
    let library = dir.join("libpowercut.so");
    let output = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-o"])
        .arg(&library)
        .arg(SHIM_SOURCE)
        .args(["-ldl", "-lpthread"])
        .output()
        .map_err(|e| format!("cannot run cc: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "cc failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(library)
}

/// One line of the record.
#[derive(Clone, Debug)]
pub struct Event {
    /// CLOCK_MONOTONIC ns, read after the call returned.
    pub t: u64,
    pub pid: i32,
    pub seq: u64,
    pub kind: Kind,
}

#[derive(Clone, Debug)]
pub enum Kind {
    /// A regular file's content became durable: `snap` holds it.
    File {
        ident: String,
        size: u64,
        snap: String,
        path: String,
    },
    /// A directory's entries became durable: `snap` lists them.
    Dir {
        path: String,
        snap: String,
    },
    /// A syncfs; its F and D events follow with the same stamp.
    Syncfs,
    Rename {
        from: String,
        to: String,
    },
    Unlink {
        path: String,
    },
    Mkdir {
        path: String,
    },
    /// A durability point the mutation made the record forget.
    Forgotten {
        call: String,
        path: String,
    },
}

/// One entry of a directory snapshot.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub name: String,
    /// `f` regular file, `d` directory, `o` anything else.
    pub kind: char,
    pub ident: String,
    pub size: u64,
}

/// What the recorder saw of one run.
pub struct Record {
    pub dir: PathBuf,
    /// In stamp order.
    pub events: Vec<Event>,
    files: HashMap<String, Vec<(u64, PathBuf)>>,
    dirs: HashMap<String, Vec<(u64, Vec<DirEntry>)>>,
    /// (pid, stamp) of every syncfs, whose snapshots carry the same stamp.
    syncfs_stamps: HashSet<(i32, u64)>,
}

/// How the unsynced part of a file is left after the cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tail {
    /// The last synced content, nothing after it.
    Lost,
    /// The last synced content, then zeros up to the size the durable directory entry had.
    Zeroed,
}

/// What a rebuild put in place.
#[derive(Default, Debug)]
pub struct Rebuilt {
    pub dirs: usize,
    pub files: usize,
    /// Files with no synced content at the cut (left empty or zeroed).
    pub unsynced_files: usize,
}

impl Record {
    /// Reads the record the recorder wrote into `dir` (`events` and `snap/`).
    pub fn load(dir: &Path) -> Record {
        let text = fs::read_to_string(dir.join("events")).unwrap_or_default();
        let mut events = Vec::new();
        for line in text.lines() {
            events.push(
                parse_line(line).unwrap_or_else(|| panic!("a malformed record line: {line:?}")),
            );
        }
        events.sort_by_key(|e| (e.t, e.pid, e.seq));
        let mut record = Record {
            dir: dir.to_path_buf(),
            events,
            files: HashMap::new(),
            dirs: HashMap::new(),
            syncfs_stamps: HashSet::new(),
        };
        for e in &record.events {
            match &e.kind {
                Kind::File { ident, snap, .. } => record
                    .files
                    .entry(ident.clone())
                    .or_default()
                    .push((e.t, dir.join("snap").join(snap))),
                Kind::Dir { path, snap } => {
                    let listing = fs::read_to_string(dir.join("snap").join(snap))
                        .unwrap_or_else(|e| panic!("read the listing {snap}: {e}"));
                    let entries = listing.lines().filter_map(parse_entry).collect();
                    record
                        .dirs
                        .entry(path.clone())
                        .or_default()
                        .push((e.t, entries));
                }
                Kind::Syncfs => {
                    record.syncfs_stamps.insert((e.pid, e.t));
                }
                _ => {}
            }
        }
        record
    }

    /// Whether `event` is one of a syncfs's snapshots rather than a sync of its own.
    pub fn in_syncfs(&self, event: &Event) -> bool {
        self.syncfs_stamps.contains(&(event.pid, event.t))
    }

    /// How many events of each kind: (file syncs, directory syncs, syncfs, renames, forgotten).
    pub fn counts(&self) -> (usize, usize, usize, usize, usize) {
        let mut c = (0, 0, 0, 0, 0);
        for e in &self.events {
            match e.kind {
                Kind::File { .. } => c.0 += 1,
                Kind::Dir { .. } => c.1 += 1,
                Kind::Syncfs => c.2 += 1,
                Kind::Rename { .. } => c.3 += 1,
                Kind::Forgotten { .. } => c.4 += 1,
                _ => {}
            }
        }
        c
    }

    /// The paths of the durability points the mutation made the record forget.
    pub fn forgotten(&self) -> Vec<&str> {
        self.events
            .iter()
            .filter_map(|e| match &e.kind {
                Kind::Forgotten { path, .. } => Some(path.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Writes into `into` (an empty or missing directory) the data dir a power cut at `cut`
    /// would leave.
    pub fn rebuild(&self, cut: u64, tail: Tail, into: &Path) -> Rebuilt {
        let mut rebuilt = Rebuilt::default();
        self.rebuild_dir(".", cut, tail, into, &mut rebuilt);
        rebuilt
    }

    fn rebuild_dir(&self, rel: &str, cut: u64, tail: Tail, into: &Path, out: &mut Rebuilt) {
        fs::create_dir_all(into).unwrap_or_else(|e| panic!("create {}: {e}", into.display()));
        out.dirs += 1;
        let Some(entries) = latest(self.dirs.get(rel), cut) else {
            return;
        };
        for entry in entries {
            let child_rel = if rel == "." {
                entry.name.clone()
            } else {
                format!("{rel}/{}", entry.name)
            };
            let target = into.join(&entry.name);
            match entry.kind {
                'd' => self.rebuild_dir(&child_rel, cut, tail, &target, out),
                'f' => {
                    let mut bytes = match latest(self.files.get(&entry.ident), cut) {
                        Some(snap) => fs::read(snap)
                            .unwrap_or_else(|e| panic!("read {}: {e}", snap.display())),
                        None => {
                            out.unsynced_files += 1;
                            Vec::new()
                        }
                    };
                    if tail == Tail::Zeroed && (bytes.len() as u64) < entry.size {
                        bytes.resize(entry.size as usize, 0);
                    }
                    fs::write(&target, bytes)
                        .unwrap_or_else(|e| panic!("write {}: {e}", target.display()));
                    out.files += 1;
                }
                _ => {}
            }
        }
    }
}

/// The last value stamped at or before `cut`.
fn latest<T>(history: Option<&Vec<(u64, T)>>, cut: u64) -> Option<&T> {
    history?
        .iter()
        .take_while(|(t, _)| *t <= cut)
        .last()
        .map(|(_, v)| v)
}

fn parse_entry(line: &str) -> Option<DirEntry> {
    let mut fields = line.splitn(4, ' ');
    let kind = fields.next()?.chars().next()?;
    let ident = fields.next()?.to_string();
    let size = fields.next()?.parse().ok()?;
    let name = fields.next()?.to_string();
    Some(DirEntry {
        name,
        kind,
        ident,
        size,
    })
}

fn parse_line(line: &str) -> Option<Event> {
    let mut fields = line.split(' ');
    let tag = fields.next()?;
    let t = fields.next()?.parse().ok()?;
    let pid = fields.next()?.parse().ok()?;
    let seq = fields.next()?.parse().ok()?;
    let rest: Vec<&str> = fields.collect();
    // Paths under the data dir have no spaces (the daemon's names are ids and fixed names).
    let kind = match (tag, rest.as_slice()) {
        ("F", [ident, size, snap, path]) => Kind::File {
            ident: ident.to_string(),
            size: size.parse().ok()?,
            snap: snap.to_string(),
            path: path.to_string(),
        },
        ("D", [path, snap]) => Kind::Dir {
            path: path.to_string(),
            snap: snap.to_string(),
        },
        ("S", []) => Kind::Syncfs,
        ("R", [from, "->", to]) => Kind::Rename {
            from: from.to_string(),
            to: to.to_string(),
        },
        ("U", [path]) => Kind::Unlink {
            path: path.to_string(),
        },
        ("K", [path]) => Kind::Mkdir {
            path: path.to_string(),
        },
        ("M", [call, path]) => Kind::Forgotten {
            call: call.to_string(),
            path: path.to_string(),
        },
        _ => return None,
    };
    Some(Event { t, pid, seq, kind })
}
