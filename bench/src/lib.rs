//! otpd's load benchmark: the driver (`otpd-bench`), its load generator and
//! workloads, and the helper servers (`hello`, `mock-provider`, `otpd-loaded`).

pub mod loadgen;
pub mod procs;
pub mod report;
pub mod stores;
pub mod workloads;
