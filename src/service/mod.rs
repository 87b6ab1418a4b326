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

/// Runs `work` as a task of its own, in the current span, so that it finishes
/// even when whoever awaits it stops waiting (a client that hangs up, the
/// request deadline): a send or a re-send half done would leave a code
/// pending that nothing recorded. Errs only if the task panicked.
pub async fn to_the_end<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    use tracing::Instrument;
    tokio::spawn(work.in_current_span()).await
}
