//! The dashboard in a real headless Chromium (Debian's `chromium` and `chromium-driver`)
//! against the real daemon on loopback, with the stub trainer: the pages show the jobs that
//! exist, the queue and a job's log change without a reload, cancel and retry from the page
//! reach the daemon, and with a token the login works and an action without the CSRF token
//! is refused. Each page's screenshot is kept in `target/ui-screenshots/`.
//!
//! Without Chromium installed each browser test prints one line and passes, unless `CI` is
//! set. One test needs no browser: the overview after a restart, over plain HTTP.

#[allow(dead_code)]
#[path = "e2e_support/mod.rs"]
mod e2e_support;

#[path = "browser_support/mod.rs"]
mod browser_support;

use browser_support::Browser;
use e2e_support::{Sandbox, diffusion_job, secs, wait_until};
use serde_json::Value;

/// A job for the stub trainer with an id chosen here, so the test can hold it before it runs.
fn job(id: &str, command: &str) -> Value {
    let mut job = diffusion_job(command);
    job["job_id"] = Value::String(id.to_string());
    job
}

const DONE: &str = "00000001-0000-4000-8000-000000000001";
const FAILED: &str = "00000002-0000-4000-8000-000000000002";
const BLOCKER: &str = "00000003-0000-4000-8000-000000000003";
const WAITER: &str = "00000004-0000-4000-8000-000000000004";
const LOGGED: &str = "00000005-0000-4000-8000-000000000005";

/// Sets a mark on the page that a reload would lose.
async fn mark(browser: &Browser) {
    browser
        .eval("window.__not_reloaded = true; return null;")
        .await;
}

