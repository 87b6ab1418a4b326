#!/usr/bin/env bash
# A throwaway three-master Redis Cluster on 127.0.0.1:7001-7003 for the Redis store
# tests. `start` is idempotent (reuses running nodes and an already formed cluster);
# `stop` shuts the nodes down. Data is never persisted.
#
#   scripts/redis-cluster.sh start
#   export OTPD_TEST_REDIS_CLUSTER_URL=redis+cluster://127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003
#   scripts/redis-cluster.sh stop
set -euo pipefail

PORTS=(7001 7002 7003)
DIR=${OTPD_REDIS_CLUSTER_DIR:-/tmp/otpd-redis-cluster}
HOST=127.0.0.1

need() {
    command -v "$1" >/dev/null 2>&1 || {
        echo "redis-cluster.sh: $1 not found (apt-get install redis-server)" >&2
        exit 1
    }
}

answers() {
    [ "$(redis-cli -h "$HOST" -p "$1" ping 2>/dev/null)" = "PONG" ]
}

# Polls `$@` every 0.1 s for up to $1 seconds.
wait_for() {
    local seconds=$1
    shift
    local i
    for ((i = 0; i < seconds * 10; i++)); do
        if "$@"; then return 0; fi
        sleep 0.1
    done
    return 1
}

cluster_ok() {
    local p
    for p in "${PORTS[@]}"; do
        redis-cli -h "$HOST" -p "$p" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || return 1
    done
}

# Every node knows all three masters (the cluster has been formed, even if still
# converging).
formed() {
    local known
    known=$(redis-cli -h "$HOST" -p "${PORTS[0]}" cluster info 2>/dev/null |
        sed -n 's/^cluster_known_nodes:\([0-9]*\).*/\1/p')
    [ "${known:-0}" -ge "${#PORTS[@]}" ] &&
        [ "$(redis-cli -h "$HOST" -p "${PORTS[0]}" cluster info 2>/dev/null |
            sed -n 's/^cluster_slots_assigned:\([0-9]*\).*/\1/p')" = "16384" ]
}

start() {
    need redis-server
    need redis-cli
    mkdir -p "$DIR"
    local p running=0
    for p in "${PORTS[@]}"; do
        if answers "$p"; then running=$((running + 1)); fi
    done
    # A partly running cluster cannot be mended by re-creating it: start afresh.
    if [ "$running" -gt 0 ] && [ "$running" -lt "${#PORTS[@]}" ]; then
        stop
    fi
    for p in "${PORTS[@]}"; do
        if answers "$p"; then continue; fi
        # A stale config from an earlier run would point at a cluster that no longer exists.
        rm -f "$DIR/nodes-$p.conf"
        redis-server --port "$p" --cluster-enabled yes \
            --cluster-config-file "$DIR/nodes-$p.conf" --dir "$DIR" \
            --save "" --appendonly no --daemonize yes --bind "$HOST" \
            --logfile "$DIR/redis-$p.log"
    done
    for p in "${PORTS[@]}"; do
        wait_for 10 answers "$p" || {
            echo "redis-cluster.sh: node $p did not answer; see $DIR/redis-$p.log" >&2
            exit 1
        }
    done
    if ! formed; then
        local nodes=()
        for p in "${PORTS[@]}"; do nodes+=("$HOST:$p"); done
        redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >"$DIR/create.log" 2>&1 || {
            cat "$DIR/create.log" >&2
            exit 1
        }
    fi
    wait_for 30 cluster_ok || {
        echo "redis-cluster.sh: cluster_state never became ok" >&2
        redis-cli -h "$HOST" -p "${PORTS[0]}" cluster info >&2 || true
        exit 1
    }
    echo "redis cluster ready on ${PORTS[*]}"
}

stop() {
    local p
    for p in "${PORTS[@]}"; do
        if answers "$p"; then
            redis-cli -h "$HOST" -p "$p" shutdown nosave >/dev/null 2>&1 || true
        fi
    done
    for p in "${PORTS[@]}"; do
        wait_for 10 bash -c "! redis-cli -h $HOST -p $p ping >/dev/null 2>&1" || true
        rm -f "$DIR/nodes-$p.conf"
    done
    echo "redis cluster stopped"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
