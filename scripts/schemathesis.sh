#!/usr/bin/env bash
# Fuzzes the running service from its own /openapi.json with schemathesis and fails on any
# server error (5xx). Starts a private redis-server and the service on free ports, and stops both.
#
#   scripts/schemathesis.sh            # uses target/debug/rediskit (build it first)
#   BIN=target/release/rediskit EXAMPLES=200 scripts/schemathesis.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/debug/rediskit}
EXAMPLES=${EXAMPLES:-40}

if ! command -v schemathesis >/dev/null 2>&1; then
  python3 -m pip install --quiet "schemathesis==4.32.5"
fi

work=$(mktemp -d)
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
redis_port=$(free_port)
service_port=$(free_port)
base="http://127.0.0.1:${service_port}"

redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" \
  >"$work/redis.log" 2>&1 &
redis_pid=$!
env -u REDIS_HOST -u REDIS_PORT -u DEV_REDIS_HOST -u DEV_REDIS_PORT \
  REDIS_URL="redis://127.0.0.1:${redis_port}/0" LISTEN_ADDR="127.0.0.1:${service_port}" \
  JWT_SECRET="schemathesis-secret-0123456789abcdef" ENVIRONMENT=development \
  RATE_LIMIT_LOGIN_PER_MIN=1000000 RATE_LIMIT_AUTH_PER_MIN=1000000 DEMO_COMPUTE_MS=1 \
  RUST_LOG=warn "$BIN" serve >"$work/service.log" 2>&1 &
service_pid=$!
cleanup() {
  kill "$service_pid" "$redis_pid" 2>/dev/null || true
  wait "$service_pid" "$redis_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

for _ in $(seq 1 100); do
  curl -fs "$base/health" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fs "$base/health" >/dev/null || { cat "$work/service.log"; exit 1; }

# An account and a token, so protected routes are exercised past authentication too.
curl -fs -X POST "$base/auth/register" -H 'content-type: application/json' \
  -d '{"username":"fuzz","password":"fuzz-password"}' >/dev/null
token=$(curl -fs -X POST "$base/auth/login" -H 'content-type: application/json' \
  -d '{"username":"fuzz","password":"fuzz-password"}' |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])')

# Two passes: everything but logout with a live token, then logout (which ends the token).
status=0
for pass in exclude include; do
  schemathesis run "$base/openapi.json" \
    --checks not_a_server_error \
    --max-examples "$EXAMPLES" --seed 20261125 --workers 2 \
    "--${pass}-path-regex" '^/auth/logout' \
    --header "Authorization: Bearer ${token}" || status=$?
done
if grep -q "panicked" "$work/service.log"; then
  echo "the service panicked:"; grep -A5 panicked "$work/service.log"; status=1
fi
exit "$status"
