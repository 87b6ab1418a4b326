//! What the `otpd` binary does: parse the command line, set up logging, run
//! the command. Here in the library rather than in `main.rs`, so that the
//! server's code is compiled once, here, and not again into the binary.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use crate::cli::{Cli, Command, GuardCommand, KeysCommand};
use crate::clock::SystemClock;
use crate::config::{Overrides, Settings};
use crate::domain::limits::normalize_prefix;
use crate::service::{AbuseGuard, ApiKeys, rotate_phone_keys};
use crate::startup::{Application, load_crypto, open_store};

/// The `otpd` binary's `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
        .and_then(|runtime| runtime.block_on(run(cli)));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let listen = match &cli.command {
        Some(Command::Serve { listen }) => listen.clone(),
        _ => None,
    };
    let overrides = Overrides {
        listen,
        store_url: cli.store.clone(),
    };
    let settings = Settings::load(cli.config.as_deref(), &overrides)?;
    if cli.print_config {
        print!("{}", settings.to_redacted_toml()?);
        return Ok(());
    }
    crate::telemetry::init(&settings.log);
    for warning in &settings.warnings {
        tracing::warn!("configuration: {warning}");
    }

    match cli.command.unwrap_or(Command::Serve { listen: None }) {
        Command::Serve { .. } => serve(settings).await,
        Command::CheckConfig => {
            println!("configuration is valid");
            Ok(())
        }
        Command::Migrate => {
            open_store(&settings).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Keys { action } => keys(settings, action).await,
        Command::Guard { action } => guard(settings, action).await,
        Command::RotateKeys => rotate_keys(settings).await,
    }
}

async fn guard(settings: Settings, action: GuardCommand) -> anyhow::Result<()> {
    let store = open_store(&settings).await?;
    let crypto = Arc::new(load_crypto(&settings)?);
    let guard = AbuseGuard::new(store.clone(), crypto);
    let now = chrono::Utc::now();
    match action {
        GuardCommand::List { tenant } => {
            let tenants: Vec<String> = match tenant {
                Some(t) => vec![t],
                None => {
                    let mut all: Vec<String> = settings.tenants.keys().cloned().collect();
                    all.extend(store.list_api_keys().await?.into_iter().map(|k| k.tenant));
                    all.sort();
                    all.dedup();
                    all
                }
            };
            for tenant in tenants {
                for q in guard.report(&tenant, now).await?.quarantines {
                    println!(
                        "{tenant}\t{}\t{}\t{}",
                        q.prefix,
                        q.until.to_rfc3339(),
                        q.reason
                    );
                }
            }
        }
        GuardCommand::Lift { tenant, prefix } => {
            let prefix = normalize_prefix(&prefix)
                .context("PREFIX: expected + and 1 to 15 digits, e.g. +256700")?;
            let grace = settings.tenant_policy(&tenant)?.guard.quarantine_seconds;
            let lifted = guard.lift(&tenant, &prefix, grace, "cli", now).await?;
            anyhow::ensure!(
                lifted.is_some(),
                "tenant {tenant} has no quarantine of {prefix}"
            );
            println!("lifted {prefix} for tenant {tenant}");
        }
    }
    Ok(())
}

async fn rotate_keys(settings: Settings) -> anyhow::Result<()> {
    let store = open_store(&settings).await?;
    let crypto = load_crypto(&settings)?;
    let report = rotate_phone_keys(store.as_ref(), &crypto).await?;
    println!(
        "resealed {} numbers with key {}; {} changed meanwhile; {} sealed with a key that is not configured",
        report.resealed,
        crypto.current_phone_key(),
        report.raced,
        report.unreadable
    );
    anyhow::ensure!(
        report.unreadable == 0,
        "some numbers could not be opened: keep their keys configured"
    );
    Ok(())
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    if settings.debug_codes {
        tracing::warn!(
            "debug_codes is on: send answers include the code; never use this in production"
        );
    }
    let app = Application::build(settings).await?;
    app.ensure_first_key().await?;
    app.run_until_stopped().await
}

async fn keys(settings: Settings, action: KeysCommand) -> anyhow::Result<()> {
    let store = open_store(&settings).await?;
    let keys = ApiKeys::new(store, Arc::new(SystemClock), Duration::ZERO);
    match action {
        KeysCommand::Create { tenant } => {
            let tenant = tenant.trim();
            anyhow::ensure!(
                !tenant.is_empty() && tenant.len() <= 64 && !tenant.chars().any(char::is_control),
                "--tenant: must be 1 to 64 characters"
            );
            let (record, key) = keys.create(tenant).await.context("creating the key")?;
            eprintln!("created {} for tenant {}", record.id, record.tenant);
            println!("{}", key.expose());
        }
        KeysCommand::List => {
            for k in keys.list().await? {
                let state = match k.revoked_at {
                    Some(at) => format!("revoked {}", at.to_rfc3339()),
                    None => "active".into(),
                };
                println!(
                    "{}\t{}\t{}\t{}",
                    k.id,
                    k.tenant,
                    k.created_at.to_rfc3339(),
                    state
                );
            }
        }
        KeysCommand::Revoke { id } => {
            anyhow::ensure!(keys.revoke(&id).await?, "no active key with id {id}");
            println!("revoked {id}");
        }
    }
    Ok(())
}
