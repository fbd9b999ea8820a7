//! Several nodes on one PostgreSQL queue, on a throwaway server of the bench's own (the
//! test suite's, `tests/e2e_support/pg.rs`; skipped with one line where no server binaries
//! are installed):
//!
//! - durable enqueue over HTTP, 64 clients, through one node and through three nodes of
//!   one database (the clients spread over them), workers paused; beside them the same
//!   database's bare single-row `INSERT` and `COMMIT` loop from as many connections;
//! - submit-to-start latency on two idle nodes, jobs submitted to the first one, whichever
//!   claims it: `started_at` minus `created_at` (both the database's writers' clocks, one
//!   machine), p50 and p99;
//! - takeover: two nodes with the default lease (15 s), a job running on one, that node
//!   SIGKILLed: the time until the job runs again on the other (its second start's row seen
//!   Running there).
//!
//! Each figure is the median of `TW_BENCH_RUNS` runs (default 3), ratios within one run.
//! `TW_BENCH_JOBS` jobs per enqueue measurement (default 5000), `TW_BENCH_STARTS` starts
//! for the latency (default 200). Run with `cargo bench --bench cluster`.

#[allow(dead_code)]
#[path = "../tests/e2e_support/pg.rs"]
mod pg;

mod support;

#[allow(dead_code)]
#[path = "support/postgres.rs"]
mod bench;

use std::path::Path;
use std::time::{Duration, Instant};

use bench::{
    CLIENTS, Daemon, enqueue_rate, http_client, insert_loop_rate, median, sizes, start_latency,
};

/// A node of the database `url` named `id`, its trainer `trainer`.
fn node(dir: &Path, url: &str, id: &str, max_concurrent: usize, trainer: &str) -> Daemon {
    Daemon::with_config(
        dir,
        &format!(
            "[store]\nkind = \"postgres\"\nurl = \"{url}\"\n[cluster]\nnode_id = \"{id}\"\n\
             [worker]\nmax_concurrent = {max_concurrent}\n[executor]\ncommand = {trainer}\n"
        ),
    )
}

/// One row's owner, status and attempts, as the database holds them.
async fn row(client: &tokio_postgres::Client, id: &str) -> Option<(Option<String>, String, i64)> {
    let id: uuid::Uuid = id.parse().expect("a job id");
    client
        .query_opt(
            "SELECT owner, status, (body->>'attempts')::int8 FROM tw_jobs WHERE id = $1",
            &[&id],
        )
        .await
        .expect("read the row")
        .map(|r| (r.get(0), r.get(1), r.get(2)))
}

