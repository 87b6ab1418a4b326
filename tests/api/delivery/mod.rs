//! Delivery tracking end to end: real provider clients in front of wiremock
//! servers that speak each provider's wire format, delivery reports posted in
//! each provider's real callback format, the BridgeXAPI poller, automatic
//! re-sends after failed deliveries, and the usage they all add up to.

mod callbacks;
mod polling;
mod retention;
mod usage;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine;
use hmac::{Hmac, Mac};
use otpd::config::Settings;
use otpd::sms::RouteSettings;
use parking_lot::Mutex;
use reqwest::{Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::helpers::{TestApp, parts};

pub const DLR_SECRET: &str = "dlr-secret-0123456789abcdef";
pub const PUBLIC_BASE: &str = "https://otpd.example.com";
pub const TWILIO_TOKEN: &str = "twilio-test-token";
pub const TWILIO_SID: &str = "AC0123456789abcdef0123456789abcdef";

/// Africa's Talking: every recipient is sent (101) with id `ATPid_<n>` and a
/// cost of KES 0.8, except numbers in `refuse`, which fail as InvalidPhoneNumber.
#[derive(Default)]
struct AfricasTalking {
    count: AtomicUsize,
    refuse: Mutex<BTreeSet<String>>,
}

impl Respond for AfricasTalking {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let to = form(&request.body).remove("to").unwrap_or_default();
        let entry = if self.refuse.lock().contains(&to) {
            json!({"statusCode": 403, "number": to, "status": "InvalidPhoneNumber",
                   "cost": "0", "messageId": "None"})
        } else {
            let n = self.count.fetch_add(1, Ordering::SeqCst) + 1;
            json!({"statusCode": 101, "number": to, "status": "Success",
                   "cost": "KES 0.8000", "messageId": format!("ATPid_{n}")})
        };
        ResponseTemplate::new(201).set_body_json(json!({
            "SMSMessageData": {"Message": "Sent to 1/1 Total Cost: KES 0.8000", "Recipients": [entry]}
        }))
    }
}

/// Twilio: every message is queued as `SM<n>` with no price yet.
#[derive(Default)]
struct Twilio {
    count: AtomicUsize,
}

impl Respond for Twilio {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let n = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        ResponseTemplate::new(201).set_body_json(json!({
            "sid": format!("SM{n:032}"), "status": "queued", "error_code": null,
            "error_message": null, "price": null, "price_unit": "USD"
        }))
    }
}

/// BridgeXAPI sends: `BX-<n>-abc`, order `<n>`, cost 0.05 (route currency EUR).
#[derive(Default)]
struct BridgexSend {
    count: AtomicUsize,
}

impl Respond for BridgexSend {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let n = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        let body: Value = serde_json::from_slice(&request.body).unwrap_or_default();
        ResponseTemplate::new(200).set_body_json(json!({
            "status": "success", "message": "SMS sent", "order_id": n, "route_id": 3, "count": 1,
            "messages": [{"bx_message_id": format!("BX-{n}-abc"),
                          "msisdn": body["numbers"][0], "status": "queued"}],
            "cost": 0.05, "balance_after": 10.0
        }))
    }
}

/// BridgeXAPI's `GET /api/v1/dlr/{id}`: what the test has set for each id,
/// else 404 "DLR record not found".
#[derive(Default, Clone)]
pub struct BridgexDlr {
    answers: Arc<Mutex<HashMap<String, ResponseTemplate>>>,
}

impl BridgexDlr {
    /// From now on, polls of `bx_message_id` find this status.
    pub fn report(&self, bx_message_id: &str, status: &str, error: Option<&str>) {
        self.answer(
            bx_message_id,
            ResponseTemplate::new(200).set_body_json(json!({
                "bx_message_id": bx_message_id, "msisdn": "31651860670", "status": status,
                "route_id": 3, "sms_order_id": 1, "created_at": "2026-01-01T00:00:00", "error": error
            })),
        );
    }

    pub fn answer(&self, bx_message_id: &str, answer: ResponseTemplate) {
        self.answers.lock().insert(bx_message_id.to_owned(), answer);
    }
}

