#!/usr/bin/env bash
# One command for the whole benchmark: builds the release binaries (otpd and the
# bench tools, same profile), starts Redis and PostgreSQL when they are
# installed but down, and runs the driver. Loopback only. The driver has its own
# load generator; when `wrk` is installed it also cross-checks the hello figure.
#   bench/run.sh            full run; appends the results to BENCHMARKS.md
#   bench/run.sh --quick    smoke run (about a minute after the build); appends nothing
# Any other flags go to the driver: bench/run.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '== %s\n' "$*"; }

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
build_started=$SECONDS
cargo build --release --locked -p otpd -p otpd-bench -p otpd-bench-embedded
# The driver reports the build time next to its own, so a report shows the whole budget.
export OTPD_BENCH_BUILD_SECONDS=$((SECONDS - build_started))

log "running the benchmark"
target/release/otpd-bench "$@"
log "bench/run.sh took $((SECONDS / 60)) min $((SECONDS % 60)) s"
