//! `otpd-bench`: starts the mock provider, the bare hello endpoint and otpd on
//! each store, drives them with the built-in load generator (loopback only,
//! bounded in time), prints the results table with the issue-8 targets and
//! appends it to BENCHMARKS.md. `bench/run.sh` builds everything first.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use otpd_bench::fill;
use otpd_bench::loadgen::{self, RunOptions, RunResult, Workload};
use otpd_bench::procs::{Server, StoreServer, free_port, settle, wait_for_port};
use otpd_bench::report::{self, Machine, Measure, Target, pct};
use otpd_bench::stores::{self, Place, PreparedStore, StoreKind};
use otpd_bench::workloads::{Api, Check, Endpoint, Hello, Issued, Send};

#[derive(Parser, Clone)]
#[command(about = "Load benchmark for otpd (see BENCHMARKS.md)")]
struct Cli {
    /// Seconds each measured scenario runs, after its warm-up.
    #[arg(long, default_value_t = 1.0)]
    duration: f64,
    /// Warm-up seconds before each measurement.
    #[arg(long, default_value_t = 0.3)]
    warmup: f64,
    /// Concurrent keep-alive connections (like `wrk -c`).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Stores to measure; redis and postgres are skipped when unreachable.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "memory,sqlite,redis,postgres"
    )]
    stores: Vec<String>,
    /// Pending verifications for the scaling runs.
    #[arg(long, value_delimiter = ',', default_value = "1000,100000,1000000")]
    levels: Vec<u64>,
    /// Stores with scaling runs (those of `--stores` that were measured).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "memory,sqlite,redis,postgres"
    )]
    scaling_stores: Vec<String>,
    /// Smoke mode: short runs, memory and SQLite, small levels, nothing appended.
    #[arg(long)]
    quick: bool,
    /// Do not append the results to the report file.
    #[arg(long)]
    no_append: bool,
    /// The report file the results are appended to.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Where the release binaries are (default: next to this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Record a CPU profile of the server (`perf record`) during each measured
    /// store scenario and print its top symbols; the data stays in this directory.
    #[arg(long)]
    perf: Option<PathBuf>,
    /// With `--perf`: profile only scenarios whose name contains this (e.g. `check wrong`).
    #[arg(long)]
    perf_only: Option<String>,
    /// Print the config the benchmark gives otpd (on the memory store unless a
    /// store URL follows) and exit: for `bench/callgrind.py`, which runs otpd
    /// as the benchmark does.
    #[arg(long, num_args = 3..=4, value_names = ["LISTEN", "MOCK", "DATA_DIR", "STORE_URL"])]
    print_config: Option<Vec<String>>,
}

/// Number ranges per scenario, so no two sends in one otpd ever share a number.
const NUMBERS_PER_SCENARIO: u64 = 2_000_000;

#[derive(Debug, Clone, Copy)]
struct Features {
    /// `[[routes]]` exists: sends go over the BridgeXAPI client to the mock provider.
    routes: bool,
    /// `[dialects]` exists: the BridgeX-style `/send-otp` and `/verify-otp`.
    dialects: bool,
}

struct Ctx {
    cli: Cli,
    bins: PathBuf,
    dir: PathBuf,
    mock: SocketAddr,
    features: Features,
    measures: Vec<Measure>,
    notes: Vec<String>,
    hello_rps: f64,
    bytes_per_pending: Option<f64>,
    scaling: Vec<ScalingRatio>,
}

/// A scaled store's figure at a level against the same at its smallest level.
struct ScalingRatio {
    /// `<store> <scenario> @<level>`.
    label: String,
    value: f64,
    /// The smallest level's figure it is judged against: the reference
    /// instance's, measured just after it, when there is one.
    base: f64,
    /// The smallest level's figure measured at the start of the scaling runs.
    first: f64,
}

impl Ctx {
    /// Whether `store` got any measurement in this run.
    fn measured(&self, store: &str) -> bool {
        self.measures.iter().any(|m| m.store == store)
    }
}

fn main() -> anyhow::Result<()> {
    let mut cli = Cli::parse();
    if let Some([listen, mock, data, store @ ..]) = cli.print_config.as_deref() {
        let all = Features {
            routes: true,
            dialects: true,
        };
        let store = store.first().map_or("memory://", String::as_str);
        print!(
            "{}",
            otpd_config(listen, store, Path::new(data), mock.parse()?, all)
        );
        return Ok(());
    }
    if cli.quick {
        cli.duration = cli.duration.min(1.0);
        cli.warmup = cli.warmup.min(0.3);
        cli.stores = vec!["memory".into(), "sqlite".into()];
        cli.levels = vec![1_000, 10_000];
        cli.no_append = true;
    }
    // The load generator gets as many threads as the machine has cores, like `wrk -t$(nproc)`.
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?
        .block_on(run(cli))
}

