//! All integration tests, in one binary so they link once.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod abuse;
mod at_rest;
mod bridgex;
mod delivery;
mod failover;
mod helpers;
mod lifecycle;
mod openapi;
mod openlyne;
mod ops;
mod process;
mod prometheus_text;
mod providers;
mod redis_store;
mod route_config;
mod routing;
mod scale_out;
mod seed_clients;
mod service;
mod sql_stores;
mod store_contract;
mod v1;

/// Every HTTP route the app serves, as (method, OpenAPI path). The docs test
/// checks each appears in `/openapi.json`; add new routes here.
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/verifications"),
    ("post", "/v1/verifications/check"),
    ("get", "/v1/verifications/{id}"),
    ("post", "/v1/verifications/{id}/cancel"),
    ("get", "/v1/messages/{id}"),
    ("get", "/v1/usage"),
    ("post", "/v1/dlr/{provider}/{secret}"),
    ("get", "/v1/sandbox/messages"),
    ("get", "/v1/guard"),
    ("delete", "/v1/guard/{prefix}"),
    ("get", "/health"),
    ("get", "/health/live"),
    ("get", "/health/ready"),
    ("get", "/metrics"),
    ("post", "/send-otp"),
    ("post", "/verify-otp"),
    ("get", "/config"),
    ("post", "/webhook/send-otp"),
    ("post", "/webhook/verify-otp"),
];
