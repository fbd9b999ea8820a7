//! The write-ahead journal (`journal/`): where a change becomes durable before it is
//! acknowledged (CONTRACT.md 6).
//!
//! The journal is a few segment files, `journal/segment-<n>`, each reused again and again so
//! that an append overwrites blocks the file already has: its flush (fdatasync) writes data,
//! not file metadata. A segment starts with a header page that says whether it is in use and
//! its sequence number; the records follow, each
//!
//! ```text
//! u32 length of the payload | u32 crc32 of (sequence, payload) | u64 sequence | payload | zeros to 8 bytes
//! ```
//!
//! all little-endian. The payload is one request of the store: its job records (the job file's
//! bytes) with their places in the queue, and its re-rankings. The sequence in every record is
//! its segment's: whatever an earlier use of the file left behind it carries an older one, so
//! a reader stops where this use's records end without the file ever being cleared.
//!
//! A segment is written only by the store thread (its header when it takes the segment into
//! use, then one write per group of requests and one fdatasync) and retired by the
//! checkpointer (its header marked retired, fdatasync) once the job files and `queue.json`
//! hold every record in it. Sequences only grow: a retired header keeps its number, and a new
//! use takes one above every number in the directory.
//!
//! [`read`] is pure: it reads the segments in use in sequence order and reports their
//! records, a torn tail (the last group of the last segment cut by a crash: never
//! acknowledged, dropped) and damage anywhere else (the segment goes to `quarantine/`).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::fsio::WriteError;
use crate::job::JobId;
use crate::store::Placement;

/// The name every segment starts with; the rest is its slot number.
pub const SEGMENT_PREFIX: &str = "segment-";

const MAGIC: [u8; 8] = *b"TWJRNL01";
const STATE_ACTIVE: u8 = 1;
const STATE_RETIRED: u8 = 2;
/// The header's bytes: magic, state, three zeros, sequence, crc32 of the 20 bytes before it.
const HEADER_LEN: usize = 24;
/// Records start on the second page, so that the header's page is written only when a
/// segment changes hands.
pub const RECORDS_START: u64 = 4096;
const RECORD_HEADER: usize = 16;
/// A record longer than this is damage, not a record (a job is at most a few MiB).
const MAX_RECORD: usize = 1 << 30;
/// A new segment file is this long (zeros), and grows by doubling as a group needs it.
pub const INITIAL_SEGMENT_BYTES: u64 = 64 * 1024;

/// The file name of slot `n`.
pub fn segment_name(n: u32) -> String {
    format!("{SEGMENT_PREFIX}{n}")
}

/// The slot number a segment's name gives, if it is one.
pub fn slot_of(name: &str) -> Option<u32> {
    let n = name.strip_prefix(SEGMENT_PREFIX)?;
    let slot: u32 = n.parse().ok()?;
    (segment_name(slot) == name).then_some(slot)
}

/// What a segment's header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    /// Never used, or cleared: holds no record.
    Free,
    /// In use under this sequence.
    Active(u64),
    /// Its records are all in the job files; the number it last had.
    Retired(u64),
    /// Magic present but the checksum or state is wrong.
    Damaged,
}

impl Header {
    fn encode(state: u8, seq: u64) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(&MAGIC);
        h[8] = state;
        h[12..20].copy_from_slice(&seq.to_le_bytes());
        let crc = crc32fast::hash(&h[..20]);
        h[20..24].copy_from_slice(&crc.to_le_bytes());
        h
    }

    fn decode(bytes: &[u8]) -> Header {
        if bytes.len() < HEADER_LEN || bytes[..8] != MAGIC {
            return Header::Free;
        }
        let crc = u32::from_le_bytes(bytes[20..24].try_into().expect("four bytes"));
        if crc != crc32fast::hash(&bytes[..20]) {
            return Header::Damaged;
        }
        let seq = u64::from_le_bytes(bytes[12..20].try_into().expect("eight bytes"));
        match bytes[8] {
            STATE_ACTIVE => Header::Active(seq),
            STATE_RETIRED => Header::Retired(seq),
            _ => Header::Damaged,
        }
    }

    /// The sequence number the header holds, in use or retired.
    pub fn seq(self) -> Option<u64> {
        match self {
            Header::Active(s) | Header::Retired(s) => Some(s),
            _ => None,
        }
    }
}

/// One job record of an entry: the job file's bytes and the job's place in the queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryChange {
    pub placement: Placement,
    pub job_bytes: Vec<u8>,
}

