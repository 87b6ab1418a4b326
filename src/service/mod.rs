//! Orchestration of one send, check, read or cancel: reads the clock, calls the
//! store and the router, and returns domain outcomes that each API surface
//! translates into its own envelope.

pub mod api_keys;
pub mod delivery;
pub mod dlr_poller;
pub mod guard;
pub mod rotation;
pub mod usage;
pub mod verifications;

pub use api_keys::{ApiKeys, AuthError};
pub use delivery::{PolicySource, ReportOutcome};
pub use guard::{AbuseGuard, GuardReport, Quarantine};
pub use rotation::{RotationReport, rotate_phone_keys};
pub use usage::UsageReport;
pub use verifications::{
    Caller, CheckError, CheckResult, SendCommand, SendError, SendOutcome, Target,
    VerificationService,
};
