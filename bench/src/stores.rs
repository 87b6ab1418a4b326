//! The stores a run covers and how each gets a clean, private place: memory and
//! SQLite always (a file in the run's temporary directory), Redis and PostgreSQL
//! when a server answers (a dedicated Redis database that is flushed, a
//! dedicated PostgreSQL database that is recreated and dropped afterwards).
//! The scaling runs' reference instances get a second such place.

use std::path::Path;

use anyhow::Context;
use sqlx::Connection;

use crate::procs::StoreServer;

pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/13";
pub const DEFAULT_POSTGRES_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Which of a store's two places: the one every run uses, or the second one
/// the scaling runs' reference instance uses beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Main,
    Reference,
}

impl Place {
    /// Its PostgreSQL database, and the statements that create and drop it.
    fn postgres_database(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Place::Main => (
                "otpd_bench",
                "CREATE DATABASE otpd_bench",
                "DROP DATABASE IF EXISTS otpd_bench WITH (FORCE)",
            ),
            Place::Reference => (
                "otpd_bench_reference",
                "CREATE DATABASE otpd_bench_reference",
                "DROP DATABASE IF EXISTS otpd_bench_reference WITH (FORCE)",
            ),
        }
    }
}

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

/// A store ready for a fresh otpd: its `store.url`, and its server's processes.
pub struct PreparedStore {
    pub kind: StoreKind,
    pub url: String,
    pub server: StoreServer,
}

/// The main place's Redis database, or for the reference the next one.
fn redis_url(place: Place) -> String {
    let url = std::env::var("OTPD_BENCH_REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.into());
    if place == Place::Main {
        return url;
    }
    match url.rsplit_once('/') {
        Some((base, db)) if !base.ends_with('/') => match db.parse::<u32>() {
            Ok(db) => format!("{base}/{}", db + 1),
            Err(_) => format!("{url}/1"),
        },
        _ => format!("{url}/1"),
    }
}

fn postgres_admin_url() -> String {
    std::env::var("OTPD_BENCH_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES_ADMIN_URL.into())
}

/// Gives `kind` an empty place; `Err` says why the store is skipped. `label`
/// names the SQLite file.
pub async fn prepare(
    kind: StoreKind,
    place: Place,
    dir: &Path,
    label: &str,
) -> anyhow::Result<PreparedStore> {
    let (url, server) = match kind {
        StoreKind::Memory => ("memory://".to_owned(), StoreServer::Unmeasured),
        StoreKind::Sqlite => {
            let path = dir.join(format!("{label}.db"));
            (
                format!("sqlite://{}", path.display()),
                StoreServer::Unmeasured,
            )
        }
        StoreKind::Redis => {
            let url = redis_url(place);
            let server = flush_redis(&url).await?;
            (url, server)
        }
        StoreKind::Postgres => (recreate_postgres(place).await?, StoreServer::Postgres),
    };
    Ok(PreparedStore { kind, url, server })
}

/// Removes what the run left in shared servers, and waits until it is gone.
pub async fn cleanup(kind: StoreKind, place: Place) {
    match kind {
        StoreKind::Redis => {
            let _ = flush_redis(&redis_url(place)).await;
        }
        StoreKind::Postgres => {
            let _ = drop_postgres(place).await;
        }
        StoreKind::Memory | StoreKind::Sqlite => {}
    }
}

/// Empties both places' Redis databases in the background (`FLUSHDB ASYNC`),
/// for the end of the run. A database that held a scaling run's million
/// verifications keeps redis-server's one thread busy for about 20 s as it
/// empties, which must not land in another store's measurements.
pub async fn empty_redis_later() {
    for place in [Place::Main, Place::Reference] {
        if let Ok(mut conn) = redis_admin(&redis_url(place)).await {
            let _ = redis::cmd("FLUSHDB")
                .arg("ASYNC")
                .query_async::<()>(&mut conn)
                .await;
        }
    }
}

/// A connection for whole-database commands, which may run for seconds on a
/// filled database: the client's default half-second answer timeout would
/// give up on a `FLUSHDB` that goes on in the server.
async fn redis_admin(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url).context("redis url")?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(std::time::Duration::from_secs(3)))
        .set_response_timeout(Some(std::time::Duration::from_secs(300)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .context("redis is not reachable")
}

/// Empties the URL's database; returns redis-server's process when it runs
/// on this machine.
async fn flush_redis(url: &str) -> anyhow::Result<StoreServer> {
    let mut conn = redis_admin(url).await?;
    redis::cmd("FLUSHDB")
        .query_async::<()>(&mut conn)
        .await
        .context("FLUSHDB")?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .context("INFO")?;
    let pid = info
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("redis-server"))
        });
    Ok(pid.map_or(StoreServer::Unmeasured, StoreServer::Redis))
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

async fn recreate_postgres(place: Place) -> anyhow::Result<String> {
    drop_postgres(place).await?;
    let mut conn = admin().await?;
    let (database, create, _) = place.postgres_database();
    sqlx::query(create).execute(&mut conn).await?;
    let admin_url = postgres_admin_url();
    let base = admin_url
        .rsplit_once('/')
        .map(|(b, _)| b)
        .context("postgres url has no database part")?;
    Ok(format!("{base}/{database}"))
}

async fn drop_postgres(place: Place) -> anyhow::Result<()> {
    let mut conn = admin().await?;
    let (_, _, drop) = place.postgres_database();
    sqlx::query(drop).execute(&mut conn).await?;
    Ok(())
}
