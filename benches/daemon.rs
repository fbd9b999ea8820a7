//! The daemon's speed and memory, measured side by side with the alternatives in one run.
//!
//! `cargo bench --bench daemon` runs everything and prints a Markdown table of medians
//! over `TW_BENCH_RUNS` runs (default 5), with the ratios BENCHMARKS.md quotes. Each
//! measurement starts after a sync(2), so that none pays for another's writeback:
//!
//! - durable enqueue over HTTP, 64 concurrent clients, worker paused, against two yardsticks
//!   measured in the same run: SQLite (WAL, `synchronous=FULL`, one committed transaction per
//!   job, one thread, in-process) and the disk's limit for per-job files (write a job-sized
//!   file to a temporary name, fsync, rename, one directory fsync per 64; best of 1 and 4
//!   threads; the same loop with 16 threads is reported beside it, not part of it, and so
//!   are 16 threads writing into one directory as the daemon's staging threads do, once with
//!   temporary names and renames and once with unnamed files (`O_TMPFILE`) linked into place);
//! - the CPU ceiling: the same enqueue with the data dir on tmpfs (`TW_BENCH_TMPFS`, default
//!   `/dev/shm`), where an fsync costs nothing, so the rate is what the daemon's own CPU (and
//!   the bench's client, on the same cores) allows; with the CPU time per job of the daemon
//!   and of the client, the machine's busy cores and the store's mean group size for every
//!   enqueue measurement;
//! - the same enqueue with 50,000 jobs already queued: worker paused, and worker running with
//!   backfill and its one GPU taken, so that every turn of its loop looks for a job to start;
//! - the seed's scheme (every change rewrites the job file and the whole `queue.json`, no
//!   fsync) at 0 and 20,000 queued;
//! - boot of 100,000 job files in mixed states until `/readyz` answers, against `cat` of the
//!   same files, with the daemon's peak RSS;
//! - idle RSS, and RSS with 100,000 jobs loaded;
//! - latency of one client's enqueue and of `GET /v1/jobs/{id}` with 100,000 jobs.
//!
//! Settings: TW_BENCH_RUNS (5), TW_BENCH_JOBS (jobs per enqueue measurement, 5000),
//! TW_BENCH_BOOT_JOBS (100000), TW_BENCH_QUEUED (50000), TW_BENCH_TMPFS (/dev/shm), and
//! TW_BENCH_ONLY=enqueue, which measures only the empty-queue enqueue and its yardsticks (for
//! comparing one change with another; BENCHMARKS.md quotes full runs), and TW_BENCH_KEEP,
//! which leaves the runs' files in place when the bench ends, so that a bench started right
//! after it does not pay for their removal. The daemon is the
//! release binary, or the one TW_BENCH_DAEMON names (a build of another commit, to compare
//! two in the same conditions), started on temporary data dirs under TMPDIR (same filesystem
//! as the yardsticks).

mod support;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::job_body;
use training_worker::job::{Job, JobId, Status};

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const CLIENTS: usize = 64;

// ---------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------

struct Daemon {
    child: Child,
    base: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local address")
        .port()
}

impl Daemon {
    /// The daemon with the worker paused, its store syncing the default way.
    fn spawn(data_dir: &Path) -> Daemon {
        Daemon::spawn_with(data_dir, "fsync")
    }

    /// The daemon with `[store] sync` set to `sync`.
    fn spawn_with(data_dir: &Path, sync: &str) -> Daemon {
        Daemon::spawn_config(
            data_dir,
            &format!(
                "[store]\nsync = \"{sync}\"\n[worker]\nmax_concurrent = 0\n[executor]\ncommand = [\"true\"]\n"
            ),
        )
    }

