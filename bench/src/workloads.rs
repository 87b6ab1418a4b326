//! The requests each scenario sends: the bare hello, sends with a distinct
//! number per request (native and BridgeX-style), and checks of wrong or right
//! codes against verifications created earlier in the same run.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use crate::loadgen::{Workload, post_json};

/// Second digits of Dutch mobile numbers (`+316x…`) that the numbering plan
/// accepts; each gives ten million numbers.
const NL_MOBILE_BLOCKS: [u8; 6] = [1, 2, 3, 4, 5, 8];
pub const NUMBERS_PER_BLOCK: u64 = 10_000_000;
pub const NUMBER_SPACE: u64 = NUMBERS_PER_BLOCK * NL_MOBILE_BLOCKS.len() as u64;

/// The `k`-th bench number, digits only (`316…`). Distinct `k` give distinct
/// numbers, so sends never meet a cooldown.
pub fn phone_digits(k: u64) -> String {
    let k = k % NUMBER_SPACE;
    let block = NL_MOBILE_BLOCKS[(k / NUMBERS_PER_BLOCK) as usize];
    format!("316{block}{:07}", k % NUMBERS_PER_BLOCK)
}

/// A code that is certainly not `code`: its last digit moved by one.
pub fn wrong_code(code: &str) -> String {
    let mut bytes = code.as_bytes().to_vec();
    if let Some(last) = bytes.last_mut() {
        *last = if *last == b'9' { b'0' } else { *last + 1 };
    }
    String::from_utf8(bytes).unwrap_or_default()
}

/// Where a run sends its requests.
#[derive(Clone)]
pub struct Endpoint {
    pub host: String,
    pub key: String,
}

/// A verification created during the run, with its code (from `debug_code`).
#[derive(Debug, Clone)]
pub struct Issued {
    pub phone: u64,
    pub id: Option<String>,
    pub code: String,
}

/// Collected verifications, merged from every connection at the end.
#[derive(Default)]
pub struct Supply(Mutex<Vec<Issued>>);

impl Supply {
    pub fn take(&self) -> Vec<Issued> {
        self.0
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
}

/// `GET /` on the bare endpoint.
pub struct Hello {
    pub host: String,
}

impl Workload for Hello {
    type Conn = ();

    fn connection(&self) {}

    fn request(&self, _: &mut (), buf: &mut Vec<u8>) -> bool {
        buf.extend_from_slice(b"GET / HTTP/1.1\r\nhost: ");
        buf.extend_from_slice(self.host.as_bytes());
        buf.extend_from_slice(b"\r\n\r\n");
        true
    }

    fn response(&self, _: &mut (), _: u16, _: &[u8]) {}

