//! The real `otpd` binary as a user runs it: zero-config start, key printing,
//! and SQLite durability across `kill -9`.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Otpd {
    pub child: Child,
    pub base: String,
    /// The `API key: …` line's key, when the start printed one.
    pub printed_key: Option<String>,
}

/// Starts `otpd serve` in `dir` with extra environment; waits until `/health` answers.
pub fn start_otpd(dir: &Path, env: &[(&str, &str)]) -> Otpd {
    start_otpd_logging(dir, &[("RUST_LOG", "warn")], env, Stdio::null())
}

/// Like `start_otpd`, with the log (stderr) going to `log`; `env` comes last,
/// so it may set `RUST_LOG`.
pub fn start_otpd_logging(
    dir: &Path,
    defaults: &[(&str, &str)],
    env: &[(&str, &str)],
    log: Stdio,
) -> Otpd {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_otpd"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .current_dir(dir)
        .envs(defaults.iter().copied())
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    // The key line, if any, comes before the server starts listening.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(key) = line.strip_prefix("API key: ") {
                let _ = tx.send(key.to_owned());
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if health_status(port) == Some(200) {
            break;
        }
        assert!(Instant::now() < deadline, "otpd did not start");
        assert!(child.try_wait().unwrap().is_none(), "otpd exited early");
        std::thread::yield_now();
    }
    let printed_key = rx.recv_timeout(Duration::from_millis(500)).ok();
    Otpd {
        child,
        base,
        printed_key,
    }
}

/// `GET /health` status over a raw socket: the readiness poll runs on a plain thread.
fn health_status(port: u16) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.get(9..12)?.parse().ok()
}

async fn post(base: &str, key: &str, path: &str, body: Value) -> (u16, Value) {
    let r = crate::helpers::plain_client()
        .post(format!("{base}{path}"))
        .header("x-api-key", key)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn zero_config_start_prints_a_key_once_and_it_works() {
    let dir = tempfile::tempdir().unwrap();
    let mut otpd = start_otpd(dir.path(), &[]);
    let key = otpd
        .printed_key
        .clone()
        .expect("the first start prints an API key");
    assert!(key.starts_with("otpd_"));
    let (status, _) = post(
        &otpd.base,
        &key,
        "/v1/verifications",
        json!({ "to": "+31651860670" }),
    )
    .await;
    assert_eq!(status, 201);
    assert!(dir.path().join("data/otpd.db").exists());
    let secret = dir.path().join("data/secret.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    otpd.child.kill().unwrap();
    otpd.child.wait().unwrap();

    let mut again = start_otpd(dir.path(), &[]);
    assert_eq!(
        again.printed_key, None,
        "the key is printed only when the store had none"
    );
    again.child.kill().unwrap();
    again.child.wait().unwrap();
}

#[tokio::test]
async fn an_acknowledged_send_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("OTPD_DEBUG_CODES", "true")];
    let mut otpd = start_otpd(dir.path(), &env);
    let key = otpd.printed_key.clone().unwrap();
    let (status, sent) = post(
        &otpd.base,
        &key,
        "/v1/verifications",
        json!({ "to": "+31651860670" }),
    )
    .await;
    assert_eq!(status, 201);
    let code = sent["debug_code"].as_str().unwrap().to_owned();
    // SIGKILL: no shutdown path runs.
    otpd.child.kill().unwrap();
    otpd.child.wait().unwrap();

    let mut restarted = start_otpd(dir.path(), &env);
    let (status, body) = post(
        &restarted.base,
        &key,
        "/v1/verifications/check",
        json!({ "id": sent["id"], "code": code }),
    )
    .await;
    assert_eq!((status, &body["valid"]), (200, &json!(true)), "{body}");
    restarted.child.kill().unwrap();
    restarted.child.wait().unwrap();
}
