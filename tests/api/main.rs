//! All integration tests, in one binary so they link once.

mod redis_store;
mod store_contract;
