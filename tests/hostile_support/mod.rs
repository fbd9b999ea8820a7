//! Helpers shared by the reliability suites (tests/corrupt_state.rs, tests/hostile_input.rs):
//! a seeded generator, the daemon's address and memory as the OS sees them, and snapshots
//! of a directory tree.
//!
//! The generator is splitmix64 (Steele, Lea, Flood 2014): tiny, fast, and every case can be
//! reproduced from one `u64`. No crate is needed for it.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A seeded pseudo-random generator (splitmix64).
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`; `n` must not be 0.
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "below(0)");
        (self.next_u64() % n as u64) as usize
    }

    /// A number in `lo..=hi`.
    pub fn between(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }

    /// A random version-4 UUID, lowercase and hyphenated.
    pub fn uuid(&mut self) -> String {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.next_u64().to_le_bytes());
        b[8..].copy_from_slice(&self.next_u64().to_le_bytes());
        uuid::Builder::from_random_bytes(b)
            .into_uuid()
            .hyphenated()
            .to_string()
    }
}

/// The seed of case `index` of a suite whose base seed is `base`: consecutive cases get
/// unrelated streams, and any one case can be rerun alone.
pub fn case_seed(base: u64, index: usize) -> u64 {
    Rng::new(base ^ (index as u64).wrapping_mul(0xd134_2543_de82_ef95)).next_u64()
}

/// The address a daemon listens on, from its `listening` log line (`address=127.0.0.1:N`).
pub fn listen_address(stderr: &str) -> Option<SocketAddr> {
    let line = stderr.lines().find(|l| l.contains("listening"))?;
    let start = line.find("address=")? + "address=".len();
    let text = line[start..].split_whitespace().next()?;
    text.parse().ok()
}

/// A `Vm*` field of `/proc/<pid>/status`, in KiB.
pub fn proc_status_kib(pid: i32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Every entry under `root` except those `skip` rejects: a path relative to `root`, and the
/// content of a file (`None` for a directory). `skip` sees the relative path.
pub fn snapshot(root: &Path, skip: &dyn Fn(&Path) -> bool) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let relative = path
                .strip_prefix(root)
                .expect("an entry is under its root")
                .to_path_buf();
            if skip(&relative) {
                continue;
            }
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if is_dir {
                out.insert(relative, None);
                stack.push(path);
            } else {
                out.insert(relative, Some(fs::read(&path).unwrap_or_default()));
            }
        }
    }
    out
}

/// Whether `name` is `<lowercase hyphenated uuid>.json`.
pub fn is_job_file_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".json") else {
        return false;
    };
    stem.len() == 36
        && uuid::Uuid::try_parse(stem).is_ok_and(|u| u.hyphenated().to_string() == stem)
}
