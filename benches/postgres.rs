//! The PostgreSQL store against its yardstick, on a throwaway PostgreSQL server of the
//! bench's own (the test suite's, `tests/e2e_support/pg.rs`; skipped with one line where no
//! server binaries are installed):
//!
//! - durable enqueue over HTTP, 64 clients, a daemon on `[store] kind = "postgres"` with the
//!   worker paused; beside it the same daemon on the file store;
//! - the yardstick: the same database's bare single-row `INSERT` and `COMMIT` loop (one
//!   autocommitted statement each) from as many connections, each row the size of a job;
//! - the daemon's CPU ceiling: the file store on tmpfs (`TW_BENCH_TMPFS`, default
//!   `/dev/shm`), where a flush costs nothing, so what is left is HTTP, JSON and the worker;
//! - submit-to-start latency on an idle daemon (one job at a time, `started_at` minus
//!   `created_at`, both the daemon's clock), p50 and p99, on both stores.
//!
//! Each figure is the median of `TW_BENCH_RUNS` runs (default 3), and the ratios are taken
//! within one run. `TW_BENCH_JOBS` jobs per enqueue measurement (default 5000),
//! `TW_BENCH_STARTS` starts for the latency (default 200). Run with
//! `cargo bench --bench postgres`.

#[allow(dead_code)]
#[path = "../tests/e2e_support/pg.rs"]
mod pg;

mod support;

#[path = "support/postgres.rs"]
mod bench;

use bench::{
    CLIENTS, Daemon, enqueue_rate, http_client, insert_loop_rate, median, sizes, start_latency,
};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        // `cargo test --benches` asks for a list; this bench has no tests.
        return;
    }
    let Some(server) = pg::Postgres::start() else {
        eprintln!("SKIPPED the PostgreSQL bench: no PostgreSQL server binaries are installed");
        return;
    };
    let (runs, jobs, starts) = sizes();
    let http = http_client();
    let root = tempfile::Builder::new()
        .prefix("tw-bench-pg-")
        .tempdir()
        .expect("a temp dir");
    let tmpfs_dir = std::env::var("TW_BENCH_TMPFS").unwrap_or_else(|_| "/dev/shm".into());
    let tmpfs = tempfile::Builder::new()
        .prefix("tw-bench-pg-")
        .tempdir_in(&tmpfs_dir)
        .ok();

    let (mut pg_rates, mut loop_rates, mut file_rates, mut ratios, mut file_ratios) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut pg_lat, mut file_lat) = (Vec::new(), Vec::new());
    let (mut ceilings, mut ceiling_ratios) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let url = server.database();
        let store = format!("kind = \"postgres\"\nurl = \"{url}\"");
        let daemon = Daemon::spawn(
            &root.path().join(format!("pg-{run}")),
            &store,
            "max_concurrent = 0",
        );
        daemon.ready(&http).await;
        let pg_rate = enqueue_rate(&http, &[&daemon.base], jobs).await;
        daemon.stop();

        let loop_rate = insert_loop_rate(&server.database(), jobs).await;

        let daemon = Daemon::spawn(
            &root.path().join(format!("files-{run}")),
            "kind = \"files\"",
            "max_concurrent = 0",
        );
        daemon.ready(&http).await;
        let file_rate = enqueue_rate(&http, &[&daemon.base], jobs).await;
        daemon.stop();

        let ceiling = match &tmpfs {
            Some(tmpfs) => {
                let daemon = Daemon::spawn(
                    &tmpfs.path().join(format!("files-{run}")),
                    "kind = \"files\"",
                    "max_concurrent = 0",
                );
                daemon.ready(&http).await;
                let rate = enqueue_rate(&http, &[&daemon.base], jobs).await;
                daemon.stop();
                rate
            }
            None => f64::NAN,
        };

        let daemon = Daemon::spawn(
            &root.path().join(format!("pg-idle-{run}")),
            &format!("kind = \"postgres\"\nurl = \"{}\"", server.database()),
            "max_concurrent = 1",
        );
        daemon.ready(&http).await;
        pg_lat.push(start_latency(&http, &daemon.base, starts).await);
        daemon.stop();
        let daemon = Daemon::spawn(
            &root.path().join(format!("files-idle-{run}")),
            "kind = \"files\"",
            "max_concurrent = 1",
        );
        daemon.ready(&http).await;
        file_lat.push(start_latency(&http, &daemon.base, starts).await);
        daemon.stop();

        println!(
            "run {}: postgres {pg_rate:.0} jobs/s, insert loop {loop_rate:.0} rows/s ({:.2}x), CPU ceiling {ceiling:.0} jobs/s ({:.2}x), files {file_rate:.0} jobs/s ({:.2}x postgres); start p50/p99 postgres {:.1}/{:.1} ms, files {:.1}/{:.1} ms",
            run + 1,
            pg_rate / loop_rate,
            pg_rate / ceiling,
            file_rate / pg_rate,
            pg_lat[run].0,
            pg_lat[run].1,
            file_lat[run].0,
            file_lat[run].1,
        );
        ceilings.push(ceiling);
        ceiling_ratios.push(pg_rate / ceiling);
        pg_rates.push(pg_rate);
        loop_rates.push(loop_rate);
        file_rates.push(file_rate);
        ratios.push(pg_rate / loop_rate);
        file_ratios.push(file_rate / pg_rate);
    }
    let column = |values: &[(f64, f64)], first: bool| -> Vec<f64> {
        values
            .iter()
            .map(|(a, b)| if first { *a } else { *b })
            .collect()
    };
    println!();
    println!("| measure ({runs} runs, medians) | value |");
    println!("|---|---|");
    println!(
        "| durable enqueue, PostgreSQL store, {CLIENTS} clients | {:.0} jobs/s |",
        median(&pg_rates)
    );
    println!(
        "| bare single-row INSERT + COMMIT loop, {CLIENTS} connections | {:.0} rows/s |",
        median(&loop_rates)
    );
    println!(
        "| PostgreSQL store / insert loop (ratio per run) | {:.2}x |",
        median(&ratios)
    );
    println!(
        "| the daemon's CPU ceiling: file store on tmpfs, {CLIENTS} clients | {:.0} jobs/s |",
        median(&ceilings)
    );
    println!(
        "| PostgreSQL store / CPU ceiling (ratio per run) | {:.2}x |",
        median(&ceiling_ratios)
    );
    println!(
        "| durable enqueue, file store, {CLIENTS} clients | {:.0} jobs/s |",
        median(&file_rates)
    );
    println!(
        "| file store / PostgreSQL store (ratio per run) | {:.2}x |",
        median(&file_ratios)
    );
    println!(
        "| submit-to-start p50 / p99, PostgreSQL store | {:.1} / {:.1} ms |",
        median(&column(&pg_lat, true)),
        median(&column(&pg_lat, false))
    );
    println!(
        "| submit-to-start p50 / p99, file store | {:.1} / {:.1} ms |",
        median(&column(&file_lat, true)),
        median(&column(&file_lat, false))
    );
}
