//! The `otpd` binary: parse the command line, set up logging, dispatch.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use otpd::cli::{Cli, Command, KeysCommand};
use otpd::clock::SystemClock;
use otpd::config::{Overrides, Settings};
use otpd::service::ApiKeys;
use otpd::startup::{Application, open_store};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
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
    otpd::telemetry::init(&settings.log);

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
    }
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