fn opts(cli: &Cli) -> RunOptions {
    RunOptions {
        connections: cli.connections,
        warmup: Duration::from_secs_f64(cli.warmup),
        duration: Duration::from_secs_f64(cli.duration),
        rate: None,
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let machine = Machine::detect();
    let bins = match &cli.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary has no directory")?
            .to_path_buf(),
    };
    for b in ["otpd", "hello", "relay", "mock-provider", "otpd-loaded"] {
        if !bins.join(b).exists() {
            bail!(
                "{} is missing; build with bench/run.sh",
                bins.join(b).display()
            );
        }
    }
    let dir = std::env::temp_dir().join(format!("otpd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!("otpd-bench: logs and data in {}", dir.display());

    let mut mock = Server::start(
        "mock-provider",
        &bins.join("mock-provider"),
        &["127.0.0.1:0"],
        &[],
        &dir,
    )
    .await?;
    let mock_addr: SocketAddr = mock
        .wait_for_line("listening on", Duration::from_secs(10))
        .await?
        .parse()?;

    let features = detect_features(&bins, &dir, mock_addr).await?;
    let mut ctx = Ctx {
        cli: cli.clone(),
        bins,
        dir: dir.clone(),
        mock: mock_addr,
        features,
        measures: Vec::new(),
        notes: Vec::new(),
        hello_rps: 0.0,
        bytes_per_pending: None,
        scaling: Vec::new(),
    };
    if !features.routes {
        ctx.notes.push(
            "This build has no `[[routes]]`: sends went to the built-in sandbox provider, not over HTTP to the mock provider.".into(),
        );
    }
    if !features.dialects {
        ctx.notes.push(
            "This build has no BridgeX-style API: `/send-otp` and `/verify-otp` were not measured."
                .into(),
        );
    }

    measure_hello(&mut ctx).await?;
    measure_floors(&mut ctx).await?;
    for name in cli.stores.clone() {
        let Some(kind) = StoreKind::parse(&name) else {
            bail!("unknown store {name:?} (memory, sqlite, redis, postgres)");
        };
        if let Err(e) = store_scenarios(&mut ctx, kind).await {
            println!("{name}: skipped: {e:#}");
            ctx.notes.push(format!("{name}: skipped: {e:#}"));
        }
        stores::cleanup(kind, Place::Main).await;
    }
    let mut scaled = Vec::new();
    for name in &cli.scaling_stores {
        let Some(kind) = StoreKind::parse(name) else {
            bail!("unknown store {name:?}");
        };
        // Not measured (or skipped as unreachable) above: not scaled either.
        if ctx.measured(name) {
            scaled.push(kind);
        }
    }
    scaling(&mut ctx, &scaled).await;
    if scaled.contains(&StoreKind::Redis) {
        stores::empty_redis_later().await;
    }
    mock.stop().await;
    if ctx
        .measures
        .iter()
        .any(|m| m.store_cpu_us_per_req.is_some())
    {
        ctx.notes.push(
            "Store server CPU: the CPU time of the store's own server while the scenario ran (redis-server's one process; every PostgreSQL process), per answer. It shares the two cores with otpd and the load generator; the memory and SQLite stores run inside otpd, in its own column.".into(),
        );
    }

    let driver = started.elapsed().as_secs();
    ctx.notes.push(match std::env::var("OTPD_BENCH_BUILD_SECONDS").ok().and_then(|s| s.parse::<u64>().ok()) {
        Some(build) => format!(
            "Time: the release build took {}, this driver {}; {} in all (a fresh clone builds from scratch).",
            minutes(build), minutes(driver), minutes(build + driver)
        ),
        None => format!("Time: this driver took {}.", minutes(driver)),
    });
    let targets = judge(&ctx);
    let command = if cli.quick {
        "bench/run.sh --quick".to_owned()
    } else {
        "bench/run.sh".to_owned()
    };
    let command = format!(
        "{command}` ({} connections; each scenario {} s measured after {} s of warm-up",
        cli.connections, cli.duration, cli.warmup
    );
    let text = report::render(
        &machine,
        &command,
        ctx.hello_rps,
        &ctx.measures,
        &targets,
        &ctx.notes,
    );
    println!("\n{text}");
    if !cli.no_append {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cli.out)
            .with_context(|| format!("opening {}", cli.out.display()))?;
        f.write_all(text.as_bytes())?;
        println!("appended to {}", cli.out.display());
    }
    if ctx
        .notes
        .iter()
        .any(|n| n.contains("skipped") || n.contains("failed"))
    {
        println!(
            "kept logs and data for the failures above in {}",
            dir.display()
        );
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// Which optional parts this otpd build has, by asking `otpd check-config`.
async fn detect_features(bins: &Path, dir: &Path, mock: SocketAddr) -> anyhow::Result<Features> {
    let candidates = [
        Features {
            routes: true,
            dialects: true,
        },
        Features {
            routes: true,
            dialects: false,
        },
        Features {
            routes: false,
            dialects: true,
        },
        Features {
            routes: false,
            dialects: false,
        },
    ];
    for f in candidates {
        let path = dir.join("check.toml");
        std::fs::write(
            &path,
            otpd_config("127.0.0.1:1", "memory://", &dir.join("data"), mock, f),
        )?;
        let out = tokio::process::Command::new(bins.join("otpd"))
            .arg("--config")
            .arg(&path)
            .arg("check-config")
            .output()
            .await?;
        if out.status.success() {
            return Ok(f);
        }
    }
    bail!("otpd rejects even the plain bench configuration; run `otpd check-config` on it")
}

fn otpd_config(
    listen: &str,
    store_url: &str,
    data_dir: &Path,
    mock: SocketAddr,
    f: Features,
) -> String {
    let mut s = format!(
        r#"# Written by otpd-bench.
data_dir = "{data}"
debug_codes = true

[server]
listen = "{listen}"

[store]
url = "{store_url}"

[secrets]
master_key = "otpd-bench master key, not a secret"

[log]
level = "info"

[policy]
ttl_seconds = 3600
max_ttl_seconds = 3600
max_attempts = 100
# One client address sends to ~100k distinct numbers and guesses wrong several
# times per verification: the abuse limits and the pumping guard stay on (their
# counting is part of every send and check), set so that they never refuse.
max_sends_per_ip_10min = 1000000000
max_wrong_guesses_per_hour = 1000000000

[policy.guard]
min_conversion = 0.0
"#,
        data = data_dir.display()
    );
    if f.dialects {
        s.push_str(&format!(
            r#"
[dialects.bridgex]
default_route_id = 1
bridgexapi_base_url = "http://{mock}"

[dialects.bridgex.policy]
ttl_seconds = 3600
max_attempts = 100
"#
        ));
    }
    if f.routes {
        s.push_str(&format!(
            r#"
[[routes]]
id = 1
provider = "bridgexapi"
base_url = "http://{mock}"
api_key = "otpd-bench"
provider_route_id = 3
caller_id = "BRIDGEXAPI"
"#
        ));
    }
    s
}

struct Running {
    server: Server,
    addr: SocketAddr,
    endpoint: Endpoint,
    control: Option<SocketAddr>,
    /// The store's own server, when it runs apart from otpd.
    store: StoreServer,
}

/// Starts `otpd serve` (or `otpd-loaded`) on `store` with its own config,
/// `extra` appended to it.
async fn start_otpd(
    ctx: &Ctx,
    label: &str,
    store: &PreparedStore,
    loaded: bool,
    extra: &str,
) -> anyhow::Result<Running> {
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let data = ctx.dir.join(format!("{label}-data"));
    let config = ctx.dir.join(format!("{label}.toml"));
    let mut text = otpd_config(&listen, &store.url, &data, ctx.mock, ctx.features);
    text.push_str(extra);
    std::fs::write(&config, text)?;
    let config_arg = config.display().to_string();
    let mut server = if loaded {
        Server::start(
            label,
            &ctx.bins.join("otpd-loaded"),
            &["--config", &config_arg],
            &[],
            &ctx.dir,
        )
        .await?
    } else {
        Server::start(
            label,
            &ctx.bins.join("otpd"),
            &["--config", &config_arg, "serve"],
            &[],
            &ctx.dir,
        )
        .await?
    };
    let key = server
        .wait_for_line("API key:", Duration::from_secs(60))
        .await?;
    let control = if loaded {
        Some(
            server
                .wait_for_line("control on", Duration::from_secs(10))
                .await?
                .parse()?,
        )
    } else {
        None
    };
    let addr: SocketAddr = listen.parse()?;
    wait_for_port(addr, Duration::from_secs(30)).await?;
    Ok(Running {
        server,
        addr,
        endpoint: Endpoint { host: listen, key },
        control,
        store: store.server,
    })
}

/// Runs one workload and records it.
#[allow(clippy::too_many_arguments)]
async fn measure<W: Workload>(
    ctx: &mut Ctx,
    running: &Running,
    store: &str,
    scenario: &str,
    api: &str,
    workload: Arc<W>,
    options: &RunOptions,
    expected: &[u16],
) -> anyhow::Result<RunResult> {
    let cpu_before = running.server.cpu_time().ok();
    let store_cpu_before = running.store.cpu_time();
    let disk_before = running.server.disk_write_bytes().ok();
    let profile = match (&ctx.cli.perf, running.server.pid()) {
        (Some(dir), Some(pid))
            if store != "-"
                && ctx
                    .cli
                    .perf_only
                    .as_deref()
                    .is_none_or(|o| scenario.contains(o)) =>
        {
            Some(start_perf(dir, pid, store, scenario, api, options)?)
        }
        _ => None,
    };
    let result = loadgen::run(running.addr, workload, options).await?;
    if let Some((child, data)) = profile {
        finish_perf(child, &data).await;
    }
    let per_answer = |d: Duration| d.as_secs_f64() * 1e6 / result.answered as f64;
    let cpu = cpu_before
        .zip(running.server.cpu_time().ok())
        .filter(|_| result.answered > 0)
        .map(|(a, b)| per_answer(b.saturating_sub(a)));
    let store_cpu = store_cpu_before
        .zip(running.store.cpu_time())
        .filter(|_| result.answered > 0)
        .map(|(a, b)| per_answer(b.saturating_sub(a)));
    let disk = disk_before
        .zip(running.server.disk_write_bytes().ok())
        .filter(|_| result.answered > 0)
        .map(|(a, b)| b.saturating_sub(a) as f64 / 1024.0 / result.answered as f64);
    let ok_share = result.share_of(expected);
    let mut note = String::new();
    if ok_share < 0.99 {
        note = format!("answers: {}", result.status_summary());
    }
    if result.io_errors > 0 {
        note.push_str(&format!(" {} reconnects", result.io_errors));
    }
    if result.exhausted && result.elapsed < Duration::from_millis(500) {
        note.push_str(" short run (codes ran out)");
    }
    if let Some(rate) = options.rate {
        note.push_str(&format!("paced at {rate:.0}/s"));
    }
    let m = Measure {
        store: store.into(),
        scenario: scenario.into(),
        api: api.into(),
        rps: result.rps(),
        p50_us: result.latency.percentile(50.0),
        p99_us: result.latency.percentile(99.0),
        ok_share,
        cpu_us_per_req: cpu,
        store_cpu_us_per_req: store_cpu,
        disk_kib_per_req: disk,
        note: note.trim().to_owned(),
    };
    println!(
        "{:<9} {:<22} {:<8} {:>9.0} req/s  p50 {} ms  p99 {} ms  ok {}  CPU {} + {} µs/req  disk {} KiB/req  {}",
        m.store,
        m.scenario,
        m.api,
        m.rps,
        report::ms(m.p50_us),
        report::ms(m.p99_us),
        pct(ok_share),
        report::per_answer(m.cpu_us_per_req),
        report::per_answer(m.store_cpu_us_per_req),
        report::per_answer(m.disk_kib_per_req),
        m.note
    );
    ctx.measures.push(m);
    Ok(result)
}

/// Starts `perf record` on the server for the measured part of a run.
fn start_perf(
    dir: &Path,
    pid: u32,
    store: &str,
    scenario: &str,
    api: &str,
    options: &RunOptions,
) -> anyhow::Result<(tokio::process::Child, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let data = dir.join(format!("{store}-{scenario}-{api}.perf.data").replace(' ', "-"));
    let secs = (options.warmup + options.duration).as_secs_f64();
    let child = tokio::process::Command::new("perf")
        .args(["record", "-q", "-F", "999", "-g", "-p"])
        .arg(pid.to_string())
        .arg("-o")
        .arg(&data)
        .args(["--", "sleep"])
        .arg(format!("{secs:.1}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting perf (apt-get install linux-perf)")?;
    Ok((child, data))
}

/// Waits for `perf record` and writes the flat profile next to its data.
async fn finish_perf(mut child: tokio::process::Child, data: &Path) {
    let _ = child.wait().await;
    let out = tokio::process::Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--sort",
            "symbol",
            "--percent-limit",
            "0.7",
            "-g",
            "none",
            "-i",
        ])
        .arg(data)
        .output()
        .await;
    if let Ok(out) = out {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let _ = std::fs::write(data.with_extension("txt"), &text);
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .take(25)
        {
            println!("    {line}");
        }
    }
}

/// Starts one of the benchmark's bare servers (`hello`, `relay`).
async fn start_bare(ctx: &Ctx, name: &str, args: &[&str]) -> anyhow::Result<Running> {
    let mut server = Server::start(name, &ctx.bins.join(name), args, &[], &ctx.dir).await?;
    let addr: SocketAddr = server
        .wait_for_line("listening on", Duration::from_secs(10))
        .await?
        .parse()?;
    Ok(Running {
        server,
        addr,
        endpoint: Endpoint {
            host: addr.to_string(),
            key: String::new(),
        },
        control: None,
        store: StoreServer::Unmeasured,
    })
}

async fn measure_hello(ctx: &mut Ctx) -> anyhow::Result<()> {
    let running = start_bare(ctx, "hello", &["127.0.0.1:0"]).await?;
    let o = opts(&ctx.cli);
    let hello = Arc::new(Hello {
        host: running.endpoint.host.clone(),
    });
    let r = measure(ctx, &running, "-", "hello", "-", hello, &o, &[200]).await?;
    ctx.hello_rps = r.rps();
    if let Some(wrk_rps) = wrk_hello(running.addr, &ctx.cli).await {
        ctx.notes.push(format!(
            "Cross-check: `wrk -t{t} -c{c}` on the same hello endpoint did {wrk_rps:.0} req/s ({} of the built-in generator's figure).",
            pct(wrk_rps / ctx.hello_rps.max(1.0)),
            t = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            c = ctx.cli.connections,
        ));
    }
    running.server.stop().await;
    Ok(())
}

/// The floors of `bin/relay.rs`: sends through otpd's provider call alone,
/// and (when Redis is measured) one Redis script round trip per request.
async fn measure_floors(ctx: &mut Ctx) -> anyhow::Result<()> {
    let mock = ctx.mock.to_string();
    let provider = ["provider", "127.0.0.1:0", &mock];
    measure_floor(ctx, "relay send", &provider, StoreServer::Unmeasured).await?;
    ctx.notes.push(
        "Relay send: `POST /v1/verifications` to a bare server that makes otpd's BridgeXAPI call (otpd's HTTP client and provider code) to the mock provider and nothing else: no store, guard, code or log line. A send through otpd costs at least this.".into(),
    );
    if ctx.cli.stores.iter().any(|s| s == "redis") {
        let redis = match stores::prepare(StoreKind::Redis, Place::Main, &ctx.dir, "relay").await {
            Ok(redis) => redis,
            Err(e) => {
                println!("relay redis: skipped: {e:#}");
                return Ok(());
            }
        };
        let args = ["redis", "127.0.0.1:0", &redis.url];
        let measured = measure_floor(ctx, "relay redis", &args, redis.server).await;
        stores::cleanup(StoreKind::Redis, Place::Main).await;
        measured?;
        ctx.notes.push(
            "Relay Redis: the same bare server making one Redis script round trip per request (a counter in a hash; otpd's connection setup), as a wrong check by id makes: a Redis check costs at least this.".into(),
        );
    }
    Ok(())
}

async fn measure_floor(
    ctx: &mut Ctx,
    scenario: &str,
    args: &[&str],
    store: StoreServer,
) -> anyhow::Result<()> {
    let running = Running {
        store,
        ..start_bare(ctx, "relay", args).await?
    };
    let o = opts(&ctx.cli);
    let sends = Arc::new(Send::new(running.endpoint.clone(), Api::Native, 0, false));
    let measured = measure(ctx, &running, "-", scenario, "native", sends, &o, &[201]).await;
    running.server.stop().await;
    measured.map(drop)
}

/// `wrk` on the hello endpoint, when installed, to show the generator is not the bottleneck.
async fn wrk_hello(addr: SocketAddr, cli: &Cli) -> Option<f64> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let secs = (cli.duration + cli.warmup).ceil().max(1.0) as u64;
    let out = tokio::process::Command::new("wrk")
        .arg(format!("-t{threads}"))
        .arg(format!("-c{}", cli.connections))
        .arg(format!("-d{secs}s"))
        .arg(format!("http://{addr}/"))
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
}

async fn store_scenarios(ctx: &mut Ctx, kind: StoreKind) -> anyhow::Result<()> {
    let name = kind.name();
    let prepared = stores::prepare(kind, Place::Main, &ctx.dir, name).await?;
    let running = start_otpd(ctx, name, &prepared, false, "").await?;
    let result = store_scenarios_on(ctx, kind, &running).await;
    running.server.stop().await;
    result
}

async fn store_scenarios_on(
    ctx: &mut Ctx,
    kind: StoreKind,
    running: &Running,
) -> anyhow::Result<()> {
    let name = kind.name();
    let o = opts(&ctx.cli);
    let ep = running.endpoint.clone();
    let bridgex = ctx
        .features
        .dialects
        .then_some(Api::Bridgex { route_id: 1 });

    // Sends, keeping every code for the checks below.
    let send = Arc::new(Send::new(ep.clone(), Api::Native, 0, true));
    let r_send = measure(
        ctx,
        running,
        name,
        "send",
        "native",
        send.clone(),
        &o,
        &[201],
    )
    .await?;
    let native_issued = Arc::new(send.supply.take());
    let mut bx_issued = Arc::new(Vec::<Issued>::new());
    if let Some(api) = bridgex {
        let send = Arc::new(Send::new(ep.clone(), api, NUMBERS_PER_SCENARIO, true));
        measure(
            ctx,
            running,
            name,
            "send",
            "bridgex",
            send.clone(),
            &o,
            &[200],
        )
        .await?;
        bx_issued = Arc::new(send.supply.take());
    }

    // Wrong codes spread over what was sent: each verification takes a few,
    // far below `max_attempts` (100), so all stay pending for the right codes.
    let wrong = Arc::new(Check::new(
        ep.clone(),
        Api::Native,
        native_issued.clone(),
        false,
    ));
    let r_wrong = measure(
        ctx,
        running,
        name,
        "check wrong",
        "native",
        wrong,
        &o,
        &[200],
    )
    .await?;
    if let Some(api) = bridgex {
        let wrong = Arc::new(Check::new(ep.clone(), api, bx_issued.clone(), false));
        measure(
            ctx,
            running,
            name,
            "check wrong",
            "bridgex",
            wrong,
            &o,
            &[400],
        )
        .await?;
    }

    // Latency at half of each peak.
    let paced = |rps: f64| RunOptions {
        rate: Some((rps / 2.0).max(1.0)),
        ..o.clone()
    };
    let wrong = Arc::new(Check::new(
        ep.clone(),
        Api::Native,
        native_issued.clone(),
        false,
    ));
    measure(
        ctx,
        running,
        name,
        "latency check",
        "native",
        wrong,
        &paced(r_wrong.rps()),
        &[200],
    )
    .await?;
    let send = Arc::new(Send::new(
        ep.clone(),
        Api::Native,
        2 * NUMBERS_PER_SCENARIO,
        false,
    ));
    measure(
        ctx,
        running,
        name,
        "latency send",
        "native",
        send,
        &paced(r_send.rps()),
        &[201],
    )
    .await?;

    // Right codes, each once, until they run out (or the measured time ends).
    // The server is warm by now, and a warm-up would only use up codes. Each
    // right check needs a send, so when the sends above left fewer codes than
    // the measured time of checks takes, more are sent first (unmeasured).
    let right_opts = RunOptions {
        warmup: Duration::ZERO,
        ..o.clone()
    };
    let wanted = (r_wrong.rps() * right_opts.duration.as_secs_f64()) as usize;
    let mut native_right = native_issued.to_vec();
    if native_right.len() < wanted {
        let more = issue(
            running,
            3 * NUMBERS_PER_SCENARIO,
            (wanted - native_right.len()) as u64,
            TOP_UP_LIMIT,
            ctx.cli.connections,
        )
        .await?;
        native_right.extend(more);
    }
    let right = Arc::new(Check::new(
        ep.clone(),
        Api::Native,
        Arc::new(native_right),
        true,
    ));
    measure(
        ctx,
        running,
        name,
        "check right",
        "native",
        right,
        &right_opts,
        &[200],
    )
    .await?;
    if let Some(api) = bridgex {
        let mut bx_right = bx_issued.to_vec();
        if bx_right.len() < wanted {
            let more = issue_with(
                running,
                api,
                4 * NUMBERS_PER_SCENARIO,
                (wanted - bx_right.len()) as u64,
                TOP_UP_LIMIT,
                ctx.cli.connections,
            )
            .await?;
            bx_right.extend(more);
        }
        let right = Arc::new(Check::new(ep.clone(), api, Arc::new(bx_right), true));
        measure(
            ctx,
            running,
            name,
            "check right",
            "bridgex",
            right,
            &right_opts,
            &[200],
        )
        .await?;
    }
    Ok(())
}

/// Longest the unmeasured sends before the right-code checks may take.
const TOP_UP_LIMIT: Duration = Duration::from_secs(120);

/// Sends `count` verifications (unmeasured, for at most `within`) and returns
/// them with their codes.
async fn issue(
    running: &Running,
    first: u64,
    count: u64,
    within: Duration,
    connections: usize,
) -> anyhow::Result<Vec<Issued>> {
    issue_with(running, Api::Native, first, count, within, connections).await
}

async fn issue_with(
    running: &Running,
    api: Api,
    first: u64,
    count: u64,
    within: Duration,
    connections: usize,
) -> anyhow::Result<Vec<Issued>> {
    let send = Arc::new(Send::new(running.endpoint.clone(), api, first, true).limited(count));
    let o = RunOptions {
        connections,
        warmup: Duration::ZERO,
        duration: within,
        rate: None,
    };
    loadgen::run(running.addr, send.clone(), &o).await?;
    Ok(send.supply.take())
}

async fn prefill(control: SocketAddr, count: u64) -> anyhow::Result<()> {
    let req = format!(
        "POST /prefill?count={count} HTTP/1.1\r\nhost: {control}\r\ncontent-length: 0\r\n\r\n"
    );
    let (status, body) = loadgen::request_once(control, &req, Duration::from_secs(900))
        .await
        .context("prefill")?;
    if status != 200 {
        bail!("prefill answered {status}: {body}");
    }
    Ok(())
}

/// How a scaling run adds pending verifications.
enum Filler {
    /// `otpd-loaded`'s control port: in-process, through the service's send path.
    Service(SocketAddr),
    /// Straight into the backend, server-side.
    Direct(fill::Direct),
}

/// One store's scaling run: its otpd, how it grows, and its first level's figures.
struct Scaled {
    kind: StoreKind,
    place: Place,
    running: Running,
    filler: Filler,
    /// Check and send req/s at the first level.
    base: Option<(f64, f64)>,
    /// A second otpd on a second place of the same store, filled to the first
    /// level only and measured right after the largest level: the ratio the
    /// target judges compares two figures taken seconds apart, where the first
    /// level's were taken minutes earlier (this machine drifts by a third).
    reference: Option<Box<Scaled>>,
}

/// Verifications each level's wrong-code checks cycle over: sent through the
/// API just before (codes are checked soon after they are sent, so the live
/// traffic meets recent records among the old ones). At most this many, or as
/// many as the store takes in `WORKING_SET_TIME`.
const WORKING_SET: u64 = 5_000;
const WORKING_SET_TIME: Duration = Duration::from_millis(1500);
/// A scaling run's otpd polls delivery reports only hourly: its polling after
/// each send scenario would land in whatever is measured next (its own next
/// level, another store's, or the reference it is compared with).
const SCALING_CONFIG: &str = "\n[dlr]\npoll_interval_seconds = 3600\n";
/// The longest wait for the machine to go quiet before a store's level.
const BETWEEN_STORES: Duration = Duration::from_secs(10);

/// Throughput with 1k, 100k and 1M pending verifications on every store, and
/// (memory store) memory per pending verification. Level by level, every store
/// is filled at once and then each is measured alone: each fill works in its
/// own process (`otpd-loaded`, redis-server, postgres, SQLite's thread), so the
/// fills share the cores instead of queuing.
async fn scaling(ctx: &mut Ctx, kinds: &[StoreKind]) {
    let mut scaled = Vec::new();
    let mut described = Vec::new();
    for &kind in kinds {
        match start_scaled(ctx, kind, Place::Main).await {
            Ok(mut s) => {
                match start_scaled(ctx, kind, Place::Reference).await {
                    Ok(r) => s.reference = Some(Box::new(r)),
                    Err(e) => reference_failed(ctx, kind, &e),
                }
                scaled.push(s);
            }
            Err(e) => scaling_failed(ctx, kind, &e),
        }
    }
    let mut levels = ctx.cli.levels.clone();
    levels.sort_unstable();
    levels.dedup();
    let mut filled = 0u64;
    let mut largest_step = 0u64;
    for (i, &level) in levels.iter().enumerate() {
        // Distinct numbers per level.
        let numbers = (10 + i as u64) * NUMBERS_PER_SCENARIO;
        let add = level.saturating_sub(filled);
        let grown = futures::future::join_all(scaled.iter().map(|s| async move {
            // The reference instance is filled with the first level only.
            let reference = match (&s.reference, i) {
                (Some(r), 0) => Some(grow(r, level, 0, add).await),
                _ => None,
            };
            (grow(s, level, filled, add).await, reference)
        }))
        .await;
        filled = level;
        let waited = settle(Duration::from_secs(20)).await;
        if waited > Duration::from_secs(1) {
            println!(
                "waited {:.1} s for the machine to settle after the fills",
                waited.as_secs_f64()
            );
        }
        let mut grew = Vec::new();
        for (mut s, (growth, reference)) in scaled.into_iter().zip(grown) {
            if let Some(Err(e)) = reference {
                reference_failed(ctx, s.kind, &e);
                if let Some(r) = s.reference.take() {
                    finish_scaled(*r).await;
                }
            }
            match growth {
                Ok(bytes_per_pending) => {
                    if let Some(bytes) = bytes_per_pending
                        && add >= largest_step
                    {
                        ctx.bytes_per_pending = Some(bytes);
                    }
                    grew.push(s);
                }
                Err(e) => {
                    scaling_failed(ctx, s.kind, &e);
                    finish_scaled(s).await;
                }
            }
        }
        largest_step = largest_step.max(add);
        let label = level_label(level);
        let last = i > 0 && i + 1 == levels.len();
        scaled = Vec::new();
        for mut s in grew {
            // What the fills or the last store's scenarios left behind (a
            // checkpoint, dirty pages) ends before this store is measured.
            settle(BETWEEN_STORES).await;
            let (check, send) = match measure_level(ctx, &s, &label, numbers).await {
                Ok(figures) => figures,
                // A store that failed a level is not compared at the next ones.
                Err(e) => {
                    scaling_failed(ctx, s.kind, &e);
                    finish_scaled(s).await;
                    continue;
                }
            };
            let Some((first_check, first_send)) = s.base else {
                s.base = Some((check, send));
                scaled.push(s);
                continue;
            };
            let name = s.kind.name();
            let mut base = (first_check, first_send);
            let mut best = (check, send);
            if last {
                described.push(Described::of(&s));
                if let Some(r) = s.reference.take() {
                    let reference = compare_with_reference(ctx, &s, &r, &levels).await;
                    finish_scaled(*r).await;
                    match reference {
                        Ok((scaled_again, at_reference)) => {
                            best = best_of(best, scaled_again);
                            base = at_reference;
                        }
                        Err(e) => reference_failed(ctx, s.kind, &e),
                    }
                }
                finish_scaled(s).await;
            } else {
                scaled.push(s);
            }
            ctx.scaling.push(ScalingRatio {
                label: format!("{name} check @{label}"),
                value: best.0,
                base: base.0,
                first: first_check,
            });
            ctx.scaling.push(ScalingRatio {
                label: format!("{name} send @{label}"),
                value: best.1,
                base: base.1,
                first: first_send,
            });
        }
    }
    described.extend(scaled.iter().map(Described::of));
    for s in scaled {
        finish_scaled(s).await;
    }
    let (service, direct): (Vec<Described>, Vec<Described>) =
        described.into_iter().partition(|d| d.in_process);
    ctx.notes.push(format!(
        "Scaling (every store): at each level the wrong-code checks cycle over a fresh working set sent through the API just before ({WORKING_SET} verifications, or as many as the store takes in {:.1} s), as live traffic checks codes soon after sending them; the level also holds what earlier working sets and send runs added.",
        WORKING_SET_TIME.as_secs_f64()
    ));
    ctx.notes.push(format!(
        "Scaling, the target's ratio: beside each store's scaled otpd ran a second one on a second place of the same store (a second SQLite file, Redis database or PostgreSQL database; for memory, a second process), filled to the smallest level only. Right after the largest level's scenarios, the same scenarios ran in turns: on the reference, on the scaled otpd again, on the reference again (rows `@{first} (reference)`, `@{last}, again`, `@{first} (reference), again`), and the target compares the best of each side: figures taken seconds apart, where this machine moved a scenario by up to a third between its smallest-level measurement and the largest's. The ratio against the smallest level measured first is shown beside it. Scaling otpds poll delivery reports only hourly, so that one's polling does not land in the next one's figures.",
        first = level_label(levels.first().copied().unwrap_or_default()),
        last = level_label(levels.last().copied().unwrap_or_default()),
    ));
    for s in service {
        ctx.notes.push(format!(
            "Scaling and memory ({}): `otpd-loaded` (otpd's Application plus a bulk loader) filled the store through the service's send path, delivered by an in-process provider that answers like a real one (so each pending verification also has its delivery record awaiting a report, its indexes and its number's abuse counters, and no sandbox inbox entry). Bytes per pending verification = growth of the process's RSS across the largest fill ÷ verifications added.",
            s.kind.name()
        ));
    }
    if !direct.is_empty() {
        let names: Vec<&str> = direct.iter().map(|s| s.kind.name()).collect();
        ctx.notes.push(format!(
            "Scaling ({}): before each level the driver wrote the missing pending verifications straight into the backend (`bench/src/fill.rs`: SQL in one transaction, or pipelined Redis commands), in the store's layout: each with its subject state and one delivered SMS record; the backend's count was checked and otpd read one back through the API.",
            names.join(", ")
        ));
    }
}

/// What the report says of a scaled store once its otpd has stopped.
struct Described {
    kind: StoreKind,
    /// Filled inside otpd (`otpd-loaded`) rather than straight into the backend.
    in_process: bool,
}

impl Described {
    fn of(s: &Scaled) -> Self {
        Self {
            kind: s.kind,
            in_process: matches!(s.filler, Filler::Service(_)),
        }
    }
}

/// Without its reference, a store's largest level is judged against its
/// smallest level as measured first.
fn reference_failed(ctx: &mut Ctx, kind: StoreKind, e: &anyhow::Error) {
    println!("{} scaling reference: failed: {e:#}", kind.name());
    ctx.notes.push(format!(
        "{} scaling reference: failed ({e:#}); its ratio is against the smallest level as measured first",
        kind.name()
    ));
}

fn scaling_failed(ctx: &mut Ctx, kind: StoreKind, e: &anyhow::Error) {
    println!("{} scaling: failed: {e:#}", kind.name());
    ctx.notes
        .push(format!("{} scaling: failed: {e:#}", kind.name()));
}

async fn start_scaled(ctx: &Ctx, kind: StoreKind, place: Place) -> anyhow::Result<Scaled> {
    let label = match place {
        Place::Main => format!("{}-scaling", kind.name()),
        Place::Reference => format!("{}-reference", kind.name()),
    };
    let prepared = stores::prepare(kind, place, &ctx.dir, &label).await?;
    let in_process = kind == StoreKind::Memory;
    let running = start_otpd(ctx, &label, &prepared, in_process, SCALING_CONFIG).await?;
    let filler = if in_process {
        Filler::Service(running.control.context("no control port")?)
    } else {
        Filler::Direct(fill::Direct::new(kind, &prepared.url)?)
    };
    Ok(Scaled {
        kind,
        place,
        running,
        filler,
        base: None,
        reference: None,
    })
}

/// Stops a scaled store's otpd (and its reference's) and removes its data; a
/// scaled Redis database is emptied at the end of the run
/// (`stores::empty_redis_later`).
async fn finish_scaled(s: Scaled) {
    if let Some(r) = s.reference {
        Box::pin(finish_scaled(*r)).await;
    }
    s.running.server.stop().await;
    if s.kind != StoreKind::Redis {
        stores::cleanup(s.kind, s.place).await;
    }
}

/// Adds `add` pending verifications to a store that holds `filled`; for the
/// memory store, returns the process's growth per verification added.
async fn grow(s: &Scaled, level: u64, filled: u64, add: u64) -> anyhow::Result<Option<f64>> {
    if add == 0 {
        return Ok(None);
    }
    let name = s.kind.name();
    let started = std::time::Instant::now();
    match &s.filler {
        Filler::Service(control) => {
            let before = s.running.server.rss_bytes()?;
            prefill(*control, add).await?;
            let after = s.running.server.rss_bytes()?;
            println!(
                "{name}: prefilled {add} pending in {:.1} s (RSS {:.0} → {:.0} MiB)",
                started.elapsed().as_secs_f64(),
                before as f64 / 1048576.0,
                after as f64 / 1048576.0
            );
            Ok(Some(after.saturating_sub(before) as f64 / add as f64))
        }
        Filler::Direct(direct) => {
            let sample = direct.fill(filled, add).await?;
            let took = started.elapsed().as_secs_f64();
            let pending = direct.count_pending().await?;
            // At least what was filled, plus what earlier levels sent.
            if pending < level {
                bail!("filled {level} in all, but the store counts {pending} pending");
            }
            read_back(&s.running, &sample).await?;
            println!(
                "{name}: filled {add} pending in {took:.1} s; the store counts {pending} pending; otpd reads them"
            );
            Ok(None)
        }
    }
}

/// The largest level against the reference, in alternating rounds: the
/// reference, the scaled otpd again, the reference again (the scaled otpd's
/// first round is its level's own). Returns the best check and send of the
/// scaled otpd's second round and of the reference's two: the machine's
/// slowdowns come and go within seconds, and a best of two on each side, taken
/// in turns, is what either store can do then.
async fn compare_with_reference(
    ctx: &mut Ctx,
    scaled: &Scaled,
    reference: &Scaled,
    levels: &[u64],
) -> anyhow::Result<((f64, f64), (f64, f64))> {
    let (Some(&smallest), Some(&largest)) = (levels.first(), levels.last()) else {
        bail!("no levels");
    };
    let smallest = format!("{} (reference)", level_label(smallest));
    // Numbers past every level's, one range per round.
    let numbers = |round: usize| (10 + levels.len() + round) as u64 * NUMBERS_PER_SCENARIO;
    settle(BETWEEN_STORES).await;
    let first = measure_level(ctx, reference, &smallest, numbers(0)).await?;
    settle(BETWEEN_STORES).await;
    let largest = format!("{}, again", level_label(largest));
    let again = measure_level(ctx, scaled, &largest, numbers(1)).await?;
    settle(BETWEEN_STORES).await;
    let second = measure_level(ctx, reference, &format!("{smallest}, again"), numbers(2)).await?;
    Ok((again, best_of(first, second)))
}

fn best_of(a: (f64, f64), b: (f64, f64)) -> (f64, f64) {
    (a.0.max(b.0), a.1.max(b.1))
}

/// A fresh working set, wrong-code checks over it, then sends; numbers from `numbers` on.
async fn measure_level(
    ctx: &mut Ctx,
    s: &Scaled,
    label: &str,
    numbers: u64,
) -> anyhow::Result<(f64, f64)> {
    let o = opts(&ctx.cli);
    let name = s.kind.name();
    let pool = issue(
        &s.running,
        numbers,
        WORKING_SET,
        WORKING_SET_TIME,
        ctx.cli.connections,
    )
    .await?;
    let wrong = Arc::new(Check::new(
        s.running.endpoint.clone(),
        Api::Native,
        Arc::new(pool),
        false,
    ));
    let rc = measure(
        ctx,
        &s.running,
        name,
        &format!("check wrong @{label}"),
        "native",
        wrong,
        &o,
        &[200],
    )
    .await?;
    let send = Arc::new(Send::new(
        s.running.endpoint.clone(),
        Api::Native,
        numbers + WORKING_SET,
        false,
    ));
    let rs = measure(
        ctx,
        &s.running,
        name,
        &format!("send @{label}"),
        "native",
        send,
        &o,
        &[201],
    )
    .await?;
    Ok((rc.rps(), rs.rps()))
}

/// Reads a filled verification through otpd's API: proves the fill wrote what
/// the store decodes, as a pending verification of the bench's tenant.
async fn read_back(running: &Running, id: &str) -> anyhow::Result<()> {
    let req = format!(
        "GET /v1/verifications/{id} HTTP/1.1\r\nhost: {}\r\nx-api-key: {}\r\n\r\n",
        running.endpoint.host, running.endpoint.key
    );
    let (status, body) = loadgen::request_once(running.addr, &req, Duration::from_secs(10))
        .await
        .context("reading a filled verification")?;
    if status != 200 || !body.contains(r#""status":"pending""#) {
        bail!("otpd does not read the filled verification {id} as pending: {status} {body}");
    }
    Ok(())
}

/// The worst 1M/1k ratio of each store (check or send); met only when every
/// store of the run was scaled and each held up.
fn scaling_target(ctx: &Ctx) -> Target {
    // Each store's worst ratio: (store, ratio, what it was).
    let mut per_store: Vec<(&str, f64, &ScalingRatio)> = Vec::new();
    for r in ctx.scaling.iter().filter(|r| r.label.ends_with("@1M")) {
        let Some((store, _)) = r.label.split_once(' ') else {
            continue;
        };
        let ratio = r.value / r.base.max(1.0);
        match per_store.iter_mut().find(|(s, _, _)| *s == store) {
            Some(worst) if ratio < worst.1 => *worst = (store, ratio, r),
            Some(_) => {}
            None => per_store.push((store, ratio, r)),
        }
    }
    let unscaled: Vec<&str> = ctx
        .cli
        .stores
        .iter()
        .map(String::as_str)
        .filter(|s| !per_store.iter().any(|(p, _, _)| p == s))
        .collect();
    let mut value = per_store
        .iter()
        .map(|(store, ratio, r)| {
            let scenario = r.label.strip_prefix(store).unwrap_or(&r.label).trim();
            if r.base == r.first {
                format!("{store} {} ({scenario})", pct(*ratio))
            } else {
                let first = pct(r.value / r.first.max(1.0));
                format!(
                    "{store} {} ({scenario}; {first} against the first)",
                    pct(*ratio)
                )
            }
        })
        .collect::<Vec<_>>()
        .join("; ");
    if !unscaled.is_empty() {
        value.push_str(&format!(
            "{}not scaled: {}",
            if value.is_empty() { "" } else { "; " },
            unscaled.join(", ")
        ));
    }
    Target {
        measure: "throughput at 1M pending vs 1k pending (worst of check and send)".into(),
        target: "≥ 90 % on every store".into(),
        value,
        met: (!per_store.is_empty())
            .then(|| unscaled.is_empty() && per_store.iter().all(|(_, r, _)| *r >= 0.90)),
    }
}

fn minutes(secs: u64) -> String {
    format!("{} min {} s", secs / 60, secs % 60)
}

fn level_label(n: u64) -> String {
    if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else if n >= 1_000 && n.is_multiple_of(1_000) {
        format!("{}k", n / 1_000)
    } else {
        n.to_string()
    }
}

/// The issue-8 targets, each judged against this run's figures.
fn judge(ctx: &Ctx) -> Vec<Target> {
    let hello = ctx.hello_rps.max(1.0);
    let find = |store: &str, scenario: &str| -> Vec<&Measure> {
        ctx.measures
            .iter()
            .filter(|m| m.store == store && m.scenario == scenario)
            .collect()
    };
    let mut targets = Vec::new();
    // `floor`: the relay scenario a request of this kind cannot beat, shown beside it.
    let ratio_target = |targets: &mut Vec<Target>,
                        store: &str,
                        scenarios: &[&str],
                        what: &str,
                        min: f64,
                        floor: Option<&str>| {
        let ms: Vec<&Measure> = scenarios.iter().flat_map(|s| find(store, s)).collect();
        let worst = ms.iter().min_by(|a, b| a.rps.total_cmp(&b.rps));
        let floor = floor
            .and_then(|f| find("-", f).first().map(|m| (f, m.rps)))
            .map(|(f, rps)| format!("; {f}: {}", pct(rps / hello)))
            .unwrap_or_default();
        let (value, met) = match worst {
            Some(m) => (
                format!(
                    "{} ({:.0} req/s, {} {}{floor})",
                    pct(m.rps / hello),
                    m.rps,
                    m.scenario,
                    m.api
                ),
                Some(m.rps / hello >= min),
            ),
            None => ("-".into(), None),
        };
        targets.push(Target {
            measure: format!("{what} req/s vs bare hello, {store}"),
            target: format!("≥ {}", pct(min)),
            value,
            met,
        });
    };
    let checks = ["check wrong", "check right"];
    ratio_target(&mut targets, "memory", &checks, "check", 0.50, None);
    ratio_target(&mut targets, "sqlite", &checks, "check", 0.25, None);
    let redis_floor = Some("relay redis");
    ratio_target(&mut targets, "redis", &checks, "check", 0.30, redis_floor);
    let send_floor = Some("relay send");
    ratio_target(&mut targets, "memory", &["send"], "send", 0.25, send_floor);
    ratio_target(&mut targets, "sqlite", &["send"], "send", 0.15, send_floor);

    targets.push(scaling_target(ctx));
    targets.push(Target {
        measure: "bytes per pending verification (memory)".into(),
        target: "≤ 300 B".into(),
        value: ctx
            .bytes_per_pending
            .map(|b| format!("{b:.0} B"))
            .unwrap_or_else(|| "-".into()),
        met: ctx.bytes_per_pending.map(|b| b <= 300.0),
    });
    let latency: Vec<&Measure> = ctx
        .measures
        .iter()
        .filter(|m| m.scenario.starts_with("latency"))
        .collect();
    let worst = latency.iter().max_by_key(|m| m.p99_us);
    targets.push(Target {
        measure: "p99 at half of peak".into(),
        target: "≤ 2 ms".into(),
        value: worst
            .map(|m| {
                format!(
                    "{} ms (worst: {} {})",
                    report::ms(m.p99_us),
                    m.store,
                    m.scenario
                )
            })
            .unwrap_or_else(|| "-".into()),
        met: worst.map(|m| m.p99_us <= 2_000),
    });
    targets
}
