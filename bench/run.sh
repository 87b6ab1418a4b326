#!/usr/bin/env bash
# One command for the whole benchmark: installs what it needs, builds the release
# binaries (otpd and the bench tools, same profile), starts Redis and PostgreSQL
# when they are installed but down, and runs the driver. Loopback only.
#   bench/run.sh            full run; appends the results to BENCHMARKS.md
#   bench/run.sh --quick    smoke run (about a minute after the build); appends nothing
# Any other flags go to the driver: bench/run.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '== %s\n' "$*"; }

if ! command -v wrk >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  log "installing wrk (used to cross-check the built-in load generator)"
  apt-get install -y -q wrk >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q wrk >/dev/null; } || true
fi

if [ "${OTPD_BENCH_SERVICES:-1}" = 1 ]; then
  if command -v redis-server >/dev/null && ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    log "starting Redis on 127.0.0.1:6379"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
    for _ in $(seq 1 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.2; done
  fi
  if command -v pg_ctlcluster >/dev/null && ! pg_isready -q -h 127.0.0.1 -p 5432; then
    log "starting PostgreSQL on 127.0.0.1:5432"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  fi
fi

log "building release binaries"
cargo build --release --locked -p otpd -p otpd-bench

log "running the benchmark"
exec target/release/otpd-bench "$@"