    /// The daemon with the configuration file `config`.
    fn spawn_config(data_dir: &Path, config_text: &str) -> Daemon {
        let port = free_port();
        let config = data_dir.with_extension("toml");
        fs::write(&config, config_text).expect("write config");
        let binary = std::env::var_os("TW_BENCH_DAEMON")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_training-worker").into());
        let child = Command::new(binary)
            .args(["serve", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .expect("start the daemon");
        Daemon {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Waits until /readyz answers 200; returns the time from `since`.
    async fn ready(&self, http: &reqwest::Client, since: Instant) -> Duration {
        loop {
            let answer = http.get(format!("{}/readyz", self.base)).send().await;
            if answer.is_ok_and(|r| r.status() == 200) {
                return since.elapsed();
            }
            assert!(
                since.elapsed() < Duration::from_secs(300),
                "daemon never became ready"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// (VmRSS, VmHWM) in MiB.
    fn memory(&self) -> (f64, f64) {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc status");
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
                .map(|kb| kb / 1024.0)
                .expect("memory field")
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// CPU time (user + system) the daemon has used so far, in seconds.
    fn cpu_seconds(&self) -> f64 {
        let stat =
            fs::read_to_string(format!("/proc/{}/stat", self.child.id())).expect("read /proc stat");
        // The fields after the command name, which is in parentheses and may hold spaces:
        // utime and stime are the 14th and 15th fields of the line.
        let rest = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 =
            fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
        // SAFETY: sysconf only reads a configuration value.
        ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }

    fn stop(mut self) {
        // SAFETY: kill only sends a signal.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let status = self.child.wait().expect("wait for the daemon");
        assert!(status.success(), "daemon exited with {status}");
    }
}

async fn submit(http: &reqwest::Client, base: &str, n: usize) {
    let r = http
        .post(format!("{base}/v1/jobs"))
        .header("content-type", "application/json")
        .body(job_body(n))
        .send()
        .await
        .expect("submit");
    assert_eq!(r.status(), 201, "submission {n}");
}

/// CPU time (user + system) this process (the bench, whose only work during an enqueue
/// measurement is the HTTP client) has used so far, in seconds.
fn own_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Measures `jobs` submissions from `CLIENTS` concurrent clients into `daemon`, as `name`:
/// the rate in jobs/s, and the CPU time per job of the daemon and of the client in µs.
async fn measure_enqueue(
    s: &mut Samples,
    name: &str,
    http: &reqwest::Client,
    daemon: &Daemon,
    jobs: usize,
    offset: usize,
) -> f64 {
    let groups_before = store_groups(http, &daemon.base).await;
    let (daemon_before, client_before) = (daemon.cpu_seconds(), own_cpu_seconds());
    let machine_before = machine_busy();
    let rate = enqueue_rate(http, &daemon.base, jobs, offset).await;
    let machine_after = machine_busy();
    s.add(
        &format!("{name}: cores busy"),
        cores_busy(machine_before, machine_after),
    );
    let groups_after = store_groups(http, &daemon.base).await;
    let groups = groups_after.1 - groups_before.1;
    if groups > 0.0 {
        s.add(
            &format!("{name}: jobs per group"),
            (groups_after.0 - groups_before.0) / groups,
        );
    }
    let per_job = |seconds: f64| seconds / jobs as f64 * 1e6;
    s.add(name, rate);
    s.add(
        &format!("{name}: daemon CPU"),
        per_job(daemon.cpu_seconds() - daemon_before),
    );
    s.add(
        &format!("{name}: client CPU"),
        per_job(own_cpu_seconds() - client_before),
    );
    rate
}

/// The whole machine's CPU time from `/proc/stat`, in ticks: (busy, busy + idle), where
/// idle includes waiting for I/O. Every process and kernel thread counts, so the fsyncs'
/// work in the block layer's kernel threads and interrupts is seen too.
fn machine_busy() -> (f64, f64) {
    let stat = fs::read_to_string("/proc/stat").expect("/proc/stat");
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .expect("cpu line")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: f64 = fields.iter().take(8).sum();
    let idle = fields[3] + fields[4];
    (total - idle, total)
}

/// Runs `work`, a yardstick in this process that returns a rate, and records it as `name`
/// with this process's CPU time per job and the machine's busy cores meanwhile.
fn measure_loop(s: &mut Samples, name: &str, jobs: usize, work: impl FnOnce() -> f64) -> f64 {
    let (cpu_before, machine_before) = (own_cpu_seconds(), machine_busy());
    let rate = work();
    let (cpu_after, machine_after) = (own_cpu_seconds(), machine_busy());
    s.add(name, rate);
    s.add(
        &format!("{name}: CPU"),
        (cpu_after - cpu_before) / jobs as f64 * 1e6,
    );
    s.add(
        &format!("{name}: cores busy"),
        cores_busy(machine_before, machine_after),
    );
    rate
}

/// How many cores were busy on average between two [`machine_busy`] readings.
fn cores_busy(before: (f64, f64), after: (f64, f64)) -> f64 {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    (after.0 - before.0) / (after.1 - before.1) * cores as f64
}

/// The store's group commits so far, from `/metrics`: (job records written, groups).
async fn store_groups(http: &reqwest::Client, base: &str) -> (f64, f64) {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    let value = |suffix: &str| {
        text.lines()
            .find_map(|line| {
                let (name, value) = line.split_once(' ')?;
                name.ends_with(suffix).then(|| value.parse::<f64>().ok())?
            })
            .unwrap_or(0.0)
    };
    (
        value("store_batch_jobs_sum"),
        value("store_batch_jobs_count"),
    )
}

/// Jobs per second for `jobs` submissions from `CLIENTS` concurrent clients.
async fn enqueue_rate(http: &reqwest::Client, base: &str, jobs: usize, offset: usize) -> f64 {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let http = http.clone();
        let base = base.to_string();
        tasks.push(tokio::spawn(async move {
            let mut n = c;
            while n < jobs {
                submit(&http, &base, offset + n).await;
                n += CLIENTS;
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    jobs as f64 / started.elapsed().as_secs_f64()
}

/// p50 and p99 in milliseconds of `count` calls of `call`, one at a time.
async fn latencies<F: AsyncFnMut(usize)>(count: usize, mut call: F) -> (f64, f64) {
    let mut samples = Vec::with_capacity(count);
    for n in 0..count {
        let t = Instant::now();
        call(n).await;
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    (
        percentile(&mut samples, 0.50),
        percentile(&mut samples, 0.99),
    )
}

// ---------------------------------------------------------------------------------------
// Data dirs made directly, for boot and for a long queue
// ---------------------------------------------------------------------------------------

/// Writes `total` job files in mixed states and a matching queue.json: the last `queued`
/// jobs are Queued (and 1% of the rest Running), the others finished. Returns the ids.
fn make_data_dir(dir: &Path, total: usize, queued: usize) -> Vec<JobId> {
    let jobs_dir = dir.join("jobs");
    fs::create_dir_all(&jobs_dir).expect("create jobs dir");
    let base = chrono::Utc::now() - chrono::Duration::days(30);
    let mut running = Vec::new();
    let mut waiting = Vec::new();
    let mut ids = Vec::with_capacity(total);
    for n in 0..total {
        let value: serde_json::Value = serde_json::from_str(&job_body(n)).expect("body");
        let created = base + chrono::Duration::milliseconds(n as i64);
        let mut job = Job::from_submission(value, created).expect("valid job");
        job.id = JobId::from_uuid(uuid::Uuid::from_u128(0x1000_0000 + n as u128));
        if n + queued >= total {
            waiting.push(job.id);
        } else if n % 100 == 0 {
            job.start(created, None);
            running.push(job.id);
        } else {
            job.start(created, None);
            let status = [Status::Completed, Status::Failed, Status::Cancelled][n % 3];
            let message =
                (status != Status::Completed).then(|| "trainer exited with status 1".to_string());
            job.finish(status, message, created + chrono::Duration::hours(2));
        }
        fs::write(
            jobs_dir.join(format!("{}.json", job.id)),
            job.to_file_bytes(),
        )
        .expect("write job file");
        ids.push(job.id);
    }
    let queue = json!({
        "running": running.iter().map(|id| id.to_string()).collect::<Vec<_>>(),
        "queued": waiting.iter().map(|id| id.to_string()).collect::<Vec<_>>(),
    });
    fs::write(dir.join("queue.json"), queue.to_string()).expect("write queue.json");
    ids
}

/// `cat` of every job file, as a shell does it; the floor for any replay.
fn cat_all(dir: &Path) -> Duration {
    let started = Instant::now();
    let status = Command::new("sh")
        .arg("-c")
        .arg("find jobs -name '*.json' -print0 | xargs -0 cat > /dev/null")
        .current_dir(dir)
        .status()
        .expect("run cat");
    assert!(status.success());
    started.elapsed()
}

// ---------------------------------------------------------------------------------------
// Yardsticks
// ---------------------------------------------------------------------------------------

/// SQLite in WAL mode with synchronous=FULL, one committed transaction per job, one thread.
fn sqlite_rate(dir: &Path, jobs: usize) -> f64 {
    let conn = rusqlite::Connection::open(dir.join("jobs.sqlite")).expect("open sqlite");
    conn.pragma_update(None, "journal_mode", "WAL")
        .expect("wal");
    conn.pragma_update(None, "synchronous", "FULL")
        .expect("full");
    conn.execute(
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, status TEXT NOT NULL, body TEXT NOT NULL)",
        [],
    )
    .expect("create table");
    let bodies: Vec<String> = (0..jobs).map(job_body).collect();
    let started = Instant::now();
    for (n, body) in bodies.iter().enumerate() {
        let tx = conn.unchecked_transaction().expect("begin");
        tx.execute(
            "INSERT INTO jobs (id, status, body) VALUES (?1, 'Queued', ?2)",
            (uuid::Uuid::from_u128(n as u128).to_string(), body),
        )
        .expect("insert");
        tx.commit().expect("commit");
    }
    jobs as f64 / started.elapsed().as_secs_f64()
}

/// Where and how a disk loop's threads write their files.
#[derive(Clone, Copy, PartialEq)]
enum Files {
    /// Each thread in its own directory, to a temporary name, fsynced, renamed: the
    /// yardstick.
    OwnDirs,
    /// All threads in one directory, as the store's staging threads write `jobs/`: on ext4
    /// without a journal, the fsync of a newly named file also syncs its directory.
    OneDir,
    /// One directory, each file created unnamed (`O_TMPFILE`), fsynced, then linked into
    /// place (`linkat`): no name, so its fsync leaves the directory alone. Not what the
    /// daemon does; what that way of publishing a new file would give.
    OneDirLinked,
}

/// `threads` threads write `jobs` job-sized files the way `files` says, each fsynced, with
/// one fsync of the directory per 64 files.
fn disk_loop_rate(dir: &Path, jobs: usize, threads: usize, files: Files) -> f64 {
    let body = job_body(0).into_bytes();
    let started = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..threads {
            let body = &body;
            scope.spawn(move || {
                let d = match files {
                    Files::OwnDirs => dir.join(format!("loop-{threads}-{t}")),
                    Files::OneDir => dir.join(format!("shared-{threads}")),
                    Files::OneDirLinked => dir.join(format!("shared-{threads}-linked")),
                };
                fs::create_dir_all(&d).expect("loop dir");
                let dir_file = fs::File::open(&d).expect("open dir");
                for n in (t..jobs).step_by(threads) {
                    let target = d.join(format!("{n}.json"));
                    if files == Files::OneDirLinked {
                        write_linked(&d, &target, body);
                    } else {
                        let temp = d.join(format!(".{n}.tmp"));
                        let mut f = fs::File::create(&temp).expect("create");
                        f.write_all(body).expect("write");
                        f.sync_all().expect("fsync");
                        fs::rename(&temp, &target).expect("rename");
                    }
                    if n % 64 == 63 {
                        dir_file.sync_all().expect("dir fsync");
                    }
                }
                dir_file.sync_all().expect("dir fsync");
            });
        }
    });
    jobs as f64 / started.elapsed().as_secs_f64()
}

/// Creates an unnamed file in `dir` (`O_TMPFILE`), writes and fsyncs it, and links it in as
/// `target`.
fn write_linked(dir: &Path, target: &Path, body: &[u8]) {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd};
    let c_path = |p: &Path| CString::new(p.as_os_str().as_encoded_bytes()).expect("a path");
    let (dir, target) = (c_path(dir), c_path(target));
    // SAFETY: open with a valid C string; the descriptor is owned by the File made from it.
    let fd = unsafe { libc::open(dir.as_ptr(), libc::O_TMPFILE | libc::O_WRONLY, 0o644) };
    assert!(fd >= 0, "O_TMPFILE: {}", std::io::Error::last_os_error());
    let mut f = unsafe { fs::File::from_raw_fd(fd) };
    f.write_all(body).expect("write");
    f.sync_all().expect("fsync");
    // SAFETY: linkat with an open descriptor and valid C strings.
    let rc = unsafe {
        libc::linkat(
            f.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    assert_eq!(rc, 0, "linkat: {}", std::io::Error::last_os_error());
}

/// The other way to make a batch durable: write a batch of 64 temporary files without
/// fsync, one syncfs(2) for the whole filesystem, rename them, one directory fsync.
fn syncfs_loop_rate(dir: &Path, jobs: usize) -> f64 {
    use std::os::fd::AsRawFd;
    let body = job_body(0).into_bytes();
    let d = dir.join("syncfs-loop");
    fs::create_dir_all(&d).expect("loop dir");
    let dir_file = fs::File::open(&d).expect("open dir");
    let started = Instant::now();
    for first in (0..jobs).step_by(64) {
        let batch: Vec<usize> = (first..jobs.min(first + 64)).collect();
        for n in &batch {
            let mut f = fs::File::create(d.join(format!(".{n}.tmp"))).expect("create");
            f.write_all(&body).expect("write");
        }
        // SAFETY: syncfs takes a file descriptor that stays open for the call.
        let rc = unsafe { libc::syncfs(dir_file.as_raw_fd()) };
        assert_eq!(rc, 0, "syncfs failed");
        for n in &batch {
            fs::rename(d.join(format!(".{n}.tmp")), d.join(format!("{n}.json"))).expect("rename");
        }
        dir_file.sync_all().expect("dir fsync");
    }
    jobs as f64 / started.elapsed().as_secs_f64()
}

/// The seed's scheme: every change rewrites the job file and the whole queue.json, without
/// fsync, with `prefill` jobs already queued.
fn seed_scheme_rate(dir: &Path, jobs: usize, prefill: usize) -> f64 {
    let d = dir.join(format!("seed-{prefill}"));
    fs::create_dir_all(d.join("jobs")).expect("seed dir");
    let mut queued: Vec<String> = (0..prefill)
        .map(|n| uuid::Uuid::from_u128(n as u128).to_string())
        .collect();
    let started = Instant::now();
    for n in 0..jobs {
        let id = uuid::Uuid::from_u128((prefill + n) as u128).to_string();
        fs::write(d.join("jobs").join(format!("{id}.json")), job_body(n)).expect("job file");
        queued.push(id);
        let queue = json!({"running": [], "queued": queued});
        fs::write(
            d.join("queue.json"),
            serde_json::to_vec(&queue).expect("json"),
        )
        .expect("queue file");
    }
    jobs as f64 / started.elapsed().as_secs_f64()
}

// ---------------------------------------------------------------------------------------

/// Flushes every dirty page of the machine, so that one measurement's leftover writeback
/// (the seed scheme leaves hundreds of megabytes unsynced) does not slow the next one.
fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values[((values.len() as f64 - 1.0) * p).round() as usize]
}

#[derive(Default)]
struct Samples {
    rows: Vec<(String, Vec<f64>)>,
}

impl Samples {
    fn add(&mut self, name: &str, value: f64) {
        match self.rows.iter_mut().find(|(n, _)| n == name) {
            Some((_, values)) => values.push(value),
            None => self.rows.push((name.to_string(), vec![value])),
        }
    }

    fn median(&self, name: &str) -> f64 {
        let (_, values) = self.rows.iter().find(|(n, _)| n == name).expect("measured");
        median(values)
    }
}

fn temp_root() -> PathBuf {
    std::env::var_os("TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

/// Where the CPU ceiling's data dir goes: a tmpfs, where an fsync costs nothing.
fn tmpfs_root() -> Option<PathBuf> {
    let root = std::env::var_os("TW_BENCH_TMPFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/shm"));
    root.is_dir().then_some(root)
}

/// The last value measured for `name`, for the line each run prints.
fn last(s: &Samples, name: &str) -> f64 {
    s.rows
        .iter()
        .find(|r| r.0 == name)
        .map_or(0.0, |r| r.1[r.1.len() - 1])
}

#[tokio::main]
async fn main() {
    let runs = setting("TW_BENCH_RUNS", 5).max(1);
    let jobs = setting("TW_BENCH_JOBS", 5000).max(CLIENTS);
    let boot_jobs = setting("TW_BENCH_BOOT_JOBS", 100_000);
    let long_queue = setting("TW_BENCH_QUEUED", 50_000);
    let quick = std::env::var("TW_BENCH_ONLY").is_ok_and(|v| v == "enqueue");
    let tmpfs = tmpfs_root();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .build()
        .expect("http client");
    let mut s = Samples::default();
    // Every run's files are kept until the end: removing a few hundred thousand files makes
    // ext4 skip the recently freed inodes when it next creates files, which slowed the next
    // run's file creation several times over and measured the harness, not the daemon.
    let mut kept = Vec::new();

    for run in 1..=runs {
        let dir = tempfile::tempdir_in(temp_root()).expect("temp dir");
        eprintln!("run {run}/{runs} in {}", dir.path().display());

        // Yardsticks, each after the writes of the one before have reached the disk.
        settle();
        s.add("sqlite", sqlite_rate(dir.path(), jobs));
        settle();
        let loop1 = measure_loop(&mut s, "disk loop, 1 thread", jobs, || {
            disk_loop_rate(dir.path(), jobs, 1, Files::OwnDirs)
        });
        settle();
        let loop4 = measure_loop(&mut s, "disk loop, 4 threads", jobs, || {
            disk_loop_rate(dir.path(), jobs, 4, Files::OwnDirs)
        });
        s.add("disk loop", loop1.max(loop4));
        settle();
        // Not part of the yardstick: the same loop with as many threads as the daemon's
        // staging pool, for what the disk gives at that concurrency.
        measure_loop(&mut s, "disk loop, 16 threads", jobs, || {
            disk_loop_rate(dir.path(), jobs, 16, Files::OwnDirs)
        });
        settle();
        measure_loop(&mut s, "one dir, 16 threads, renamed", jobs, || {
            disk_loop_rate(dir.path(), jobs, 16, Files::OneDir)
        });
        settle();
        measure_loop(&mut s, "one dir, 16 threads, linked", jobs, || {
            disk_loop_rate(dir.path(), jobs, 16, Files::OneDirLinked)
        });
        settle();
        measure_loop(&mut s, "syncfs loop", jobs, || {
            syncfs_loop_rate(dir.path(), jobs)
        });
        settle();
        if !quick {
            s.add(
                "seed scheme, empty queue",
                seed_scheme_rate(dir.path(), 2000, 0),
            );
            settle();
            s.add(
                "seed scheme, 20000 queued",
                seed_scheme_rate(dir.path(), 300, 20_000),
            );
            settle();
        }

        // The daemon, empty queue: idle RSS, enqueue, latency.
        let data = dir.path().join("empty");
        let daemon = Daemon::spawn(&data);
        daemon.ready(&http, Instant::now()).await;
        s.add("idle RSS", daemon.memory().0);
        measure_enqueue(&mut s, "enqueue, empty queue", &http, &daemon, jobs, 0).await;
        let (p50, p99) =
            latencies(500, async |n| submit(&http, &daemon.base, jobs + n).await).await;
        s.add("enqueue p50", p50);
        s.add("enqueue p99", p99);
        daemon.stop();

        // The same with one syncfs per batch instead of a parallel fsync per file.
        let data = dir.path().join("empty-syncfs");
        settle();
        let daemon = Daemon::spawn_with(&data, "syncfs");
        daemon.ready(&http, Instant::now()).await;
        let name = "enqueue, empty queue, syncfs";
        measure_enqueue(&mut s, name, &http, &daemon, jobs, 0).await;
        daemon.stop();
        settle();

        // The CPU ceiling: the same daemon (default fsync mode) with its data dir on tmpfs,
        // where an fsync returns at once. Removed right away: tmpfs keeps no freed inodes.
        if let Some(root) = &tmpfs {
            let shm = tempfile::tempdir_in(root).expect("tmpfs temp dir");
            let daemon = Daemon::spawn(&shm.path().join("data"));
            daemon.ready(&http, Instant::now()).await;
            let name = "enqueue, tmpfs";
            measure_enqueue(&mut s, name, &http, &daemon, jobs, 0).await;
            daemon.stop();
        }

        if !quick {
            // The daemon with a long queue.
            let data = dir.path().join("long");
            make_data_dir(&data, long_queue, long_queue);
            settle();
            let daemon = Daemon::spawn(&data);
            daemon.ready(&http, Instant::now()).await;
            let name = "enqueue, long queue";
            measure_enqueue(&mut s, name, &http, &daemon, jobs, long_queue).await;
            daemon.stop();

            // The same queue with the worker running: backfill on, one GPU, taken by the
            // first job, a slot still free. Every turn of the worker's loop asks whether a
            // queued job can start, so this is where a scan of the whole queue would show.
            settle();
            let daemon = Daemon::spawn_config(
                &data,
                "[worker]\nmax_concurrent = 2\ngpus = [0]\nbackfill = true\n[executor]\ncommand = [\"sleep\", \"3600\"]\n",
            );
            daemon.ready(&http, Instant::now()).await;
            let name = "enqueue, long queue, backfill";
            let offset = long_queue + jobs;
            measure_enqueue(&mut s, name, &http, &daemon, jobs, offset).await;
            daemon.stop();

            // Boot of many jobs, against cat.
            let data = dir.path().join("boot");
            let ids = make_data_dir(&data, boot_jobs, boot_jobs / 10);
            settle();
            s.add("cat", cat_all(&data).as_secs_f64() * 1000.0);
            let started = Instant::now();
            let daemon = Daemon::spawn(&data);
            s.add(
                "boot",
                daemon.ready(&http, started).await.as_secs_f64() * 1000.0,
            );
            let (rss, hwm) = daemon.memory();
            s.add("RSS with boot jobs", rss);
            s.add("peak RSS at boot", hwm);
            let (p50, p99) = latencies(1000, async |n| {
                let id = ids[(n * 7919) % ids.len()];
                let r = http
                    .get(format!("{}/v1/jobs/{id}", daemon.base))
                    .send()
                    .await
                    .expect("get");
                assert_eq!(r.status(), 200);
            })
            .await;
            s.add("get p50", p50);
            s.add("get p99", p99);
            daemon.stop();
        }
        eprintln!(
            "  enqueue {:.0}/s (syncfs {:.0}/s, tmpfs {:.0}/s, long queue {:.0}/s), sqlite {:.0}/s, disk loop {:.0}/s (1 thread {:.0}, 4 threads {:.0}), boot {:.0} ms vs cat {:.0} ms",
            last(&s, "enqueue, empty queue"),
            last(&s, "enqueue, empty queue, syncfs"),
            last(&s, "enqueue, tmpfs"),
            last(&s, "enqueue, long queue"),
            last(&s, "sqlite"),
            loop1.max(loop4),
            loop1,
            loop4,
            last(&s, "boot"),
            last(&s, "cat"),
        );
        kept.push(dir);
    }

    if std::env::var_os("TW_BENCH_KEEP").is_some() {
        // Comparisons run one after another: removing this run's files would slow the next
        // one's file creation (see above), so they stay for the caller to remove later.
        for dir in kept {
            eprintln!("kept {}", dir.keep().display());
        }
    } else {
        drop(kept);
    }
    print_table(&s, runs, jobs, quick, boot_jobs, long_queue);
}

fn print_table(
    s: &Samples,
    runs: usize,
    jobs: usize,
    quick: bool,
    boot_jobs: usize,
    long_queue: usize,
) {
    eprintln!("\nper run:");
    for (name, values) in &s.rows {
        let shown: Vec<String> = values
            .iter()
            .map(|v| {
                if *v < 100.0 {
                    format!("{v:.2}")
                } else {
                    format!("{v:.0}")
                }
            })
            .collect();
        eprintln!("  {name}: {}", shown.join(", "));
    }
    let enqueue = s.median("enqueue, empty queue");
    let sqlite = s.median("sqlite");
    let disk_loop = s.median("disk loop");
    let cpu = |name: &str| {
        format!(
            "CPU per job: daemon {:.0} µs, client {:.0} µs; cores busy {:.2} of {}; {:.1} jobs per group",
            s.median(&format!("{name}: daemon CPU")),
            s.median(&format!("{name}: client CPU")),
            s.median(&format!("{name}: cores busy")),
            std::thread::available_parallelism().map_or(1, usize::from),
            s.median(&format!("{name}: jobs per group")),
        )
    };
    let by_loop = |name: &str| {
        format!(
            "CPU per file {:.0} µs; cores busy {:.2}",
            s.median(&format!("{name}: CPU")),
            s.median(&format!("{name}: cores busy")),
        )
    };
    println!("\n| measure (median of {runs} runs) | value | ratio |");
    println!("|---|---|---|");
    println!(
        "| durable enqueue over HTTP, {CLIENTS} clients, {jobs} jobs, empty queue (`sync = \"fsync\"`) | {enqueue:.0} jobs/s | daemon / SQLite = {:.2}; / disk loop = {:.2}; {} |",
        enqueue / sqlite,
        enqueue / disk_loop,
        cpu("enqueue, empty queue")
    );
    let enqueue_syncfs = s.median("enqueue, empty queue, syncfs");
    println!(
        "| the same with `[store] sync = \"syncfs\"` (one syncfs per batch) | {enqueue_syncfs:.0} jobs/s | daemon / SQLite = {:.2}; / disk loop = {:.2}; syncfs / fsync = {:.2}; {} |",
        enqueue_syncfs / sqlite,
        enqueue_syncfs / disk_loop,
        enqueue_syncfs / enqueue,
        cpu("enqueue, empty queue, syncfs")
    );
    if s.rows.iter().any(|r| r.0 == "enqueue, tmpfs") {
        let ceiling = s.median("enqueue, tmpfs");
        println!(
            "| CPU ceiling: the same enqueue with the data dir on tmpfs (fsync costs nothing) | {ceiling:.0} jobs/s | ceiling / disk loop = {:.2}; fsync daemon / ceiling = {:.2}; syncfs daemon / ceiling = {:.2}; {} |",
            ceiling / disk_loop,
            enqueue / ceiling,
            enqueue_syncfs / ceiling,
            cpu("enqueue, tmpfs")
        );
    }
    println!(
        "| SQLite WAL synchronous=FULL, 1 txn per job, 1 thread, in-process | {sqlite:.0} jobs/s | |"
    );
    println!(
        "| disk loop (temp file, fsync, rename; dir fsync per 64), best of 1 and 4 threads | {disk_loop:.0} jobs/s (1 thread {:.0}, 4 threads {:.0}) | 1 thread: {}; 4 threads: {} |",
        s.median("disk loop, 1 thread"),
        s.median("disk loop, 4 threads"),
        by_loop("disk loop, 1 thread"),
        by_loop("disk loop, 4 threads"),
    );
    println!(
        "| the same loop with 16 threads (the daemon's staging pool), not part of the yardstick | {:.0} jobs/s | {} |",
        s.median("disk loop, 16 threads"),
        by_loop("disk loop, 16 threads"),
    );
    println!(
        "| the 16 threads in one directory, as the daemon's staging threads write `jobs/`: temporary name, fsync, rename | {:.0} jobs/s | {} |",
        s.median("one dir, 16 threads, renamed"),
        by_loop("one dir, 16 threads, renamed"),
    );
    println!(
        "| the same with each file created unnamed (`O_TMPFILE`), fsynced and linked into place (`linkat`), not part of the daemon | {:.0} jobs/s | linked / renamed = {:.2}; {} |",
        s.median("one dir, 16 threads, linked"),
        s.median("one dir, 16 threads, linked") / s.median("one dir, 16 threads, renamed"),
        by_loop("one dir, 16 threads, linked"),
    );
    println!(
        "| batches of 64 files made durable by one syncfs (no per-file fsync), 1 thread | {:.0} jobs/s | syncfs daemon / syncfs loop = {:.2}; {} |",
        s.median("syncfs loop"),
        enqueue_syncfs / s.median("syncfs loop"),
        by_loop("syncfs loop")
    );
    println!(
        "| enqueue latency, 1 client | p50 {:.2} ms, p99 {:.2} ms | |",
        s.median("enqueue p50"),
        s.median("enqueue p99")
    );
    println!(
        "| idle RSS, empty data dir | {:.1} MiB | |",
        s.median("idle RSS")
    );
    if quick {
        return;
    }
    println!(
        "| durable enqueue with {long_queue} jobs queued | {:.0} jobs/s | long / empty = {:.2}; {} |",
        s.median("enqueue, long queue"),
        s.median("enqueue, long queue") / enqueue,
        cpu("enqueue, long queue")
    );
    println!(
        "| the same, worker running: backfill, the one GPU taken, a slot free | {:.0} jobs/s | long / empty = {:.2}; {} |",
        s.median("enqueue, long queue, backfill"),
        s.median("enqueue, long queue, backfill") / enqueue,
        cpu("enqueue, long queue, backfill")
    );
    println!(
        "| seed scheme (rewrite job file and queue.json per change, no fsync) | {:.0} jobs/s empty, {:.0} jobs/s at 20000 queued | |",
        s.median("seed scheme, empty queue"),
        s.median("seed scheme, 20000 queued")
    );
    println!(
        "| boot of {boot_jobs} job files until /readyz | {:.0} ms | boot / cat = {:.2} |",
        s.median("boot"),
        s.median("boot") / s.median("cat")
    );
    println!("| cat of the same files | {:.0} ms | |", s.median("cat"));
    println!(
        "| peak RSS during that boot | {:.1} MiB | |",
        s.median("peak RSS at boot")
    );
    println!(
        "| RSS with {boot_jobs} jobs loaded | {:.1} MiB | |",
        s.median("RSS with boot jobs")
    );
    println!(
        "| GET /v1/jobs/{{id}} latency, {boot_jobs} jobs | p50 {:.2} ms, p99 {:.2} ms | |",
        s.median("get p50"),
        s.median("get p99")
    );
}