impl Respond for BridgexDlr {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let id = request.url.path().rsplit('/').next().unwrap_or_default();
        self.answers.lock().get(id).cloned().unwrap_or_else(|| {
            ResponseTemplate::new(404).set_body_json(json!({"detail": "DLR record not found"}))
        })
    }
}

/// One wiremock server per provider. Routes: 1 Africa's Talking, 2 Twilio,
/// 3 BridgeXAPI (price 0.05 EUR).
pub struct Providers {
    pub at: MockServer,
    pub twilio: MockServer,
    pub bridgex: MockServer,
    at_state: Arc<AfricasTalking>,
    pub dlr: BridgexDlr,
}

struct Shared<T>(Arc<T>);

impl<T: Respond + Send + Sync + 'static> Respond for Shared<T> {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        self.0.respond(request)
    }
}

impl Providers {
    pub async fn start() -> Self {
        let (at, twilio, bridgex) = (
            MockServer::start().await,
            MockServer::start().await,
            MockServer::start().await,
        );
        let at_state = Arc::new(AfricasTalking::default());
        Mock::given(method("POST"))
            .and(path("/version1/messaging"))
            .respond_with(Shared(at_state.clone()))
            .mount(&at)
            .await;
        Mock::given(method("POST"))
            .and(path(format!(
                "/2010-04-01/Accounts/{TWILIO_SID}/Messages.json"
            )))
            .respond_with(Twilio::default())
            .mount(&twilio)
            .await;
        Mock::given(method("POST"))
            .and(path("/api/v1/send_sms"))
            .respond_with(BridgexSend::default())
            .mount(&bridgex)
            .await;
        let dlr = BridgexDlr::default();
        Mock::given(method("GET"))
            .and(path_regex("^/api/v1/dlr/[^/]+$"))
            .respond_with(dlr.clone())
            .mount(&bridgex)
            .await;
        Self {
            at,
            twilio,
            bridgex,
            at_state,
            dlr,
        }
    }

    /// Africa's Talking refuses this number (E.164) from now on.
    pub fn refuse(&self, e164: &str) {
        self.at_state.refuse.lock().insert(e164.to_owned());
    }

    /// Routes 1–3, the failover chain `chain`, the DLR secret and public URL,
    /// and a poll interval long enough that only the test runs poll rounds.
    pub fn configure(&self, settings: &mut Settings, chain: &[u32]) {
        self.configure_reaching_at(settings, chain, &self.at.uri());
    }

    /// As `configure`, with Africa's Talking reached at `at` (a proxy, say).
    pub fn configure_reaching_at(&self, settings: &mut Settings, chain: &[u32], at: &str) {
        #[derive(Deserialize)]
        struct Routes {
            routes: Vec<RouteSettings>,
        }
        let parsed: Routes = toml::from_str(&format!(
            r#"
            [[routes]]
            id = 1
            provider = "africastalking"
            username = "otpd"
            api_key = "test-key"
            base_url = "{at}"

            [[routes]]
            id = 2
            provider = "twilio"
            base_url = "{twilio}"
            account_sid = "{TWILIO_SID}"
            auth_token = "{TWILIO_TOKEN}"
            from = "+15005550006"

            [[routes]]
            id = 3
            provider = "bridgexapi"
            base_url = "{bridgex}"
            api_key = "test-key"
            provider_route_id = 3
            caller_id = "OTPD"
            price = {{ "*" = 0.05 }}
            currency = "EUR"
            "#,
            twilio = self.twilio.uri(),
            bridgex = self.bridgex.uri(),
        ))
        .unwrap();
        settings.routes = parsed.routes;
        settings.policy.routes = chain.to_vec();
        settings.routing.timeout_ms = 2_000;
        settings.dlr.secret = Some(secrecy::SecretString::from(DLR_SECRET.to_owned()));
        settings.dlr.public_base_url = Some(PUBLIC_BASE.to_owned());
        settings.dlr.poll_interval_seconds = 3_600;
    }