/// One request of the store, as a record holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub changes: Vec<EntryChange>,
    pub ranks: Vec<(JobId, u64)>,
}

/// Appends the payload of an entry to `out` (the record header is the writer's).
pub fn encode_payload(changes: &[(Placement, &[u8])], ranks: &[(JobId, u64)], out: &mut Vec<u8>) {
    out.extend_from_slice(&(changes.len() as u32).to_le_bytes());
    for (placement, bytes) in changes {
        let (tag, rank) = match placement {
            Placement::Off => (0u8, 0u64),
            Placement::Running(r) => (1, *r),
            Placement::Queued(r) => (2, *r),
        };
        out.push(tag);
        out.extend_from_slice(&rank.to_le_bytes());
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    out.extend_from_slice(&(ranks.len() as u32).to_le_bytes());
    for (id, rank) in ranks {
        out.extend_from_slice(id.as_uuid().as_bytes());
        out.extend_from_slice(&rank.to_le_bytes());
    }
}

/// Decodes a payload; `None` if it is not one (a record with a valid checksum that does not
/// decode is damage all the same).
pub fn decode_payload(mut bytes: &[u8]) -> Option<Entry> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if bytes.len() < n {
            return None;
        }
        let (head, rest) = bytes.split_at(n);
        *bytes = rest;
        Some(head)
    }
    fn u32_of(bytes: &mut &[u8]) -> Option<u32> {
        Some(u32::from_le_bytes(take(bytes, 4)?.try_into().ok()?))
    }
    fn u64_of(bytes: &mut &[u8]) -> Option<u64> {
        Some(u64::from_le_bytes(take(bytes, 8)?.try_into().ok()?))
    }
    let mut entry = Entry::default();
    let changes = u32_of(&mut bytes)?;
    for _ in 0..changes {
        let tag = take(&mut bytes, 1)?[0];
        let rank = u64_of(&mut bytes)?;
        let placement = match tag {
            0 => Placement::Off,
            1 => Placement::Running(rank),
            2 => Placement::Queued(rank),
            _ => return None,
        };
        let len = u32_of(&mut bytes)? as usize;
        let job_bytes = take(&mut bytes, len)?.to_vec();
        entry.changes.push(EntryChange {
            placement,
            job_bytes,
        });
    }
    let ranks = u32_of(&mut bytes)?;
    for _ in 0..ranks {
        let uuid = uuid::Uuid::from_slice(take(&mut bytes, 16)?).ok()?;
        let rank = u64_of(&mut bytes)?;
        entry.ranks.push((JobId::from_uuid(uuid), rank));
    }
    bytes.is_empty().then_some(entry)
}

fn padded(len: usize) -> usize {
    len.div_ceil(8) * 8
}

/// Appends a whole record (header, payload, padding) of sequence `seq` to `out`; `payload`
/// is appended by `fill`.
pub fn encode_record(seq: u64, out: &mut Vec<u8>, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER]);
    fill(out);
    let len = out.len() - start - RECORD_HEADER;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&seq.to_le_bytes());
    crc.update(&out[start + RECORD_HEADER..]);
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.finalize().to_le_bytes());
    out[start + 8..start + 16].copy_from_slice(&seq.to_le_bytes());
    out.resize(start + RECORD_HEADER + padded(len), 0);
}

/// How the records of a segment end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// After the last record come zeros or what an earlier use left (older sequences).
    Clean,
    /// The last record is cut or fails its checksum, and no record of this use follows it.
    Torn { offset: u64, reason: String },
    /// A bad record with records of this use after it: damage, not a crash's cut.
    Damaged { offset: u64, reason: String },
}

/// One segment as read.
#[derive(Debug)]
pub struct SegmentRead {
    pub path: PathBuf,
    pub header: Header,
    /// The records of this use in order, when the header says it is in use.
    pub entries: Vec<Entry>,
    pub end: End,
}

