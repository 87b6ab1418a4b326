//! otpd: a self-hosted one-time-password service.
//!
//! Layers, outermost first: `http` (API surfaces) → `service` (one send or check)
//! → `domain` (pure rules, no I/O) with `store` (persistence) and `sms` (delivery)
//! plugged in behind traits. `startup` wires them from `config`; `commands` is
//! what the `otpd` binary runs (its command line is `cli`).

pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod http;
pub mod metrics;
pub mod rfc3339;
pub mod service;
pub mod sms;
pub mod startup;
pub mod store;
pub mod telemetry;
