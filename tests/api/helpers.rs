//! A real otpd on port 0 with a memory store and a manual clock, and a client for it.

use std::sync::Arc;

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
        Self::launch(store, None, configure).await
    }

    /// With these routes instead of the sandbox (e.g. a failing provider first).
    pub async fn spawn_routed(routes: Vec<Route>, configure: impl FnOnce(&mut Settings)) -> Self {
        Self::launch(Arc::new(MemoryStore::new()), Some(routes), configure).await
    }

    async fn launch(
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
            client: reqwest::Client::new(),
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
