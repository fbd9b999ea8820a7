//! A throwaway PostgreSQL server for the tests, started from the installed server binaries
//! (`initdb`, `postgres`, `psql`, found under `/usr/lib/postgresql/*/bin` or in
//! `TW_TEST_PG_BIN`): a data dir in a temp dir, trust authentication, loopback only, a free
//! port. As root it runs as the `postgres` user (initdb refuses root).
//!
//! The server is started from a thread that lives as long as the test process and carries
//! a parent-death signal tied to that thread, so it is gone when the test binary ends,
//! however it ends. Where no server binaries are installed, [`Postgres::start`] says so in
//! one line and gives `None`, so that `cargo test` passes on a machine without them; with
//! `CI` set that is a failure instead (CI installs them).

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Whether the tests' daemons and apps keep their records in PostgreSQL
/// (`TW_TEST_STORE=postgres`) instead of the data dir's files: how CI runs the shared suites
/// against both stores.
pub fn postgres_store() -> bool {
    std::env::var("TW_TEST_STORE").is_ok_and(|v| v == "postgres")
}

/// Whether `test`, which is about the file store's own files (it crafts or reads job files
/// or `queue.json`), does not apply here: under [`postgres_store`] it says so in one line
/// and the caller returns.
pub fn not_for_this_store(test: &str) -> bool {
    if postgres_store() {
        eprintln!("NOT RUN {test}: it is about the file store's job files");
    }
    postgres_store()
}

/// A server of the test's own.
pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    /// The user the server runs as, when the tests run as root.
    owner: Option<(u32, u32)>,
    child: Mutex<Option<Child>>,
    _dir: tempfile::TempDir,
}

static SHARED: OnceLock<Option<Postgres>> = OnceLock::new();
static DATABASES: AtomicUsize = AtomicUsize::new(0);

/// The installed server binaries, if any.
fn server_bin() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("TW_TEST_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut found: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").is_file() && bin.join("postgres").is_file())
        .collect();
    found.sort();
    found.pop()
}

/// The `postgres` user's uid and gid.
fn postgres_user() -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&"postgres"))
            .then(|| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))
            .flatten()
    })
}

/// Runs `command` as `owner` (when set), with a parent-death signal set after the change of
/// user (a change of credentials clears it).
fn as_owner(command: &mut Command, owner: Option<(u32, u32)>, die_with_parent: bool) {
    // SAFETY: between fork and exec only async-signal-safe calls run (setgroups, setgid,
    // setuid, prctl).
    unsafe {
        command.pre_exec(move || {
            if let Some((uid, gid)) = owner
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            if die_with_parent && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Says in one line that `test` does not run, and why; a failure under CI.
pub fn skip(test: &str, why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: {why}; CI must provide PostgreSQL"
    );
    eprintln!("SKIPPED {test}: {why}");
}

/// A command for the spawner thread, and where to answer with the child.
type Spawn = (Command, mpsc::Sender<std::io::Result<Child>>);

/// The thread that spawns every server, so that their parent-death signal is tied to a
/// thread that lives as long as the test process.
fn spawner() -> &'static Mutex<mpsc::Sender<Spawn>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Spawn>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Spawn>();
        std::thread::Builder::new()
            .name("postgres-spawner".into())
            .spawn(move || {
                for (mut command, answer) in rx {
                    let _ = answer.send(command.spawn());
                }
                // Every sender is in a static: this thread never ends while tests run.
                loop {
                    std::thread::park();
                }
            })
            .expect("start the spawner thread");
        Mutex::new(tx)
    })
}

impl Postgres {
    /// The server shared by the tests of this binary, started at first use.
    pub fn shared(test: &str) -> Option<&'static Postgres> {
        let shared = SHARED.get_or_init(Postgres::start);
        if shared.is_none() {
            skip(test, "no PostgreSQL server binaries are installed");
        }
        shared.as_ref()
    }

    /// A server of the caller's own (to stop and start it); `None` where none is installed.
    pub fn start() -> Option<Postgres> {
        let bin = server_bin()?;
        let owner = if unsafe { libc::geteuid() } == 0 {
            Some(postgres_user().expect("a postgres user exists where the server is installed"))
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("tw-pg-")
            .tempdir()
            .expect("a temp dir");
        let data = dir.path().join("data");
        let socket_dir = dir.path().join("socket");
        fs::create_dir(&socket_dir).expect("a socket dir");
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown");
            std::os::unix::fs::chown(&socket_dir, Some(uid), Some(gid)).expect("chown");
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--no-sync",
            ])
            .arg("-D")
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_owner(&mut initdb, owner, false);
        let out = initdb.output().expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let server = Postgres {
            bin,
            data,
            socket_dir,
            port,
            owner,
            child: Mutex::new(None),
            _dir: dir,
        };
        server.run();
        Some(server)
    }

    /// Starts the server on its data dir and waits until it takes connections.
    pub fn run(&self) {
        let mut command = Command::new(self.bin.join("postgres"));
        command
            .arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(&self.socket_dir)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                fs::File::create(self.log_path())
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            );
        as_owner(&mut command, self.owner, true);
        let (answer, child) = mpsc::channel();
        spawner()
            .lock()
            .expect("the spawner")
            .send((command, answer))
            .expect("the spawner thread runs");
        let child = child
            .recv()
            .expect("the spawner answers")
            .expect("start postgres");
        *self.child.lock().expect("the child") = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.psql("postgres", "SELECT 1").is_err() {
            assert!(
                Instant::now() < deadline,
                "postgres did not take connections within 30 s: {}",
                fs::read_to_string(self.log_path()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (a fast shutdown: sessions are ended, nothing committed is lost)
    /// and waits until it has exited.
    pub fn stop(&self) {
        let Some(mut child) = self.child.lock().expect("the child").take() else {
            return;
        };
        // SAFETY: a signal to our own child, which has not been reaped.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGINT);
        }
        let _ = child.wait();
    }

    fn log_path(&self) -> PathBuf {
        self.socket_dir.with_file_name("server.log")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for `database` on this server.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A fresh, empty database; its URL.
    pub fn database(&self) -> String {
        let name = format!(
            "tw_{}_{}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::SeqCst)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("create database {name}: {e}"));
        self.url(&name)
    }

    /// Runs `sql` in `database` with psql; its output, one row a line, fields by `|`.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, String> {
        // Debian puts psql beside the server binaries, or only on the PATH.
        let psql = Some(self.bin.join("psql"))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| Path::new("psql").to_path_buf());
        let out = Command::new(psql)
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-d", database, "-c", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run psql: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `sql` in the database a URL of [`Postgres::database`] names.
    pub fn query(&self, url: &str, sql: &str) -> String {
        let database = url.rsplit('/').next().expect("a database in the URL");
        self.psql(database, sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
