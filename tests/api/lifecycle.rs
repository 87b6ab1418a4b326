//! The real `otpd` binary stopping: SIGTERM with a request in flight, the
//! drain deadline, and `--print-config`.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

const BODY: &str = r#"{"to":"+31651860670"}"#;

struct Running {
    child: Child,
    addr: SocketAddr,
    key: String,
    /// Every stderr line so far (JSON logs).
    log: Arc<Mutex<Vec<String>>>,
    /// The thread filling `log`; it ends at the pipe's end, when otpd exits.
    log_reader: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Waits for otpd to exit, then for the reader to take in what it logged
    /// on the way out.
    fn wait_exit(&mut self, deadline: Instant) -> Option<ExitStatus> {
        let status = wait_exit(&mut self.child, deadline)?;
        if let Some(reader) = self.log_reader.take() {
            let _ = reader.join();
        }
        Some(status)
    }

    fn log_has(&self, message: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(message))
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Only when a test failed half-way: never leave a server behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn write_config(dir: &Path, grace_seconds: u64) -> std::path::PathBuf {
    let path = dir.join("otpd.toml");
    std::fs::write(
        &path,
        format!(
            r#"
data_dir = "{}"
[server]
listen = "127.0.0.1:0"
shutdown_grace_seconds = {grace_seconds}
[store]
url = "memory://"
[secrets]
master_key = "lifecycle test master secret"
[log]
format = "json"
level = "info"
"#,
            dir.display()
        ),
    )
    .unwrap();
    path
}

/// Starts `otpd serve` on port 0 and learns the port from its "listening" log
/// line (no port can be taken by another test in between).
fn start(dir: &Path, grace_seconds: u64) -> Running {
    let config = write_config(dir, grace_seconds);
    let mut child = Command::new(env!("CARGO_BIN_EXE_otpd"))
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (key_tx, key_rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(key) = line.strip_prefix("API key: ") {
                let _ = key_tx.send(key.to_owned());
            }
        }
    });
    let (addr_tx, addr_rx) = mpsc::channel();
    let log = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().unwrap();
    let lines = log.clone();
    let log_reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["message"] == "otpd listening"
            {
                let _ = addr_tx.send(v["addr"].as_str().unwrap_or_default().to_owned());
            }
            lines.lock().unwrap().push(line);
        }
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("otpd did not log its listening address")
        .parse()
        .unwrap();
    let key = key_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("a fresh memory store prints the first key");
    Running {
        child,
        addr,
        key,
        log,
        log_reader: Some(log_reader),
    }
}

/// One request on its own connection; the status line's code and the body.
fn request(addr: SocketAddr, raw: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    status_and_body(&answer)
}

