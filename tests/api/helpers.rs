//! A real otpd on port 0 with a memory store and a manual clock, and a client for it.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use chrono::Duration;
use otpd::clock::ManualClock;
use otpd::config::Settings;
use otpd::sms::Route;
use otpd::startup::{Application, Dependencies};
use otpd::store::{MemoryStore, Store};
use reqwest::{Response, StatusCode};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::sync::oneshot;

pub struct TestApp {
    pub base: String,
    pub key: String,
    pub clock: Arc<ManualClock>,
    pub state: otpd::http::AppState,
    /// The BridgeXAPI delivery-report poller; tests run rounds with `poll_once`.
    pub poller: Arc<otpd::service::dlr_poller::DlrPoller>,
    pub client: reqwest::Client,
    _stop: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

pub fn test_settings(dir: &std::path::Path) -> Settings {
    let mut s = Settings::default();
    s.server.listen = "127.0.0.1:0".into();
    s.data_dir = dir.to_path_buf();
    s.store.url = Some("memory://".into());
    s.secrets.master_key = Some(SecretString::from(
        "integration-test master secret".to_owned(),
    ));
    s.debug_codes = true;
    s
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(configure: impl FnOnce(&mut Settings)) -> Self {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        Self::spawn_on(store, configure).await
    }

    pub async fn spawn_on(store: Arc<dyn Store>, configure: impl FnOnce(&mut Settings)) -> Self {
        Self::spawn_full(store, None, configure).await
    }

    /// With these routes instead of the zero-config sandbox.
    pub async fn spawn_routed(routes: Vec<Route>, configure: impl FnOnce(&mut Settings)) -> Self {
        Self::spawn_full(Arc::new(MemoryStore::new()), Some(routes), configure).await
    }

    pub async fn spawn_full(
        store: Arc<dyn Store>,
        routes: Option<Vec<Route>>,
        configure: impl FnOnce(&mut Settings),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = test_settings(dir.path());
        configure(&mut settings);
        let clock = Arc::new(ManualClock::default());
        let deps = Dependencies {
            clock: clock.clone(),
            store: Some(store),
            routes,
            ..Dependencies::default()
        };
        let app = Application::build_with(settings, deps).await.unwrap();
        let base = format!("http://127.0.0.1:{}", app.port());
        let state = app.state().clone();
        let poller = app.dlr_poller();
        let (_, key) = state.keys.create("acme").await.unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        Self {
            base,
            key: key.expose().to_owned(),
            clock,
            state,
            poller,
            client: plain_client(),
            _stop: stop,
            _dir: dir,
        }
    }

    pub async fn new_key(&self, tenant: &str) -> String {
        self.state
            .keys
            .create(tenant)
            .await
            .unwrap()
            .1
            .expose()
            .to_owned()
    }

    pub fn advance(&self, seconds: i64) {
        self.clock.advance(Duration::seconds(seconds));
    }

    pub async fn post_as(&self, key: &str, path: &str, body: Value) -> Response {
        self.client
            .post(format!("{}{path}", self.base))
            .header("x-api-key", key)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn post(&self, path: &str, body: Value) -> Response {
        self.post_as(&self.key, path, body).await
    }

    /// POST with `Authorization: Bearer <key>` (what BridgeX-style clients send).
    pub async fn post_bearer(&self, path: &str, body: Value) -> Response {
        self.client
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// POST raw bytes with the given headers and no others (no key unless given).
    pub async fn post_raw(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        let mut req = self
            .client
            .post(format!("{}{path}", self.base))
            .body(body.to_vec());
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.send().await.unwrap()
    }

    /// The code in the newest sandbox message to `to` (E.164).
    pub async fn inbox_code(&self, to: &str) -> String {
        let path = format!("/v1/sandbox/messages?to={}", urlencoding::encode(to));
        let (status, inbox) = parts(self.get(&path).await).await;
        assert_eq!(status, StatusCode::OK, "{inbox}");
        let body = inbox["messages"][0]["body"]
            .as_str()
            .unwrap_or_else(|| panic!("no sandbox message to {to}: {inbox}"));
        body.chars().filter(char::is_ascii_digit).collect()
    }

    pub async fn get_as(&self, key: &str, path: &str) -> Response {
        self.client
            .get(format!("{}{path}", self.base))
            .header("x-api-key", key)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> Response {
        self.get_as(&self.key, path).await
    }

    /// Sends a code to `to` and returns the 201 body.
    pub async fn send_to(&self, to: &str) -> Value {
        let r = self.post("/v1/verifications", json!({ "to": to })).await;
        assert_eq!(r.status(), StatusCode::CREATED);
        r.json().await.unwrap()
    }
}

/// Status and JSON body of a response.
pub async fn parts(r: Response) -> (StatusCode, Value) {
    let status = r.status();
    let text = r.text().await.unwrap();
    let body =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, body)
}

/// Status, headers and the exact body text of a response.
pub async fn raw(r: Response) -> (StatusCode, reqwest::header::HeaderMap, String) {
    let status = r.status();
    let headers = r.headers().clone();
    (status, headers, r.text().await.unwrap())
}

/// Asserts the native error shape and returns the body.
pub async fn expect_error(r: Response, status: StatusCode, code: &str) -> Value {
    let (got, body) = parts(r).await;
    assert_eq!(got, status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

/// A code that is not `code`.
pub fn wrong(code: &str) -> String {
    code.chars()
        .map(|c| char::from(b'0' + ((c as u8 - b'0' + 1) % 10)))
        .collect()
}

/// A TCP proxy that can stall: it then holds every byte in both directions, as a
/// network path or a frozen server would, until resumed.
pub struct StallingProxy {
    pub port: u16,
    stalled: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl StallingProxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stalled, watch) = watch::channel(false);
        let task = tokio::spawn(async move {
            // Dropped (aborting every pipe) when the proxy task is aborted.
            let mut pipes = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                pipes.spawn(pump(client_read, server_write, watch.clone()));
                pipes.spawn(pump(server_read, client_write, watch.clone()));
            }
        });
        Self {
            port,
            stalled,
            task,
        }
    }

    pub fn stall(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut stalled: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stalled.wait_for(|s| !*s).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Every key of one Redis node matching the glob `pattern` (a full SCAN).
pub async fn redis_keys_matching(
    conn: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
) -> Vec<String> {
    let mut keys = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .unwrap();
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

/// A client for talking to otpd over plain HTTP. reqwest needs a TLS provider
/// installed first even so (otpd's TLS runs on ring, see Cargo.toml).
pub fn plain_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}