/// Reads one segment file.
pub fn read_segment(path: &Path) -> io::Result<SegmentRead> {
    let bytes = fs::read(path)?;
    let header = Header::decode(&bytes);
    let mut read = SegmentRead {
        path: path.to_path_buf(),
        header,
        entries: Vec::new(),
        end: End::Clean,
    };
    let Header::Active(seq) = header else {
        return Ok(read);
    };
    let mut pos = RECORDS_START as usize;
    let bad = loop {
        if pos + RECORD_HEADER > bytes.len() {
            if bytes[pos.min(bytes.len())..].iter().any(|b| *b != 0) {
                break Some((pos, "a record header cut short".to_string()));
            }
            break None;
        }
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().expect("four bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().expect("four bytes"));
        let rec_seq = u64::from_le_bytes(bytes[pos + 8..pos + 16].try_into().expect("eight"));
        if rec_seq != seq {
            // Zeros, or an earlier use's records: the end of this use's, unless records of
            // this use follow (checked below, as for any bad record).
            if len == 0 && crc == 0 && rec_seq == 0 {
                break None;
            }
            break Some((
                pos,
                format!("a record of sequence {rec_seq} in segment {seq}"),
            ));
        }
        let body = pos + RECORD_HEADER;
        if len > MAX_RECORD || body + len > bytes.len() {
            break Some((pos, format!("a record of {len} bytes cut short")));
        }
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&seq.to_le_bytes());
        hasher.update(&bytes[body..body + len]);
        if hasher.finalize() != crc {
            break Some((pos, "a record fails its checksum".to_string()));
        }
        let Some(entry) = decode_payload(&bytes[body..body + len]) else {
            // A checksum that holds over bytes that are not an entry: not a crash's doing.
            read.end = End::Damaged {
                offset: pos as u64,
                reason: "a record that is not a change of the store".into(),
            };
            return Ok(read);
        };
        read.entries.push(entry);
        pos = body + padded(len);
    };
    let Some((offset, reason)) = bad else {
        return Ok(read);
    };
    let stale = reason.starts_with("a record of sequence");
    read.end = if record_of_seq_after(&bytes, offset + 8, seq) {
        End::Damaged {
            offset: offset as u64,
            reason,
        }
    } else if stale {
        End::Clean
    } else {
        End::Torn {
            offset: offset as u64,
            reason,
        }
    };
    Ok(read)
}

/// Whether a valid record of sequence `seq` starts at any 8-byte boundary from `from` on.
fn record_of_seq_after(bytes: &[u8], from: usize, seq: u64) -> bool {
    let mut pos = padded(from);
    let want = seq.to_le_bytes();
    while pos + RECORD_HEADER <= bytes.len() {
        if bytes[pos + 8..pos + 16] == want {
            let len =
                u32::from_le_bytes(bytes[pos..pos + 4].try_into().expect("four bytes")) as usize;
            let crc = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().expect("four"));
            let body = pos + RECORD_HEADER;
            if len <= MAX_RECORD && body + len <= bytes.len() {
                let mut hasher = crc32fast::Hasher::new();
                hasher.update(&want);
                hasher.update(&bytes[body..body + len]);
                if hasher.finalize() == crc {
                    return true;
                }
            }
        }
        pos += 8;
    }
    false
}

/// The journal as read at boot.
#[derive(Debug, Default)]
pub struct JournalRead {
    /// Segments in use, in sequence order, with their records.
    pub segments: Vec<SegmentRead>,
    /// Segment files that are damaged (a bad header, or damage before the end of the
    /// journal), with why; their records before the damage are in `segments` too.
    pub damaged: Vec<(PathBuf, String)>,
    /// Torn tails dropped: what the last group of a crash left.
    pub torn: Vec<String>,
    /// The highest sequence number any header holds.
    pub last_seq: u64,
    /// Entries in the directory that are not segments.
    pub strangers: Vec<PathBuf>,
}

/// Reads `journal/` without changing it. A missing directory is an empty journal.
pub fn read(dir: &Path) -> io::Result<JournalRead> {
    let mut out = JournalRead::default();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries.collect::<io::Result<Vec<_>>>()?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    let mut active = Vec::new();
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let regular = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
        if slot_of(&name).is_none() || !regular {
            out.strangers.push(path);
            continue;
        }
        let segment = match read_segment(&path) {
            Ok(segment) => segment,
            Err(e) => {
                out.damaged.push((path, format!("unreadable: {e}")));
                continue;
            }
        };
        match segment.header {
            Header::Damaged => out
                .damaged
                .push((path, "a journal segment whose header is damaged".into())),
            Header::Free => {}
            Header::Retired(seq) => out.last_seq = out.last_seq.max(seq),
            Header::Active(seq) => {
                out.last_seq = out.last_seq.max(seq);
                active.push(segment);
            }
        }
    }
    active.sort_by_key(|s| s.header.seq());
    let last = active.len().saturating_sub(1);
    for (i, segment) in active.iter_mut().enumerate() {
        match &segment.end {
            End::Clean => {}
            End::Torn { offset, reason } if i == last => out.torn.push(format!(
                "{}: {reason} at byte {offset}: the last group a crash cut short, never acknowledged; dropped",
                segment.path.display()
            )),
            End::Torn { offset, reason } | End::Damaged { offset, reason } => out.damaged.push((
                segment.path.clone(),
                format!(
                    "journal segment damaged at byte {offset} ({reason}); the records before it are applied"
                ),
            )),
        }
    }
    out.segments = active;
    out.strangers.sort();
    Ok(out)
}