async fn still_marked(browser: &Browser) -> bool {
    browser
        .eval("return window.__not_reloaded === true;")
        .await
        .as_bool()
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_jobs_follows_them_live_and_acts_on_them() {
    let Some(browser) = Browser::start("ui_browser").await else {
        return;
    };
    let sandbox = Sandbox::new();
    let daemon = sandbox.start().await;
    let base = daemon.base().to_string();

    // A finished job of each kind for the overview and the history.
    daemon.submit(job(DONE, "ok")).await;
    daemon.submit(job(FAILED, "fail:3")).await;
    wait_until("both first jobs are finished", secs(20), async || {
        let done = daemon.job(DONE).await["status"] == "Completed";
        let failed = daemon.job(FAILED).await["status"] == "Failed";
        (done && failed).then_some(())
    })
    .await;
    // One running job (held), one queued behind it (max_concurrent = 1).
    sandbox.hold(BLOCKER);
    daemon.submit(job(BLOCKER, "sleep:600")).await;
    sandbox.trainer_started(BLOCKER, 1).await;
    daemon.submit(job(WAITER, "sleep:600")).await;

    // The overview counts them.
    browser.goto(&format!("{base}/ui")).await;
    browser.wait_for_text("Jobs by status").await;
    let counts = browser
        .eval("return Array.from(document.querySelectorAll('.counts li')).map(l => l.innerText.replace(/\\s+/g, ' ').trim());")
        .await;
    assert_eq!(
        counts,
        serde_json::json!([
            "1 Queued",
            "1 Running",
            "1 Completed",
            "1 Failed",
            "0 Cancelled"
        ]),
        "{}",
        browser.text().await
    );
    browser.screenshot("overview").await;

    // The history lists the finished ones.
    browser.goto(&format!("{base}/ui/history")).await;
    for id in [DONE, FAILED] {
        let row = format!("#history tr[data-job='{id}']");
        assert!(
            browser.text_of(&row).await.is_some(),
            "{id} is not in the history"
        );
    }
    browser.screenshot("history").await;
    // Filtered by status and by id prefix.
    browser
        .goto(&format!("{base}/ui/history?status=Failed&q=00000002"))
        .await;
    assert!(
        browser
            .text_of(&format!("tr[data-job='{FAILED}']"))
            .await
            .is_some()
    );
    assert!(
        browser
            .text_of(&format!("tr[data-job='{DONE}']"))
            .await
            .is_none()
    );

    // The queue page: the waiter starts once the blocker ends, and the page shows it
    // without a reload.
    browser.goto(&format!("{base}/ui/queue")).await;
    assert!(
        browser
            .text_of(&format!("#running tr[data-job='{BLOCKER}']"))
            .await
            .is_some()
    );
    assert!(
        browser
            .text_of(&format!("#queued tr[data-job='{WAITER}']"))
            .await
            .is_some()
    );
    browser.screenshot("queue").await;
    // On a phone's width it still reads.
    browser.resize(390, 844).await;
    browser.goto(&format!("{base}/ui/queue")).await;
    browser.screenshot("queue-phone").await;
    browser.resize(1280, 900).await;
    browser.goto(&format!("{base}/ui/queue")).await;
    mark(&browser).await;
    let reply = daemon
        .post(
            &format!("/v1/jobs/{BLOCKER}/cancel"),
            &serde_json::json!({}),
        )
        .await;
    assert!(reply.status.is_success(), "{reply:?}");
    sandbox.trainer_started(WAITER, 1).await;
    wait_until(
        "the queue page shows the waiter running",
        secs(10),
        async || {
            let css = format!("#running tr[data-job='{WAITER}']");
            browser.text_of(&css).await.map(|_| ())
        },
    )
    .await;
    assert!(still_marked(&browser).await, "the queue page was reloaded");

    // Cancel from the waiter's page, behind its confirmation.
    browser.goto(&format!("{base}/ui/jobs/{WAITER}")).await;
    browser.wait_for_text("Cancel this job").await;
    browser.click("details.action summary").await;
    browser.click("#confirm-cancel").await;
    wait_until("the cancel reaches the daemon", secs(10), async || {
        (daemon.job(WAITER).await["status"] == "Cancelled").then_some(())
    })
    .await;
    browser.wait_for_text("Cancelled").await;

    // Retry the failed job from its page: it runs again.
    browser.goto(&format!("{base}/ui/jobs/{FAILED}")).await;
    browser.click("details.action summary").await;
    browser.click("#confirm-retry").await;
    wait_until("the retried job runs again", secs(15), async || {
        let runs = sandbox
            .starts()
            .iter()
            .filter(|(id, _)| id == FAILED)
            .count();
        (runs == 2).then_some(())
    })
    .await;

    // The live log: a held trainer has printed its first lines; released, it prints more,
    // and the open page shows them without a reload.
    sandbox.hold(LOGGED);
    daemon.submit(job(LOGGED, "sleep:1")).await;
    sandbox.trainer_started(LOGGED, 1).await;
    browser.goto(&format!("{base}/ui/jobs/{LOGGED}")).await;
    wait_until(
        "the log shows the trainer's first line",
        secs(10),
        async || {
            let log = browser.text_of("#log").await?;
            log.contains(&format!("hello from {LOGGED}")).then_some(())
        },
    )
    .await;
    assert!(
        !browser
            .text_of("#log")
            .await
            .unwrap_or_default()
            .contains("training finished")
    );
    mark(&browser).await;
    sandbox.release(LOGGED);
    wait_until(
        "the log shows the trainer's last line",
        secs(15),
        async || {
            let log = browser.text_of("#log").await?;
            log.contains("training finished").then_some(())
        },
    )
    .await;
    assert!(still_marked(&browser).await, "the job page was reloaded");
    // The status on the page follows too.
    browser.wait_for_text("Completed").await;
    browser.screenshot("job").await;
    browser
        .eval("document.getElementById('runs-h').scrollIntoView(); return null;")
        .await;
    browser.screenshot("job-log").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_dashboard_asks_for_it_once_and_refuses_forms_without_csrf() {
    let Some(browser) = Browser::start("ui_browser").await else {
        return;
    };
    let sandbox = Sandbox::new();
    let token = "correct horse battery staple";
    let config = std::fs::read_to_string(sandbox.config_file()).expect("the config");
    sandbox.write_config(&format!("api_token = {token:?}\n{config}"));
    let daemon = sandbox.start().await;
    let base = daemon.base().to_string();
    let client = reqwest::Client::new();
    let reply = client
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(token)
        .json(&job(BLOCKER, "sleep:600"))
        .send()
        .await
        .expect("submit");
    assert_eq!(reply.status(), reqwest::StatusCode::CREATED);

    // Sent to the login form; a wrong token is refused.
    browser.goto(&format!("{base}/ui/queue")).await;
    browser.wait_for_text("API token").await;
    assert!(browser.url().await.ends_with("/ui/login"));
    browser.screenshot("login").await;
    browser.type_into("#token", "wrong").await;
    browser.click("form.login button").await;
    browser.wait_for_text("not the daemon's API token").await;

    // The right one signs in, and the pages open from then on.
    browser.type_into("#token", token).await;
    browser.click("form.login button").await;
    browser.wait_for_text("Jobs by status").await;
    // The live updates reach a signed-in tab too.
    browser.goto(&format!("{base}/ui/queue")).await;
    mark(&browser).await;
    let reply = client
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(token)
        .json(&job(WAITER, "sleep:600"))
        .send()
        .await
        .expect("submit");
    assert_eq!(reply.status(), reqwest::StatusCode::CREATED);
    wait_until("the queue page shows the new job", secs(10), async || {
        let css = format!("#queued tr[data-job='{WAITER}']");
        browser.text_of(&css).await.map(|_| ())
    })
    .await;
    assert!(still_marked(&browser).await, "the queue page was reloaded");
    browser.goto(&format!("{base}/ui/jobs/{BLOCKER}")).await;
    browser.wait_for_text("Cancel this job").await;
    let cookie = browser.eval("return document.cookie;").await;
    assert_eq!(cookie, "", "the session cookie is visible to scripts");

    // A form of this page without the CSRF token is refused, and nothing is cancelled.
    browser
        .eval(
            "var f = document.querySelector('details.action form');\
             f.querySelector('input[name=csrf]').remove(); f.submit(); return null;",
        )
        .await;
    browser
        .wait_for_text("CSRF token is missing or wrong")
        .await;
    let status = client
        .get(format!("{base}/v1/jobs/{BLOCKER}"))
        .bearer_auth(token)
        .send()
        .await
        .expect("get the job")
        .json::<Value>()
        .await
        .expect("a job");
    assert_ne!(status["status"], "Cancelled", "{status}");

    // With it, the cancel goes through.
    browser.goto(&format!("{base}/ui/jobs/{BLOCKER}")).await;
    browser.click("details.action summary").await;
    browser.click("#confirm-cancel").await;
    browser.wait_for_text("Cancelled").await;
}

/// Without a browser (plain HTTP): the overview says what the last boot recovered.
#[tokio::test]
async fn the_overview_reports_what_a_restart_recovered() {
    let sandbox = Sandbox::new();
    let daemon = sandbox.start().await;
    sandbox.hold(BLOCKER);
    daemon.submit(job(BLOCKER, "sleep:600")).await;
    sandbox.trainer_started(BLOCKER, 1).await;
    // Killed while the job runs: the next boot requeues it to run first.
    daemon.kill();
    let daemon = sandbox.start().await;
    let page = daemon.get("/ui").await;
    assert_eq!(page.status, reqwest::StatusCode::OK);
    let text = page.text.replace(['\n', ' '], "");
    assert!(
        text.contains("1wererunningwhenthedaemonstopped:1requeuedtorunfirst"),
        "{}",
        page.text
    );
}
