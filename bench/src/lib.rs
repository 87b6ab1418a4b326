//! otpd's load benchmark: the driver (`otpd-bench`), its load generator and
//! workloads, the direct store fill, and the helper servers (`hello`,
//! `mock-provider`; `otpd-loaded` and `relay`, which embed otpd, are in
//! `embedded/`).

pub mod fill;
pub mod loadgen;
pub mod procs;
pub mod report;
pub mod stores;
pub mod workloads;
