//! The original services' clients, as their READMEs write them: Python
//! `requests.post(url, headers=..., json=data)`. This speaks the bytes such a
//! call puts on the wire (its headers, `json.dumps` spacing, one connection per
//! call) over a plain socket, so nothing of reqwest's shapes the result.

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::TestApp;

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    json: Value,
}

impl Answer {
    /// `response.raise_for_status()`.
    fn raise_for_status(&self) {
        assert!(self.status < 400, "HTTP {}: {}", self.status, self.json);
    }
}

/// `requests.post(base + path, headers=headers, json=data)`, with `data`
/// already as `json.dumps` renders it.
async fn requests_post(
    app: &TestApp,
    path: &str,
    headers: &[(&str, &str)],
    dumped: &str,
) -> Answer {
    let authority = app.base.trim_start_matches("http://");
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: python-requests/2.32.3\r\nAccept-Encoding: gzip, deflate\r\nAccept: */*\r\nConnection: keep-alive\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
    {
        request.push_str("Content-Type: application/json\r\n");
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{dumped}", dumped.len()));

    let mut stream = TcpStream::connect(authority).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let (head_end, content_length) = loop {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed before the answer was complete");
        received.extend_from_slice(&buf[..n]);
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end]).to_string();
            let length = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().unwrap())
                })
                .expect("the answer has a Content-Length");
            break (end + 4, length);
        }
    };
    while received.len() < head_end + content_length {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed before the body was complete");
        received.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&received[..head_end - 4]).to_string();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let json = serde_json::from_slice(&received[head_end..head_end + content_length]).unwrap();
    Answer {
        status,
        headers,
        json,
    }
}

#[tokio::test]
async fn the_openlyne_readme_python_client_works_unchanged() {
    let app = TestApp::spawn().await;
    // HEADERS = {"x-api-key": API_KEY, "Content-Type": "application/json"}
    let headers = [
        ("x-api-key", app.key.as_str()),
        ("Content-Type", "application/json"),
    ];

    // send_otp(256700123456, uid) with env="sandbox" by default.
    let sent = requests_post(
        &app,
        "/webhook/send-otp",
        &headers,
        r#"{"phone": 256700123456, "uid": "123e4567-e89b-12d3-a456-426614174000", "env": "sandbox"}"#,
    )
    .await;
    sent.raise_for_status();
    assert_eq!(
        sent.json,
        serde_json::json!({
            "success": true,
            "data": { "status": "Sent", "number": "256700123456" },
            "message": "OTP sent successfully",
            "error": null,
        })
    );
    assert!(
        sent.headers
            .iter()
            .any(|(k, v)| k == "content-type" && v == "application/json")
    );

    let code = app.inbox_code("+256700123456").await;
    let verified = requests_post(
        &app,
        "/webhook/verify-otp",
        &headers,
        &format!(r#"{{"uid": "123e4567-e89b-12d3-a456-426614174000", "code": "{code}"}}"#),
    )
    .await;
    verified.raise_for_status();
    assert_eq!(
        verified.json,
        serde_json::json!({
            "success": true,
            "data": { "message": "OTP verified successfully", "contact_value": "256700123456" },
            "message": "Verification successful",
            "error": {},
        })
    );

    // The README's own example call, verify_otp(uid, "123456"), after the code is used.
    let again = requests_post(
        &app,
        "/webhook/verify-otp",
        &headers,
        r#"{"uid": "123e4567-e89b-12d3-a456-426614174000", "code": "123456"}"#,
    )
    .await;
    assert_eq!(again.status, 400);
    assert_eq!(again.json["success"], false);
}

#[tokio::test]
async fn the_bridgex_python_client_works_unchanged() {
    let app = TestApp::spawn().await;
    let bearer = format!("Bearer {}", app.key);
    let headers = [("Authorization", bearer.as_str())];

    let sent = requests_post(
        &app,
        "/send-otp",
        &headers,
        r#"{"phone_number": "31651860670", "purpose": "login", "route_id": 3}"#,
    )
    .await;
    sent.raise_for_status();
    assert_eq!(sent.json["status"], "otp_sent");
    assert_eq!(sent.json["phone_number"], "*******0670");
    assert_eq!(sent.json["route_id"], 3);
    assert_eq!(sent.json["expires_in_seconds"], 300);
    assert_eq!(sent.json["cooldown_seconds"], 45);
    assert!(sent.json["order_id"].is_string());
    let code = sent.json["debug_code"].as_str().unwrap();

    let verified = requests_post(
        &app,
        "/verify-otp",
        &headers,
        &format!(r#"{{"phone_number": "31651860670", "code": "{code}", "purpose": "login"}}"#),
    )
    .await;
    verified.raise_for_status();
    assert_eq!(
        verified.json,
        serde_json::json!({
            "status": "otp_verified",
            "phone_number": "*******0670",
            "purpose": "login",
            "verified": true,
        })
    );

    let again = requests_post(
        &app,
        "/send-otp",
        &headers,
        r#"{"phone_number": "31651860670", "purpose": "login", "route_id": 3}"#,
    )
    .await;
    assert_eq!(again.status, 429);
    assert_eq!(
        again.json,
        serde_json::json!({ "detail": "OTP was sent too recently. Retry in 45 seconds." })
    );
}
