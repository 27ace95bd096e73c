#!/usr/bin/env bash
# Local S3 test server (s3s-fs) on a free loopback port. Keys: testkey / testsecret.
#   s3-server.sh start DATA_DIR   -> prints "PORT PID" (buckets = directories under DATA_DIR;
#                                    server log in DATA_DIR.log)
#   s3-server.sh stop PID
set -euo pipefail

S3S_FS="${S3S_FS:-$HOME/.cache/s3backer-rs/s3s-fs/bin/s3s-fs}"

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

case "${1:-}" in
start)
    data_dir="${2:?usage: $0 start DATA_DIR}"
    if [ ! -x "$S3S_FS" ]; then
        echo "s3s-fs not found at $S3S_FS: run scripts/install-deps.sh" >&2
        exit 1
    fi
    mkdir -p "$data_dir"
    port="$(free_port)"
    "$S3S_FS" --host 127.0.0.1 --port "$port" --access-key testkey --secret-key testsecret \
        "$data_dir" >"${data_dir%/}.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do
        if (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port $pid"
            exit 0
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    kill "$pid" 2>/dev/null || true
    echo "s3s-fs did not start on port $port" >&2
    exit 1
    ;;
stop)
    pid="${2:?usage: $0 stop PID}"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || exit 0
        sleep 0.05
    done
    kill -9 "$pid" 2>/dev/null || true
    ;;
*)
    echo "usage: $0 start DATA_DIR | stop PID" >&2
    exit 2
    ;;
esac