/// A segment file the store thread appends to.
#[derive(Debug)]
pub struct Segment {
    pub path: PathBuf,
    pub slot: u32,
    file: File,
    /// The file's length: appends within it overwrite blocks it already has.
    len: u64,
    /// Where the next record goes.
    end: u64,
    seq: u64,
}

impl Segment {
    /// Opens slot `slot` of `dir`, creating it (zeros, fsynced, and the directory fsynced)
    /// if it does not exist.
    pub fn open(dir: &Path, slot: u32) -> Result<Segment, WriteError> {
        let path = dir.join(segment_name(slot));
        let write_error = |path: &Path, source| WriteError::Write {
            path: path.to_path_buf(),
            source,
        };
        if let Ok(file) = OpenOptions::new().read(true).write(true).open(&path) {
            let len = file.metadata().map_err(|e| write_error(&path, e))?.len();
            return Ok(Segment {
                path,
                slot,
                file,
                len,
                end: RECORDS_START,
                seq: 0,
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| write_error(&path, e))?;
        let zeros = vec![0u8; INITIAL_SEGMENT_BYTES as usize];
        if let Err(e) = file.write_all_at(&zeros, 0) {
            let _ = fs::remove_file(&path);
            return Err(write_error(&path, e));
        }
        file.sync_all().map_err(|source| WriteError::Sync {
            path: path.clone(),
            source,
        })?;
        super::fsio::sync_dir(dir)?;
        Ok(Segment {
            path,
            slot,
            file,
            len: INITIAL_SEGMENT_BYTES,
            end: RECORDS_START,
            seq: 0,
        })
    }

    /// Takes the segment into use under `seq`: its header says so from the next flush on.
    pub fn activate(&mut self, seq: u64) -> Result<(), WriteError> {
        self.file
            .write_all_at(&Header::encode(STATE_ACTIVE, seq), 0)
            .map_err(|source| WriteError::Write {
                path: self.path.clone(),
                source,
            })?;
        self.seq = seq;
        self.end = RECORDS_START;
        Ok(())
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Bytes of records written since it was taken into use.
    pub fn used(&self) -> u64 {
        self.end - RECORDS_START
    }

    /// Writes `bytes` (whole records of this segment's sequence) after the last ones, growing
    /// the file with zeros first if they do not fit. On a failed write the bytes that landed
    /// before it (a short write, then the error) are overwritten with zeros, so that nothing
    /// of a refused group can be read back; if even that fails, the error is fatal. A write
    /// refused outright left nothing, and needs no clearing.
    pub fn append(&mut self, bytes: &[u8]) -> Result<(), WriteError> {
        let needed = self.end + bytes.len() as u64;
        if needed > self.len {
            let mut new_len = self.len.max(INITIAL_SEGMENT_BYTES);
            while new_len < needed {
                new_len *= 2;
            }
            let zeros = vec![0u8; (new_len - self.len) as usize];
            if let Err(source) = self.file.write_all_at(&zeros, self.len) {
                // What did land is zeros, which read as the end of the records; the length
                // is whatever the file now has.
                self.len = self.file.metadata().map(|m| m.len()).unwrap_or(self.len);
                return Err(WriteError::Write {
                    path: self.path.clone(),
                    source,
                });
            }
            self.len = new_len;
        }
        let mut landed = 0;
        let failed = loop {
            if landed == bytes.len() {
                break None;
            }
            match self
                .file
                .write_at(&bytes[landed..], self.end + landed as u64)
            {
                Ok(0) => break Some(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => landed += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Some(e),
            }
        };
        if let Some(source) = failed {
            // A call that fails writes nothing: when the first one failed, nothing of the
            // group is in the file, and there is nothing to clear.
            if landed == 0 {
                return Err(WriteError::Write {
                    path: self.path.clone(),
                    source,
                });
            }
            let zeros = vec![0u8; landed];
            if let Err(e) = self.file.write_all_at(&zeros, self.end) {
                return Err(WriteError::Sync {
                    path: self.path.clone(),
                    source: io::Error::new(
                        e.kind(),
                        format!("{source}, and clearing what may have landed failed: {e}"),
                    ),
                });
            }
            return Err(WriteError::Write {
                path: self.path.clone(),
                source,
            });
        }
        self.end = needed;
        Ok(())
    }

    /// Makes every append durable: fdatasync, which writes the data (and the length when the
    /// file grew), not the timestamps.
    pub fn flush(&self) -> Result<(), WriteError> {
        self.file.sync_data().map_err(|source| WriteError::Sync {
            path: self.path.clone(),
            source,
        })
    }
}

/// Marks the segment at `path` retired under `seq`, durably: its records are in the job
/// files now and must never be applied again.
pub fn retire(path: &Path, seq: u64) -> Result<(), WriteError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|source| WriteError::Write {
            path: path.to_path_buf(),
            source,
        })?;
    file.write_all_at(&Header::encode(STATE_RETIRED, seq), 0)
        .map_err(|source| WriteError::Write {
            path: path.to_path_buf(),
            source,
        })?;
    file.sync_data().map_err(|source| WriteError::Sync {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u8) -> (Placement, Vec<u8>) {
        (Placement::Queued(n as u64), vec![b'{', n, b'}'])
    }

    fn record(seq: u64, n: u8) -> Vec<u8> {
        let (placement, bytes) = entry(n);
        let mut out = Vec::new();
        encode_record(seq, &mut out, |out| {
            encode_payload(&[(placement, &bytes)], &[], out)
        });
        out
    }

    /// A segment file of sequence `seq` with records `ns`, as bytes.
    fn segment_bytes(seq: u64, ns: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0u8; RECORDS_START as usize];
        bytes[..HEADER_LEN].copy_from_slice(&Header::encode(STATE_ACTIVE, seq));
        for n in ns {
            bytes.extend(record(seq, *n));
        }
        bytes.resize(bytes.len() + 4096, 0);
        bytes
    }

    fn numbers(segment: &SegmentRead) -> Vec<u8> {
        segment
            .entries
            .iter()
            .map(|e| e.changes[0].job_bytes[1])
            .collect()
    }

    #[test]
    fn payloads_round_trip() {
        let id = JobId::from_uuid(uuid::Uuid::from_u128(7));
        let mut out = Vec::new();
        encode_payload(
            &[
                (Placement::Running(3), b"abc".as_slice()),
                (Placement::Off, b"".as_slice()),
            ],
            &[(id, 9)],
            &mut out,
        );
        let entry = decode_payload(&out).unwrap();
        assert_eq!(entry.changes[0].placement, Placement::Running(3));
        assert_eq!(entry.changes[0].job_bytes, b"abc");
        assert_eq!(entry.changes[1].placement, Placement::Off);
        assert_eq!(entry.ranks, vec![(id, 9)]);
        assert!(decode_payload(&out[..out.len() - 1]).is_none());
    }

    #[test]
    fn a_segment_reads_its_own_records_and_stops_at_older_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_name(0));
        // An earlier use (sequence 4) left five records; the current one (5) wrote two.
        let mut bytes = segment_bytes(4, &[1, 2, 3, 4, 5]);
        let fresh = segment_bytes(5, &[7, 8]);
        let cut = RECORDS_START as usize + 2 * record(5, 7).len();
        bytes[..cut].copy_from_slice(&fresh[..cut]);
        fs::write(&path, &bytes).unwrap();
        let read = read_segment(&path).unwrap();
        assert_eq!(read.header, Header::Active(5));
        assert_eq!(numbers(&read), vec![7, 8]);
        assert_eq!(read.end, End::Clean);
    }