fn status_and_body(answer: &str) -> (u16, String) {
    let status = answer
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Opens a send whose body is held back: the server has read the headers,
/// authenticated the key and is waiting inside the handler for the body (its
/// `100 Continue` says so).
fn send_in_flight(r: &Running) -> TcpStream {
    let mut s = TcpStream::connect(r.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "POST /v1/verifications HTTP/1.1\r\nHost: otpd\r\nx-api-key: {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\
         expect: 100-continue\r\n\r\n",
        r.key,
        BODY.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).unwrap();
        assert_eq!(n, 1, "connection closed before 100 Continue");
        got.push(byte[0]);
    }
    let interim = String::from_utf8(got).unwrap();
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    s
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Polls until the process exits; `None` if it is still running at `deadline`.
fn wait_exit(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls until connecting is refused: the listener is closed.
fn wait_refused(addr: SocketAddr, deadline: Instant) {
    loop {
        match TcpStream::connect(addr) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return,
            // A connection caught in the closing listener's backlog is reset:
            // the next attempt meets the closed port.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                assert!(Instant::now() < deadline, "never refused after SIGTERM");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("unexpected connect error: {e}"),
            Ok(_) => {
                assert!(Instant::now() < deadline, "still accepting after SIGTERM");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[test]
fn sigterm_refuses_new_connections_finishes_in_flight_requests_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let grace = 20;
    let mut otpd = start(dir.path(), grace);
    let (status, body) = request(
        otpd.addr,
        "GET /health/live HTTP/1.1\r\nHost: otpd\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{body}");

    let mut in_flight = send_in_flight(&otpd);
    let signalled = Instant::now();
    sigterm(&otpd.child);

    wait_refused(otpd.addr, signalled + Duration::from_secs(10));
    assert!(
        otpd.child.try_wait().unwrap().is_none(),
        "exited while a request was in flight"
    );

    in_flight.write_all(BODY.as_bytes()).unwrap();
    let mut answer = String::new();
    in_flight.read_to_string(&mut answer).unwrap();
    let (status, body) = status_and_body(&answer);
    assert_eq!(status, 201, "{answer}");
    let sent: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(sent["status"], "pending");
    assert_eq!(sent["to"], "+*******0670");

    let exit = otpd
        .wait_exit(signalled + Duration::from_secs(grace))
        .unwrap_or_else(|| panic!("still running after the grace period\n{}", otpd.log_text()));
    assert_eq!(exit.code(), Some(0), "{}", otpd.log_text());
    // It exited because the work was done, not because the deadline passed.
    assert!(!otpd.log_has("grace period over"), "{}", otpd.log_text());
    assert!(otpd.log_has("SIGTERM"), "{}", otpd.log_text());
    assert!(otpd.log_has("otpd stopped"), "{}", otpd.log_text());
}

#[test]
fn a_request_still_running_at_the_deadline_is_dropped_and_otpd_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let grace = 1;
    let mut otpd = start(dir.path(), grace);
    let mut stuck = send_in_flight(&otpd);
    let signalled = Instant::now();
    sigterm(&otpd.child);

    let exit = otpd
        .wait_exit(signalled + Duration::from_secs(grace + 10))
        .unwrap_or_else(|| panic!("did not stop after the deadline\n{}", otpd.log_text()));
    assert!(
        signalled.elapsed() >= Duration::from_secs(grace),
        "exited before the grace period"
    );
    assert_eq!(exit.code(), Some(0), "{}", otpd.log_text());
    assert!(otpd.log_has("grace period over"), "{}", otpd.log_text());
    // The held-back request never got an answer: its connection just closed.
    let mut rest = String::new();
    let _ = stuck.read_to_string(&mut rest);
    assert!(!rest.contains("HTTP/1.1 201"), "{rest}");
}

#[test]
fn print_config_shows_the_effective_settings_with_secrets_hidden() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("otpd.toml");
    std::fs::write(
        &config,
        "[secrets]\nmaster_key = \"print-config-master\"\n[metrics]\ntoken = \"print-config-token\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_otpd"))
        .arg("--config")
        .arg(&config)
        .arg("--print-config")
        .current_dir(dir.path())
        .env(
            "OTPD_STORE__URL",
            "postgres://otpd:print-config-pg@127.0.0.1/otpd",
        )
        .env("OTPD_SERVER__SHUTDOWN_GRACE_SECONDS", "7")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    for secret in [
        "print-config-master",
        "print-config-token",
        "print-config-pg",
    ] {
        assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
    }
    let toml: toml::Value = toml::from_str(&printed).unwrap();
    assert_eq!(toml["secrets"]["master_key"].as_str(), Some("***"));
    assert_eq!(toml["metrics"]["token"].as_str(), Some("***"));
    assert_eq!(
        toml["store"]["url"].as_str(),
        Some("postgres://otpd:***@127.0.0.1/otpd")
    );
    assert_eq!(
        toml["server"]["shutdown_grace_seconds"].as_integer(),
        Some(7),
        "the environment layer is part of the effective config"
    );
    // Nothing was started: no data directory, no key printed.
    assert!(!dir.path().join("data").exists());
    assert!(!printed.contains("API key"));
}

/// `otpd check-config` as an operator runs it: a variable no setting reads is
/// named in a warning, and an environment holding a variable that is not
/// UTF-8 (which `std::env::vars` panics on) is read as usual.
#[test]
fn check_config_warns_about_unread_variables_and_takes_any_environment() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_otpd"))
        .arg("check-config")
        .current_dir(dir.path())
        .env("OTPD_SERVER_LISTEN", "0.0.0.0:9")
        .env(
            OsStr::from_bytes(b"NOT_UTF8_\xff"),
            OsStr::from_bytes(b"\xfe"),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "configuration is valid\n"
    );
    assert!(
        stderr.contains("OTPD_SERVER_LISTEN: no setting reads this variable"),
        "{stderr}"
    );
}
