//! Orchestration of one send, check, read or cancel: reads the clock, calls the
//! store and the router, and returns domain outcomes that each API surface
//! translates into its own envelope.

pub mod api_keys;
pub mod guard;
pub mod rotation;
pub mod verifications;

pub use api_keys::{ApiKeys, AuthError};
pub use guard::{AbuseGuard, GuardReport, Quarantine};
pub use rotation::{RotationReport, rotate_phone_keys};
pub use verifications::{
    Caller, CheckError, CheckResult, SendCommand, SendError, SendOutcome, Target,
    VerificationService,
};