    #[test]
    fn a_torn_or_zeroed_tail_is_torn_and_mid_file_damage_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_name(0));
        let good = segment_bytes(1, &[1, 2, 3]);
        let rec = record(1, 1).len();
        let third = RECORDS_START as usize + 2 * rec;

        // The last record cut in the middle (a crash during the group's write).
        let mut torn = good.clone();
        torn[third + RECORD_HEADER + 2..].fill(0);
        fs::write(&path, &torn).unwrap();
        let read = read_segment(&path).unwrap();
        assert_eq!(numbers(&read), vec![1, 2]);
        assert!(matches!(read.end, End::Torn { .. }), "{:?}", read.end);

        // The last record zeroed: just the end.
        let mut zeroed = good.clone();
        zeroed[third..third + rec].fill(0);
        fs::write(&path, &zeroed).unwrap();
        let read = read_segment(&path).unwrap();
        assert_eq!(numbers(&read), vec![1, 2]);
        assert_eq!(read.end, End::Clean);

        // A flipped bit in the last record: fails its checksum, nothing after it.
        let mut flipped = good.clone();
        flipped[third + RECORD_HEADER + 1] ^= 1;
        fs::write(&path, &flipped).unwrap();
        let read = read_segment(&path).unwrap();
        assert!(matches!(read.end, End::Torn { .. }), "{:?}", read.end);

        // A flipped bit in the middle record: the third is still there, so it is damage.
        let mut mid = good.clone();
        mid[RECORDS_START as usize + rec + RECORD_HEADER + 1] ^= 1;
        fs::write(&path, &mid).unwrap();
        let read = read_segment(&path).unwrap();
        assert_eq!(numbers(&read), vec![1]);
        assert!(matches!(read.end, End::Damaged { .. }), "{:?}", read.end);

        // A damaged length in the middle, too.
        let mut length = good.clone();
        length[RECORDS_START as usize + rec] = 0xff;
        length[RECORDS_START as usize + rec + 3] = 0x7f;
        fs::write(&path, &length).unwrap();
        let read = read_segment(&path).unwrap();
        assert!(matches!(read.end, End::Damaged { .. }), "{:?}", read.end);
    }

    #[test]
    fn the_journal_reads_segments_in_sequence_order_and_tolerates_only_the_last_tail() {
        let dir = tempfile::tempdir().unwrap();
        let rec = record(1, 1).len();
        fs::write(dir.path().join(segment_name(0)), segment_bytes(8, &[3, 4])).unwrap();
        let mut first = segment_bytes(7, &[1, 2]);
        first[RECORDS_START as usize + rec + 20] ^= 1;
        fs::write(dir.path().join(segment_name(1)), &first).unwrap();
        let mut retired = segment_bytes(6, &[9]);
        retired[..HEADER_LEN].copy_from_slice(&Header::encode(STATE_RETIRED, 6));
        fs::write(dir.path().join(segment_name(2)), &retired).unwrap();
        fs::write(dir.path().join("notes"), b"x").unwrap();
        let read = read(dir.path()).unwrap();
        let seqs: Vec<_> = read.segments.iter().map(|s| s.header.seq()).collect();
        assert_eq!(seqs, vec![Some(7), Some(8)]);
        assert_eq!(read.last_seq, 8);
        // The torn end of segment 7 is not the journal's end: damage.
        assert_eq!(read.damaged.len(), 1, "{:?}", read.damaged);
        assert!(read.damaged[0].0.ends_with(segment_name(1)));
        assert!(read.torn.is_empty());
        assert_eq!(read.strangers.len(), 1);
    }

    #[test]
    fn a_written_segment_reads_back_and_a_retired_one_is_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        let mut segment = Segment::open(dir.path(), 0).unwrap();
        segment.activate(3).unwrap();
        let mut group = record(3, 1);
        group.extend(record(3, 2));
        segment.append(&group).unwrap();
        // Growing past the initial length.
        let big = vec![b'x'; INITIAL_SEGMENT_BYTES as usize];
        let mut out = Vec::new();
        encode_record(3, &mut out, |out| {
            encode_payload(&[(Placement::Off, &big)], &[], out)
        });
        segment.append(&out).unwrap();
        segment.flush().unwrap();
        let read = read(dir.path()).unwrap();
        assert_eq!(read.segments[0].entries.len(), 3);
        retire(&segment.path, 3).unwrap();
        let read = super::read(dir.path()).unwrap();
        assert!(read.segments.is_empty());
        assert_eq!(read.last_seq, 3);
        // Taken into use again under a higher number, the old records are not its own.
        let mut again = Segment::open(dir.path(), 0).unwrap();
        again.activate(4).unwrap();
        again.append(&record(4, 5)).unwrap();
        let read = super::read(dir.path()).unwrap();
        assert_eq!(numbers(&read.segments[0]), vec![5]);
        assert_eq!(read.segments[0].end, End::Clean);
    }

    #[test]
    fn slot_names_parse() {
        assert_eq!(slot_of("segment-3"), Some(3));
        assert_eq!(slot_of("segment-03"), None);
        assert_eq!(slot_of("segment-x"), None);
    }
}