/// Seconds from a SIGKILL of the node running a job to the job running on the other node.
async fn takeover(http: &reqwest::Client, root: &Path, url: &str, run: usize) -> f64 {
    let trainer = "[\"sleep\", \"3600\"]";
    let a = node(&root.join(format!("take-a-{run}")), url, "a", 1, trainer);
    let b = node(&root.join(format!("take-b-{run}")), url, "b", 1, trainer);
    a.ready(http).await;
    b.ready(http).await;
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    let job: serde_json::Value = bench::submit(http, &a.base, run)
        .await
        .json()
        .await
        .expect("the job");
    let id = job["job_id"].as_str().expect("an id").to_string();
    let owner = loop {
        if let Some((Some(owner), status, _)) = row(&client, &id).await
            && status == "Running"
        {
            break owner;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (mut victim, survivor, other) = if owner == "a" {
        (a, b, "b")
    } else {
        (b, a, "a")
    };
    let killed = Instant::now();
    victim.child.kill().expect("SIGKILL the node");
    let _ = victim.child.wait();
    loop {
        if let Some((Some(owner), status, attempts)) = row(&client, &id).await
            && owner == other
            && status == "Running"
            && attempts == 2
        {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(120),
            "the job was never taken over"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = killed.elapsed().as_secs_f64();
    survivor.stop();
    took
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        // `cargo test --benches` asks for a list; this bench has no tests.
        return;
    }
    let Some(server) = pg::Postgres::start() else {
        eprintln!("SKIPPED the cluster bench: no PostgreSQL server binaries are installed");
        return;
    };
    let (runs, jobs, starts) = sizes();
    let http = http_client();
    let root = tempfile::Builder::new()
        .prefix("tw-bench-cluster-")
        .tempdir()
        .expect("a temp dir");
    let root = root.path();
    let instant = "[\"true\"]";

    let (mut one, mut three, mut loops) = (Vec::new(), Vec::new(), Vec::new());
    let (mut one_ratio, mut three_ratio, mut scale) = (Vec::new(), Vec::new(), Vec::new());
    let (mut latency, mut takeovers) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let url = server.database();
        let n1 = node(&root.join(format!("one-{run}")), &url, "n1", 0, instant);
        n1.ready(&http).await;
        let one_rate = enqueue_rate(&http, &[&n1.base], jobs).await;
        n1.stop();

        let url = server.database();
        let nodes: Vec<Daemon> = (1..=3)
            .map(|n| {
                node(
                    &root.join(format!("three-{run}-{n}")),
                    &url,
                    &format!("n{n}"),
                    0,
                    instant,
                )
            })
            .collect();
        for n in &nodes {
            n.ready(&http).await;
        }
        let bases: Vec<&str> = nodes.iter().map(|n| n.base.as_str()).collect();
        let three_rate = enqueue_rate(&http, &bases, jobs).await;
        for n in nodes {
            n.stop();
        }

        let loop_rate = insert_loop_rate(&server.database(), jobs).await;

        let url = server.database();
        let first = node(&root.join(format!("idle-a-{run}")), &url, "a", 1, instant);
        let second = node(&root.join(format!("idle-b-{run}")), &url, "b", 1, instant);
        first.ready(&http).await;
        second.ready(&http).await;
        latency.push(start_latency(&http, &first.base, starts).await);
        first.stop();
        second.stop();

        let took = takeover(&http, root, &server.database(), run).await;

        println!(
            "run {}: one node {one_rate:.0} jobs/s ({:.2}x the loop), three nodes {three_rate:.0} jobs/s ({:.2}x the loop, {:.2}x one node), insert loop {loop_rate:.0} rows/s; start p50/p99 {:.1}/{:.1} ms; takeover {took:.1} s",
            run + 1,
            one_rate / loop_rate,
            three_rate / loop_rate,
            three_rate / one_rate,
            latency[run].0,
            latency[run].1,
        );
        one.push(one_rate);
        three.push(three_rate);
        loops.push(loop_rate);
        one_ratio.push(one_rate / loop_rate);
        three_ratio.push(three_rate / loop_rate);
        scale.push(three_rate / one_rate);
        takeovers.push(took);
    }
    let p50: Vec<f64> = latency.iter().map(|l| l.0).collect();
    let p99: Vec<f64> = latency.iter().map(|l| l.1).collect();
    println!();
    println!("| measure ({runs} runs, medians) | value |");
    println!("|---|---|");
    println!(
        "| durable enqueue, one node, {CLIENTS} clients | {:.0} jobs/s |",
        median(&one)
    );
    println!(
        "| durable enqueue, three nodes of one database, {CLIENTS} clients | {:.0} jobs/s |",
        median(&three)
    );
    println!(
        "| bare single-row INSERT + COMMIT loop, {CLIENTS} connections | {:.0} rows/s |",
        median(&loops)
    );
    println!(
        "| one node / insert loop (ratio per run) | {:.2}x |",
        median(&one_ratio)
    );
    println!(
        "| three nodes / insert loop (ratio per run) | {:.2}x |",
        median(&three_ratio)
    );
    println!(
        "| three nodes / one node (ratio per run) | {:.2}x |",
        median(&scale)
    );
    println!(
        "| submit-to-start p50 / p99, two idle nodes | {:.1} / {:.1} ms |",
        median(&p50),
        median(&p99)
    );
    println!(
        "| takeover after a SIGKILL, default lease (15 s) | {:.1} s |",
        median(&takeovers)
    );
}
