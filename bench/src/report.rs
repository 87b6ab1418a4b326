//! The results table, the targets of issue 8 judged against it, and the
//! Markdown section appended to BENCHMARKS.md.

use std::fmt::Write as _;

/// One measured scenario.
#[derive(Debug, Clone)]
pub struct Measure {
    pub store: String,
    /// `send`, `check wrong`, `check right`, `latency check`, `latency send`, `scaling …`.
    pub scenario: String,
    /// `native`, `bridgex` or `-`.
    pub api: String,
    pub rps: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    /// Share of answers with the expected status.
    pub ok_share: f64,
    /// Server CPU time per answer, in microseconds (all threads).
    pub cpu_us_per_req: Option<f64>,
    /// CPU time per answer of the store's own server processes (redis-server,
    /// PostgreSQL's), in microseconds; none for a store inside otpd.
    pub store_cpu_us_per_req: Option<f64>,
    /// Storage writes the server caused per answer, in KiB (all threads): its
    /// store's files and its log. Pages dirtied while the scenario ran; the
    /// kernel writes them back later.
    pub disk_kib_per_req: Option<f64>,
    pub note: String,
}

/// One target row.
#[derive(Debug, Clone)]
pub struct Target {
    pub measure: String,
    pub target: String,
    pub value: String,
    pub met: Option<bool>,
}

pub struct Machine {
    pub date: String,
    pub commit: String,
    pub nproc: String,
    pub cpu: String,
    pub load: String,
}

impl Machine {
    pub fn detect() -> Self {
        let run = |cmd: &str, args: &[&str]| {
            std::process::Command::new(cmd)
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_else(|| "unknown".into())
        };
        let cpu = run("lscpu", &[])
            .lines()
            .find_map(|l| l.strip_prefix("Model name:"))
            .map(|m| m.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let mut commit = run("git", &["rev-parse", "--short=12", "HEAD"]);
        if !run("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty()
            && commit != "unknown"
        {
            commit.push_str(" (with uncommitted changes)");
        }
        Self {
            date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            commit,
            nproc: run("nproc", &[]),
            cpu,
            load: std::fs::read_to_string("/proc/loadavg")
                .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_default(),
        }
    }
}

pub fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

/// A per-answer figure with one decimal, or `-` when it was not measured.
pub fn per_answer(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_owned(), |x| format!("{x:.1}"))
}

pub fn pct(x: f64) -> String {
    format!("{:.0} %", x * 100.0)
}

pub fn render(
    machine: &Machine,
    command: &str,
    hello_rps: f64,
    measures: &[Measure],
    targets: &[Target],
    notes: &[String],
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## Run {} — commit {}\n", machine.date, machine.commit);
    let _ = writeln!(
        s,
        "Machine: {} CPUs ({}), load average before the run {}. Command: `{command}).\n",
        machine.nproc, machine.cpu, machine.load
    );
    let _ = writeln!(s, "### Targets\n");
    let _ = writeln!(s, "| measure | target | measured | met |");
    let _ = writeln!(s, "|---|---|---|---|");
    for t in targets {
        let met = match t.met {
            Some(true) => "met",
            Some(false) => "**not met**",
            None => "not measured",
        };
        let _ = writeln!(s, "| {} | {} | {} | {met} |", t.measure, t.target, t.value);
    }
    let _ = writeln!(s, "\n### Every scenario\n");
    let _ = writeln!(
        s,
        "Bare hello (same axum/tokio, same release profile): **{hello_rps:.0} req/s**.\n"
    );
    let _ = writeln!(
        s,
        "| store | scenario | API | req/s | vs hello | p50 ms | p99 ms | expected answers | server CPU µs/req | store server CPU µs/req | disk KiB/req | note |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for m in measures {
        let ratio = if hello_rps > 0.0 && m.rps > 0.0 {
            pct(m.rps / hello_rps)
        } else {
            "-".into()
        };
        let cpu = per_answer(m.cpu_us_per_req);
        let store_cpu = per_answer(m.store_cpu_us_per_req);
        let disk = per_answer(m.disk_kib_per_req);
        let rps = if m.rps > 0.0 {
            format!("{:.0}", m.rps)
        } else {
            "-".into()
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {rps} | {ratio} | {} | {} | {} | {cpu} | {store_cpu} | {disk} | {} |",
            m.store,
            m.scenario,
            m.api,
            ms(m.p50_us),
            ms(m.p99_us),
            pct(m.ok_share),
            m.note
        );
    }
    if !notes.is_empty() {
        let _ = writeln!(s, "\nNotes:\n");
        for n in notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s.push('\n');
    s
}
