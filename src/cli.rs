//! The command line: `otpd [serve]`, `keys`, `migrate`, `check-config`, and the
//! global `--print-config`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "otpd",
    version,
    about = "Self-hosted one-time-password service"
)]
pub struct Cli {
    /// Config file (default: ./otpd.toml when present).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Overrides `store.url`.
    #[arg(long, global = true, value_name = "URL")]
    pub store: Option<String>,

    /// Print the effective configuration as TOML, secrets shown as "***", and exit.
    #[arg(long, global = true)]
    pub print_config: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server (the default command).
    Serve {
        /// Overrides `server.listen`.
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        action: KeysCommand,
    },
    /// Apply store migrations and exit.
    Migrate,
    /// Validate the configuration and exit.
    CheckConfig,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; prints only the key on stdout.
    Create {
        #[arg(long)]
        tenant: String,
    },
    /// List keys (never the keys themselves).
    List,
    /// Revoke a key by id.
    Revoke { id: String },
}
