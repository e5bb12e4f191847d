# What the benchmark scripts share; sourced, never run. Each script sources it first:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#   bench_init list                     # names the log lines and the temp dir
#
# It sets ROOT (the workspace), TARGET_DIR, TMP (removed on exit) and gives:
#   log MSG / die MSG                   to stderr, prefixed with the script's name
#   program NAME                        a test program's .wasm (HELLO, FLOOD, CGI, ...)
#   start_server BIN KEY [FLAG...]      `BIN serve` on 127.0.0.1:0 over $TMP/data with
#                                       KEY as the admin's key; sets URL and SERVER_PID
#   stop_server                         SIGTERM to it, then waits
#   started PID                         stop PID on exit too
#   upload NAME FILE [QUERY]            upload a function (QUERY: more of the query)
#   run_batch TEMPLATE SPLIT < LINES    a batch of the job TEMPLATE (JSON), one input a
#                                       line of stdin; waits for its end, sets BATCH
#   free_port                           a loopback port nobody listens on now
# Everything started here listens on 127.0.0.1 only and is stopped on exit.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BENCH=bench
TMP=""
PIDS=()
SERVER_PID=""
URL=""

log() { echo "$BENCH: $*" >&2; }
die() { log "$*"; exit 1; }

# bench_init NAME: the script's name in messages; a temp dir removed on exit, and every
# process started through `started` (and the server) stopped.
bench_init() {
  BENCH="$1"
  TMP="$(mktemp -d -t "cloudpipe-$1.XXXXXX")"
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
}

bench_cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$TMP"
}

started() { PIDS+=("$1"); }

# The test programs' build script writes `programs.rs` (one `pub const NAME: &str =
# "path";` per program) into its OUT_DIR; the newest one whose NAME exists is used.
program() {
  local f path
  for f in $(ls -t "$TARGET_DIR"/{release,debug}/build/cloudpipe-test-programs-artifacts-*/out/programs.rs 2>/dev/null); do
    path="$(sed -n "s/^pub const $1: &str = \"\(.*\)\";$/\1/p" "$f")"
    [[ -n "$path" && -f "$path" ]] && { echo "$path"; return; }
  done
  die "no test program $1 under $TARGET_DIR (cargo build --workspace --all-targets)"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start_server BIN KEY [FLAG...]: RUST_LOG as set (default info; the line that says
# where it serves is always logged); the log in $TMP/log.
start_server() {
  local bin="$1" key="$2"
  shift 2
  [[ -x "$bin" ]] || die "no cloudpipe binary at $bin (cargo build --release -p cloudpipe-api)"
  CLOUDPIPE_ADMIN_KEY="$key" CLOUDPIPE_CREDENTIALS="$TMP/credentials.json" RUST_LOG="${RUST_LOG:-info},cloudpipe::serve=info" \
    "$bin" serve --listen 127.0.0.1:0 --data-dir "$TMP/data" "$@" </dev/null >/dev/null 2>"$TMP/log" &
  SERVER_PID=$!
  started "$SERVER_PID"
  URL=""
  for _ in $(seq 600); do
    URL="$(grep -o 'url=[^ ]*' "$TMP/log" | head -1 | cut -d= -f2 || true)"
    [[ -n "$URL" ]] && break
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  [[ -n "$URL" ]] || die "server did not start: $(tail -5 "$TMP/log")"
  AUTH=(-H "Authorization: Bearer $key")
}

stop_server() {
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
}

upload() {
  curl -sS --fail-with-body --max-time 60 "${AUTH[@]}" --data-binary "@$2" \
    "$URL/v1/functions?name=$1${3:+&$3}" >"$TMP/upload-$1.json" \
    || { cat "$TMP/upload-$1.json" >&2; die "uploading $1 failed"; }
}

run_batch() {
  local start status
  python3 -c 'import json, sys; print(json.dumps({"template": json.loads(sys.argv[1]),
    "input_text": sys.stdin.read(), "split": int(sys.argv[2])}))' "$1" "$2" >"$TMP/batch.json"
  start=$(date +%s.%N)
  BATCH="$(curl -sf "${AUTH[@]}" -H 'content-type: application/json' --data-binary @"$TMP/batch.json" "$URL/v1/batches" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')"
  while :; do
    status="$(curl -sf "${AUTH[@]}" "$URL/v1/batches/$BATCH" | python3 -c 'import json,sys; b=json.load(sys.stdin); print(b["status"], b["counts"]["ok"])')"
    [[ "$status" == running* ]] || break
    sleep 1
  done
  log "batch ended: $status in $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s"
}
