//! `/openapi.json` against the server: what the document says a client may
//! send is what the server takes, so a client generated from it works.

use regex::Regex;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, parts};

async fn document(app: &TestApp) -> Value {
    let (status, spec) = parts(
        app.client
            .get(format!("{}/openapi.json", app.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    spec
}

/// Whether a string meets a documented string schema (pattern and lengths).
fn meets(schema: &Value, text: &str) -> bool {
    let chars = text.chars().count() as u64;
    let pattern = schema["pattern"]
        .as_str()
        .is_none_or(|p| Regex::new(p).unwrap().is_match(text));
    pattern
        && schema["minLength"].as_u64().is_none_or(|n| chars >= n)
        && schema["maxLength"].as_u64().is_none_or(|n| chars <= n)
}

#[tokio::test]
async fn every_route_is_documented_and_swagger_ui_is_served() {
    let app = TestApp::spawn().await;
    let spec = document(&app).await;
    let paths = spec["paths"].as_object().unwrap();
    for (method, path) in crate::ROUTES {
        let item = paths
            .get(*path)
            .unwrap_or_else(|| panic!("{path} missing from /openapi.json"));
        assert!(
            item.get(*method).is_some(),
            "{method} {path} missing from /openapi.json"
        );
    }
    let docs = app
        .client
        .get(format!("{}/docs/", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(docs.status(), StatusCode::OK);
    assert!(docs.text().await.unwrap().contains("swagger-ui"));
    // The UI's assets are bundled in the binary: no network needed to render it.
    let bundle = app
        .client
        .get(format!("{}/docs/swagger-ui-bundle.js", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(bundle.status(), StatusCode::OK);
}

#[tokio::test]
async fn both_dialects_are_documented_under_their_own_tags() {
    let app = TestApp::spawn().await;
    let spec = document(&app).await;
    for (method, path, tag) in [
        ("post", "/send-otp", "bridgex"),
        ("post", "/verify-otp", "bridgex"),
        ("get", "/config", "bridgex"),
        ("get", "/health", "bridgex"),
        ("post", "/webhook/send-otp", "openlyne"),
        ("post", "/webhook/verify-otp", "openlyne"),
    ] {
        let tags = &spec["paths"][path][method]["tags"];
        assert!(
            tags.as_array().is_some_and(|t| t.contains(&json!(tag))),
            "{method} {path}: {tags}"
        );
    }
    let names: Vec<&str> = spec["tags"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(
        names.contains(&"bridgex") && names.contains(&"openlyne"),
        "{names:?}"
    );
}

/// A path parameter is a `{name}` of its path, and every `{name}` is one;
/// query parameters are optional and read from the query.
#[tokio::test]
async fn parameters_are_documented_where_the_server_reads_them() {
    let app = TestApp::spawn().await;
    let spec = document(&app).await;
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            let in_path: Vec<&str> = params
                .iter()
                .filter(|p| p["in"] == "path")
                .map(|p| p["name"].as_str().unwrap())
                .collect();
            for name in &in_path {
                assert!(
                    path.contains(&format!("{{{name}}}")),
                    "{method} {path}: `{name}` is documented in the path but is not in it"
                );
            }
            for segment in path.split('/').filter(|s| s.starts_with('{')) {
                let name = segment.trim_matches(|c| c == '{' || c == '}');
                assert!(
                    in_path.contains(&name),
                    "{method} {path}: `{name}` undocumented"
                );
            }
            for p in params.iter().filter(|p| p["in"] == "query") {
                assert_eq!(p["required"], false, "{method} {path}: {p}");
            }
        }
    }
    let query = |path: &str, name: &str| {
        spec["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == name && p["in"] == "query")
    };
    assert!(query("/v1/usage", "from") && query("/v1/usage", "to"));
    assert!(query("/v1/sandbox/messages", "to") && query("/v1/sandbox/messages", "limit"));
    app.send_to("+31651860670").await;
    app.send_to("+31651860671").await;
    let (status, inbox) = parts(app.get("/v1/sandbox/messages?limit=1").await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(inbox["messages"].as_array().unwrap().len(), 1, "{inbox}");
}

/// Numeric bounds in the document are the ones the server enforces: the
/// bound itself is taken, one past it is refused.
#[tokio::test]
async fn documented_numeric_bounds_are_the_servers() {
    let app = TestApp::spawn().await;
    let spec = document(&app).await;
    let schemas = &spec["components"]["schemas"];
    let mut number = 0;
    let mut next_phone = || {
        number += 1;
        format!("3165186{number:04}")
    };
    for (field, keyword) in [
        ("code_length", "minimum"),
        ("code_length", "maximum"),
        ("ttl_seconds", "minimum"),
    ] {
        let bound = schemas["SendVerificationRequest"]["properties"][field][keyword]
            .as_i64()
            .unwrap_or_else(|| panic!("{field} has no documented {keyword}"));
        let past = if keyword == "minimum" {
            bound - 1
        } else {
            bound + 1
        };
        for (value, expected) in [
            (bound, StatusCode::CREATED),
            (past, StatusCode::BAD_REQUEST),
        ] {
            let to = format!("+{}", next_phone());
            let r = app
                .post("/v1/verifications", json!({ "to": to, field: value }))
                .await;
            assert_eq!(r.status(), expected, "{field} = {value}");
        }
    }
    let route = &schemas["BridgexSendRequest"]["properties"]["route_id"];
    for (value, expected) in [
        (route["minimum"].as_i64().unwrap(), StatusCode::OK),
        (route["maximum"].as_i64().unwrap(), StatusCode::OK),
        (
            route["minimum"].as_i64().unwrap() - 1,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            route["maximum"].as_i64().unwrap() + 1,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        let body = json!({ "phone_number": next_phone(), "route_id": value });
        let r = app.post_bearer("/send-otp", body).await;
        assert_eq!(r.status(), expected, "route_id = {value}");
    }
}

/// Each sample string is taken by the server exactly when it meets the
/// documented pattern and lengths.
#[tokio::test]
async fn documented_string_patterns_are_the_servers() {
    let app = TestApp::spawn().await;
    let spec = document(&app).await;
    let schemas = &spec["components"]["schemas"];
    let property = |schema: &str, field: &str| schemas[schema]["properties"][field].clone();

    let code = property("CheckVerificationRequest", "code");
    for sample in [
        "1234",
        " 123456 ",
        "1234567890",
        "123",
        "12345678901",
        "12a4",
        "",
    ] {
        let body = json!({ "id": "e3e70682-c209-4cac-a29f-6fbed82c07cd", "code": sample });
        let status = app.post("/v1/verifications/check", body).await.status();
        // A well-formed code for an unknown id is a 404; a malformed one a 400.
        assert_eq!(
            status != StatusCode::BAD_REQUEST,
            meets(&code, sample),
            "code {sample:?}: {status}"
        );
    }

    let long = |n: usize| "é".repeat(n);
    let mut number = 0;
    for (field, samples) in [
        (
            "purpose",
            vec![
                "signup".to_owned(),
                "  ".into(),
                "a\u{1}b".into(),
                long(50),
                long(51),
            ],
        ),
        (
            "uid",
            vec![
                "user-1".to_owned(),
                " ".into(),
                "a\nb".into(),
                long(128),
                long(129),
            ],
        ),
        (
            "locale",
            vec![
                "fr".to_owned(),
                "pt-BR".into(),
                "".into(),
                "fr FR".into(),
                "x".repeat(35),
                "x".repeat(36),
            ],
        ),
    ] {
        let schema = property("SendVerificationRequest", field);
        for sample in samples {
            number += 1;
            let to = format!("+3165187{number:04}");
            let r = app
                .post("/v1/verifications", json!({ "to": to, field: sample }))
                .await;
            let status = r.status();
            assert_eq!(
                status == StatusCode::CREATED,
                meets(&schema, &sample),
                "{field} {sample:?}: {status}"
            );
        }
    }

    let phone = property("BridgexSendRequest", "phone_number");
    for sample in [
        "31651860670",
        " 31651860680 ",
        "3165186067a",
        "316518606",
        "3165186067012345",
    ] {
        let r = app
            .post_bearer("/send-otp", json!({ "phone_number": sample }))
            .await;
        let status = r.status();
        assert_eq!(
            status == StatusCode::OK,
            meets(&phone, sample),
            "phone_number {sample:?}: {status}"
        );
    }

    let prefix = spec["paths"]["/v1/guard/{prefix}"]["delete"]["parameters"][0]["schema"].clone();
    for sample in [
        "+256700",
        "256700",
        "%2B256",
        "+",
        "+1234567890123456",
        "+25a",
    ] {
        let r = app
            .client
            .delete(format!("{}/v1/guard/{sample}", app.base))
            .header("x-api-key", &app.key)
            .send()
            .await
            .unwrap();
        // Nothing is quarantined: a well-formed prefix is a 404, a malformed one a 400.
        let status = r.status();
        assert_eq!(
            status != StatusCode::BAD_REQUEST,
            meets(&prefix, sample),
            "prefix {sample:?}: {status}"
        );
    }
}
