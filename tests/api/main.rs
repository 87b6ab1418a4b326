//! All integration tests, in one binary so they link once.
// A panic in a test or its helpers is a failing test, not a crashed server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod sql_stores;
mod store_contract;
