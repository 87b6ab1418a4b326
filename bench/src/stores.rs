//! The stores a run covers and how each gets a clean, private place: memory and
//! SQLite always (a file in the run's temporary directory), Redis and PostgreSQL
//! when a server answers (a dedicated Redis database that is flushed, a
//! dedicated PostgreSQL database that is recreated and dropped afterwards).

use std::path::Path;

use anyhow::Context;
use sqlx::Connection;

pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/13";
pub const DEFAULT_POSTGRES_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const POSTGRES_BENCH_DB: &str = "otpd_bench";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Memory,
    Sqlite,
    Redis,
    Postgres,
}

impl StoreKind {
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Memory => "memory",
            StoreKind::Sqlite => "sqlite",
            StoreKind::Redis => "redis",
            StoreKind::Postgres => "postgres",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "memory" => StoreKind::Memory,
            "sqlite" => StoreKind::Sqlite,
            "redis" => StoreKind::Redis,
            "postgres" => StoreKind::Postgres,
            _ => return None,
        })
    }
}

/// A store ready for a fresh otpd: its `store.url`.
pub struct PreparedStore {
    pub kind: StoreKind,
    pub url: String,
}

fn redis_url() -> String {
    std::env::var("OTPD_BENCH_REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.into())
}

fn postgres_admin_url() -> String {
    std::env::var("OTPD_BENCH_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES_ADMIN_URL.into())
}

/// Gives `kind` an empty place; `Err` says why the store is skipped.
pub async fn prepare(kind: StoreKind, dir: &Path, label: &str) -> anyhow::Result<PreparedStore> {
    let url = match kind {
        StoreKind::Memory => "memory://".to_owned(),
        StoreKind::Sqlite => {
            let path = dir.join(format!("{label}.db"));
            format!("sqlite://{}", path.display())
        }
        StoreKind::Redis => {
            let url = redis_url();
            flush_redis(&url).await?;
            url
        }
        StoreKind::Postgres => recreate_postgres().await?,
    };
    Ok(PreparedStore { kind, url })
}

/// Removes what the run left in shared servers.
pub async fn cleanup(kind: StoreKind) {
    match kind {
        StoreKind::Redis => {
            let _ = flush_redis(&redis_url()).await;
        }
        StoreKind::Postgres => {
            let _ = drop_postgres().await;
        }
        StoreKind::Memory | StoreKind::Sqlite => {}
    }
}

async fn flush_redis(url: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(url).context("redis url")?;
    let mut conn = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        client.get_multiplexed_async_connection(),
    )
    .await
    .context("redis did not answer")?
    .context("redis is not reachable")?;
    redis::cmd("FLUSHDB")
        .query_async::<()>(&mut conn)
        .await
        .context("FLUSHDB")?;
    Ok(())
}

async fn admin() -> anyhow::Result<sqlx::PgConnection> {
    let url = postgres_admin_url();
    tokio::time::timeout(
        std::time::Duration::from_secs(3),
        sqlx::PgConnection::connect(&url),
    )
    .await
    .context("postgres did not answer")?
    .context("postgres is not reachable")
}

async fn recreate_postgres() -> anyhow::Result<String> {
    drop_postgres().await?;
    let mut conn = admin().await?;
    sqlx::query("CREATE DATABASE otpd_bench")
        .execute(&mut conn)
        .await?;
    let admin_url = postgres_admin_url();
    let base = admin_url
        .rsplit_once('/')
        .map(|(b, _)| b)
        .context("postgres url has no database part")?;
    Ok(format!("{base}/{POSTGRES_BENCH_DB}"))
}

async fn drop_postgres() -> anyhow::Result<()> {
    let mut conn = admin().await?;
    sqlx::query("DROP DATABASE IF EXISTS otpd_bench WITH (FORCE)")
        .execute(&mut conn)
        .await?;
    Ok(())
}
