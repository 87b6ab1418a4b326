//! All integration tests, in one binary so they link once.

mod store_contract;
