#!/usr/bin/env bash
# A 3-member etcd on loopback for trying cluster mode by hand (the tests
# start their own, crates/testkit/src/etcd.rs).
#
#   scripts/etcd.sh [start] [DIR]   start it, wait until healthy, print the endpoints
#   scripts/etcd.sh stop [DIR]      stop it (the data stays: start resumes it;
#                                   rm -rf DIR to begin afresh)
#
# DIR holds m<i>.data, m<i>.log and m<i>.pid (default /tmp/blockmirror-etcd).
# Client ports 2379, 22379, 32379 (BM_ETCD_PORTS overrides), each member's
# peer port is its client port + 1. Raft timing as in the tests: heartbeat
# 50 ms, election 500 ms, pre-vote on.
set -euo pipefail
cmd=start
case "${1:-}" in start | stop) cmd=$1; shift ;; esac
dir=${1:-/tmp/blockmirror-etcd}
read -r -a ports <<<"${BM_ETCD_PORTS:-2379 22379 32379}"

# The ETCD_* variables of a packaged etcd would override our flags.
for v in $(compgen -e | grep '^ETCD_' || true); do unset "$v"; done

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [[ $cmd == stop ]]; then
    for i in "${!ports[@]}"; do
        pidf="$dir/m$i.pid"
        if alive "$pidf"; then
            pid=$(cat "$pidf")
            kill "$pid"
            while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
            echo "stopped m$i (pid $pid)"
        fi
        rm -f "$pidf"
    done
    exit 0
fi

mkdir -p "$dir"
cluster=""
for i in "${!ports[@]}"; do
    cluster+="${cluster:+,}m$i=http://127.0.0.1:$((ports[i] + 1))"
done
for i in "${!ports[@]}"; do
    pidf="$dir/m$i.pid"
    if alive "$pidf"; then
        echo "m$i already running (pid $(cat "$pidf"))"
        continue
    fi
    c="http://127.0.0.1:${ports[i]}" p="http://127.0.0.1:$((ports[i] + 1))"
    # --initial-cluster* are ignored when the data dir already exists.
    etcd --name "m$i" --data-dir "$dir/m$i.data" \
        --listen-client-urls "$c" --advertise-client-urls "$c" \
        --listen-peer-urls "$p" --initial-advertise-peer-urls "$p" \
        --initial-cluster "$cluster" --initial-cluster-state new \
        --initial-cluster-token blockmirror-etcd-sh \
        --heartbeat-interval 50 --election-timeout 500 --pre-vote=true \
        --logger zap --log-outputs stderr >>"$dir/m$i.log" 2>&1 </dev/null &
    echo $! >"$pidf"
done

# Healthy: every member answers GET /health with {"health":"true"} (a
# leader and a read through raft). Plain bash, no curl needed.
health() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1 &&
        printf 'GET /health HTTP/1.0\r\n\r\n' >&3 && cat <&3" 2>/dev/null |
        grep -q '"health":"true"'
}
for _ in $(seq 100); do
    ok=0
    for port in "${ports[@]}"; do health "$port" && ok=$((ok + 1)); done
    if ((ok == ${#ports[@]})); then
        endpoints=""
        for port in "${ports[@]}"; do endpoints+="${endpoints:+,}http://127.0.0.1:$port"; done
        echo "$endpoints"
        exit 0
    fi
    sleep 0.2
done
echo "etcd not healthy after 20 s; logs: $dir/m*.log" >&2
exit 1