    fn finish(&self, _: ()) {}
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST /v1/verifications`, `POST /v1/verifications/check` by id.
    Native,
    /// `POST /send-otp`, `POST /verify-otp` by phone number and purpose.
    Bridgex { route_id: u32 },
}

/// Sends to number `first`, `first + 1`, … and, when `collect` is set, keeps
/// what each answer says (id, debug code) for later checks.
pub struct Send {
    pub endpoint: Endpoint,
    pub api: Api,
    pub next: AtomicU64,
    /// Number index past the last one to send; `None` sends until the run ends.
    pub end: Option<u64>,
    pub collect: bool,
    pub supply: Arc<Supply>,
}

pub struct SendConn {
    in_flight: u64,
    issued: Vec<Issued>,
}

#[derive(Deserialize)]
struct SendAnswer {
    id: Option<String>,
    debug_code: Option<String>,
}

impl Send {
    pub fn new(endpoint: Endpoint, api: Api, first: u64, collect: bool) -> Self {
        Self {
            endpoint,
            api,
            next: AtomicU64::new(first),
            end: None,
            collect,
            supply: Arc::new(Supply::default()),
        }
    }
}

impl Send {
    /// Stops after `count` sends.
    pub fn limited(mut self, count: u64) -> Self {
        self.end = Some(self.next.load(Ordering::Relaxed) + count);
        self
    }
}

impl Workload for Send {
    type Conn = SendConn;

    fn connection(&self) -> SendConn {
        SendConn {
            in_flight: 0,
            issued: Vec::new(),
        }
    }

    fn request(&self, conn: &mut SendConn, buf: &mut Vec<u8>) -> bool {
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        if self.end.is_some_and(|end| k >= end) {
            return false;
        }
        conn.in_flight = k;
        let digits = phone_digits(k);
        let (path, body) = match self.api {
            Api::Native => (
                "/v1/verifications",
                format!(r#"{{"to":"+{digits}","purpose":"login"}}"#),
            ),
            Api::Bridgex { route_id } => (
                "/send-otp",
                format!(r#"{{"phone_number":"{digits}","purpose":"login","route_id":{route_id}}}"#),
            ),
        };
        post_json(
            buf,
            &self.endpoint.host,
            path,
            &self.endpoint.key,
            body.as_bytes(),
        );
        true
    }

    fn response(&self, conn: &mut SendConn, status: u16, body: &[u8]) {
        if !self.collect || !(200..300).contains(&status) {
            return;
        }
        if let Ok(SendAnswer {
            id,
            debug_code: Some(code),
        }) = serde_json::from_slice::<SendAnswer>(body)
        {
            conn.issued.push(Issued {
                phone: conn.in_flight,
                id,
                code,
            });
        }
    }

    fn finish(&self, conn: SendConn) {
        if let Ok(mut all) = self.supply.0.lock() {
            all.extend(conn.issued);
        }
    }
}

/// Checks codes of issued verifications: a wrong code (each verification takes
/// several, well under its attempt limit) cycling over the set, or the right
/// code once each until the set is used up.
pub struct Check {
    pub endpoint: Endpoint,
    pub api: Api,
    pub items: Arc<Vec<Issued>>,
    pub right: bool,
    pub next: AtomicUsize,
}

impl Check {
    pub fn new(endpoint: Endpoint, api: Api, items: Arc<Vec<Issued>>, right: bool) -> Self {
        Self {
            endpoint,
            api,
            items,
            right,
            next: AtomicUsize::new(0),
        }
    }
}

impl Workload for Check {
    type Conn = ();

    fn connection(&self) {}

    fn request(&self, _: &mut (), buf: &mut Vec<u8>) -> bool {
        if self.items.is_empty() {
            return false;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let item = if self.right {
            match self.items.get(i) {
                Some(item) => item,
                None => return false,
            }
        } else {
            &self.items[i % self.items.len()]
        };
        let code = if self.right {
            item.code.clone()
        } else {
            wrong_code(&item.code)
        };
        let (path, body) = match (self.api, &item.id) {
            (Api::Native, Some(id)) => (
                "/v1/verifications/check",
                format!(r#"{{"id":"{id}","code":"{code}"}}"#),
            ),
            (Api::Native, None) => (
                "/v1/verifications/check",
                format!(
                    r#"{{"to":"+{}","purpose":"login","code":"{code}"}}"#,
                    phone_digits(item.phone)
                ),
            ),
            (Api::Bridgex { .. }, _) => (
                "/verify-otp",
                format!(
                    r#"{{"phone_number":"{}","purpose":"login","code":"{code}"}}"#,
                    phone_digits(item.phone)
                ),
            ),
        };
        post_json(
            buf,
            &self.endpoint.host,
            path,
            &self.endpoint.key,
            body.as_bytes(),
        );
        true
    }

    fn response(&self, _: &mut (), _: u16, _: &[u8]) {}

    fn finish(&self, _: ()) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_numbers_are_valid_and_distinct() {
        for k in [0, 1, 9_999_999, 10_000_000, 25_000_123, NUMBER_SPACE - 1] {
            let digits = phone_digits(k);
            assert!(
                otpd::domain::PhoneNumber::parse(&digits).is_ok(),
                "{digits} should be a valid number"
            );
        }
        assert_ne!(phone_digits(1), phone_digits(2));
        assert_ne!(phone_digits(0), phone_digits(NUMBERS_PER_BLOCK));
    }

    #[test]
    fn wrong_code_differs() {
        assert_eq!(wrong_code("123459"), "123450");
        assert_eq!(wrong_code("000000"), "000001");
    }
}
