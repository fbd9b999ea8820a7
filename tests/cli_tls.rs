//! The command-line client over HTTPS: the real `training-worker` binary against a real
//! daemon (tests/e2e_support) behind a TLS endpoint the test runs, whose certificate (for
//! 127.0.0.1 and localhost) is signed by a CA made in the test. The client trusts that CA
//! only when told with `--ca-cert` (or `TRAINING_WORKER_CA_CERT`); without it the server is
//! refused as untrusted, with one line naming the server and the cause, and exit 1 (the
//! documented code for a daemon that cannot be reached).

#[allow(dead_code)]
#[path = "e2e_support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use support::{Sandbox, Settings, diffusion_job};

const BIN: &str = env!("CARGO_BIN_EXE_training-worker");
/// How long one client run may take before the test fails instead of hanging.
const RUN_WITHIN: Duration = Duration::from_secs(60);

/// A finished client run.
#[derive(Debug)]
struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Output {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    fn assert_ok(&self) -> &Output {
        assert_eq!((self.code, self.stderr.as_str()), (0, ""), "{self:?}");
        self
    }
}

/// Runs the client with `args` and `env`, with no `TRAINING_WORKER_*` of the test's own.
async fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TRAINING_WORKER_") {
            command.env_remove(&name);
        }
    }
    for (name, value) in env {
        command.env(name, value);
    }
    let output = tokio::time::timeout(RUN_WITHIN, command.output())
        .await
        .unwrap_or_else(|_| panic!("the client did not finish within {RUN_WITHIN:?}"))
        .expect("run the client");
    Output {
        code: output.status.code().expect("the client exits by itself"),
        stdout: String::from_utf8(output.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(output.stderr).expect("stderr is UTF-8"),
    }
}

/// A CA and a server certificate it signed for 127.0.0.1 and localhost, written to `dir` as
/// `ca.pem`; the server's TLS configuration.
fn certificates(dir: &Path) -> rustls::ServerConfig {
    let ca_key = KeyPair::generate().expect("a CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("the CA certificate");
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("write ca.pem");
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().expect("a server key");
    let server_cert = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("server parameters")
        .signed_by(&server_key, &issuer)
        .expect("the server certificate");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    // ring, the provider the client's reqwest uses: rustls deprecates it for lacking
    // post-quantum key exchange, which a loopback test does not need, and the alternative
    // (aws-lc-rs) needs cmake to build.
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![server_cert.der().clone()], key)
        .expect("the server's TLS configuration")
}

/// A TLS endpoint on loopback that passes every connection's bytes on to `upstream`, as a
/// TLS-terminating proxy in front of a daemon does. Runs until the test's runtime ends.
async fn tls_endpoint(config: rustls::ServerConfig, upstream: SocketAddr) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("local address").port();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that refuses the certificate ends the handshake: nothing to pass on.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut daemon) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut daemon).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reaches_a_daemon_over_https_when_it_trusts_its_ca() {
    let sandbox = Sandbox::new();
    sandbox.configure(&Settings::default());
    let daemon = sandbox.start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = certificates(dir.path());
    let port = tls_endpoint(config, daemon.address()).await;
    let server = format!("https://127.0.0.1:{port}");
    let ca = dir.path().join("ca.pem");
    let ca = ca.to_str().expect("a UTF-8 path");
    let job = dir.path().join("job.json");
    std::fs::write(&job, diffusion_job("ok").to_string()).expect("write the job");
    let job = job.to_str().expect("a UTF-8 path");

    let submitted = run(
        &[
            "submit",
            job,
            "--json",
            "--server",
            &server,
            "--ca-cert",
            ca,
        ],
        &[],
    )
    .await;
    let id = submitted.assert_ok().json()["job_id"]
        .as_str()
        .expect("a job id")
        .to_string();
    let status = run(
        &[
            "status",
            &id,
            "--json",
            "--server",
            &server,
            "--ca-cert",
            ca,
        ],
        &[],
    )
    .await;
    assert_eq!(status.assert_ok().json()["job_id"], id.as_str());
    // The CA from the environment, and the certificate's other name.
    let list = run(
        &["list", "--json"],
        &[
            (
                "TRAINING_WORKER_SERVER",
                &format!("https://localhost:{port}"),
            ),
            ("TRAINING_WORKER_CA_CERT", ca),
        ],
    )
    .await;
    let listed = list.assert_ok().json();
    assert!(
        listed
            .as_array()
            .expect("a list")
            .iter()
            .any(|j| j["job_id"] == id.as_str()),
        "{list:?}"
    );
    // The daemon really saw it: the job is there over plain HTTP too.
    assert_eq!(daemon.job(&id).await["job_id"], id.as_str());

    // Without the CA, the server is not trusted: one line naming it and why, exit 1.
    let untrusted = run(&["list", "--server", &server], &[]).await;
    assert_eq!(untrusted.code, 1, "{untrusted:?}");
    assert_eq!(untrusted.stdout, "", "{untrusted:?}");
    assert_eq!(untrusted.stderr.lines().count(), 1, "{untrusted:?}");
    assert!(untrusted.stderr.starts_with("error: "), "{untrusted:?}");
    assert!(untrusted.stderr.contains(&server), "{untrusted:?}");
    assert!(
        untrusted.stderr.contains("certificate") && untrusted.stderr.contains("--ca-cert"),
        "{untrusted:?}"
    );
}

#[tokio::test]
async fn a_ca_file_that_cannot_be_used_is_one_line_and_exit_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.pem");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").expect("write");
    for (file, says) in [
        (&missing, "cannot read the CA file"),
        (&garbage, "holds no PEM certificate"),
    ] {
        let file = file.to_str().expect("a UTF-8 path");
        let out = run(
            &["list", "--server", "https://127.0.0.1:1", "--ca-cert", file],
            &[],
        )
        .await;
        assert_eq!(out.code, 1, "{out:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
        assert!(
            out.stderr.contains(says) && out.stderr.contains(file),
            "{out:?}"
        );
    }
}