    pub async fn spawn(&self, chain: &[u32]) -> TestApp {
        TestApp::spawn_with(|s| self.configure(s, chain)).await
    }
}

/// A form body as a map (last value wins).
pub fn form(body: &[u8]) -> HashMap<String, String> {
    url::form_urlencoded::parse(body).into_owned().collect()
}

/// The code in the newest message `server` was asked to send: the digits of
/// its text.
pub async fn last_code(server: &MockServer) -> String {
    let requests = server.received_requests().await.unwrap();
    let last = requests
        .iter()
        .rev()
        .find(|r| r.method.as_str() == "POST")
        .expect("the provider got no message");
    let text = match serde_json::from_slice::<Value>(&last.body) {
        Ok(json) => json["message"].as_str().unwrap_or_default().to_owned(),
        Err(_) => {
            let f = form(&last.body);
            f.get("message")
                .or_else(|| f.get("Body"))
                .cloned()
                .unwrap_or_default()
        }
    };
    text.chars().filter(char::is_ascii_digit).collect()
}

/// How many requests `server` got at `path` (all methods).
pub async fn hits(server: &MockServer, at: &str) -> usize {
    server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.url.path() == at)
        .count()
}

/// Posts an Africa's Talking delivery report as Africa's Talking does.
pub async fn post_at_report(app: &TestApp, secret: &str, fields: &[(&str, &str)]) -> Response {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish();
    app.post_raw(
        &format!("/v1/dlr/africastalking/{secret}"),
        &[("content-type", "application/x-www-form-urlencoded")],
        body.as_bytes(),
    )
    .await
}

/// Twilio's signature of a POST to `url` with `params`.
pub fn twilio_signature(token: &str, url: &str, params: &[(&str, &str)]) -> String {
    let mut sorted = params.to_vec();
    sorted.sort();
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(token.as_bytes()).unwrap();
    mac.update(url.as_bytes());
    for (k, v) in sorted {
        mac.update(k.as_bytes());
        mac.update(v.as_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Posts a Twilio status callback with the fields Twilio sends, signed with
/// `token` (or with the given signature instead).
pub async fn post_twilio_report(
    app: &TestApp,
    sid: &str,
    status: &str,
    error_code: Option<&str>,
    signature: Option<&str>,
) -> Response {
    let mut params = vec![
        ("ApiVersion", "2010-04-01"),
        ("AccountSid", TWILIO_SID),
        ("From", "+15005550006"),
        ("MessageSid", sid),
        ("MessageStatus", status),
        ("SmsSid", sid),
        ("SmsStatus", status),
        ("To", "+31651860670"),
    ];
    if let Some(code) = error_code {
        params.push(("ErrorCode", code));
    }
    let path = format!("/v1/dlr/twilio/{DLR_SECRET}");
    let computed = twilio_signature(TWILIO_TOKEN, &format!("{PUBLIC_BASE}{path}"), &params);
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(&params)
        .finish();
    app.post_raw(
        &path,
        &[
            (
                "content-type",
                "application/x-www-form-urlencoded; charset=utf-8",
            ),
            ("x-twilio-signature", signature.unwrap_or(&computed)),
            ("i-twilio-idempotency-token", "a1b2c3"),
        ],
        body.as_bytes(),
    )
    .await
}

/// The report endpoint's answer: 200 and its `status`.
pub async fn report_status(r: Response) -> String {
    let (status, body) = parts(r).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["status"].as_str().unwrap().to_owned()
}

/// A verification's `deliveries`.
pub async fn deliveries(app: &TestApp, id: &str) -> Vec<Value> {
    let (status, view) = parts(app.get(&format!("/v1/verifications/{id}")).await).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    view["deliveries"].as_array().unwrap().clone()
}

/// Checks `code` for verification `id`: (HTTP status, body).
pub async fn check(app: &TestApp, id: &str, code: &str) -> (StatusCode, Value) {
    parts(
        app.post("/v1/verifications/check", json!({"id": id, "code": code}))
            .await,
    )
    .await
}
