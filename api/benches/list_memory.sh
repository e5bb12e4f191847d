#!/usr/bin/env bash
# Memory of job lists over big jobs: the peak resident memory of the real `cloudpipe`
# binary while 10 clients at once ask `GET /v1/jobs?limit=1000` over N finished jobs
# of 1 MiB of stdout each (default 1,000: 1 GiB of output in the store).
#
#   bash api/benches/list_memory.sh [PATH/TO/cloudpipe]   # default: target/release/cloudpipe
#
# The jobs are made by one batch of the `flood` test component (`flood 1` writes 1 MiB).
# The server is then started again over the store, its peak (VmHWM) reset to its current resident memory
# (`echo 5 > /proc/PID/clear_refs`), ROUNDS rounds of 10 parallel requests are made,
# and the new peak is printed; the same again with `include=output` (each page capped
# at 16 MiB of output).
#
# Knobs (environment): LISTMEM_JOBS (1000), LISTMEM_ROUNDS (3), LISTMEM_WASM (the
# flood component; default: the test programs' flood.wasm from the last cargo build).
# Listens on 127.0.0.1 only; stops the server it started on exit.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN="${1:-$ROOT/target/release/cloudpipe}"
N="${LISTMEM_JOBS:-1000}"
ROUNDS="${LISTMEM_ROUNDS:-3}"
KEY="cpk_listmem_bench_admin_key_0000"

log() { echo "list_memory.sh: $*" >&2; }
die() { log "$*"; exit 1; }
[[ -x "$BIN" ]] || die "no cloudpipe binary at $BIN (cargo build --release -p cloudpipe-api)"
WASM="${LISTMEM_WASM:-$(ls -t "$ROOT"/target/*/build/cloudpipe-test-programs-artifacts-*/out/guest-target/wasm32-wasip2/release/flood.wasm 2>/dev/null | head -1)}"
[[ -f "$WASM" ]] || die "no flood.wasm: build the test programs (cargo test -p cloudpipe-api --no-run) or set LISTMEM_WASM"

TMP="$(mktemp -d -t cloudpipe-listmem.XXXXXX)"
PID=""
cleanup() {
  if [[ -n "$PID" ]]; then
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT

start_server() {
  CLOUDPIPE_ADMIN_KEY="$KEY" CLOUDPIPE_CREDENTIALS="$TMP/credentials.json" RUST_LOG=info \
    "$BIN" serve --listen 127.0.0.1:0 --data-dir "$TMP/data" --concurrency 16 2>"$TMP/log" &
  PID=$!
  URL=""
  for _ in $(seq 600); do
    URL="$(grep -o 'url=[^ ]*' "$TMP/log" | head -1 | cut -d= -f2 || true)"
    [[ -n "$URL" ]] && break
    sleep 0.1
  done
  [[ -n "$URL" ]] || die "server did not start: $(tail -5 "$TMP/log")"
}
start_server
AUTH=(-H "Authorization: Bearer $KEY")

curl -sf "${AUTH[@]}" --data-binary @"$WASM" "$URL/v1/functions?name=flood" >/dev/null
python3 -c "
import json, sys
n = int(sys.argv[1])
print(json.dumps({'template': {'function': 'flood'}, 'inputs': [['1']] * n, 'split': 16}))" "$N" >"$TMP/batch.json"
log "making $N jobs of 1 MiB of stdout with one batch"
start=$(date +%s.%N)
BATCH="$(curl -sf "${AUTH[@]}" -H 'content-type: application/json' --data-binary @"$TMP/batch.json" "$URL/v1/batches" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')"
while :; do
  status="$(curl -sf "${AUTH[@]}" "$URL/v1/batches/$BATCH" | python3 -c 'import json,sys; b=json.load(sys.stdin); print(b["status"], b["counts"]["ok"])')"
  [[ "$status" == running* ]] || break
  sleep 1
done
log "batch ended: $status in $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s"
one="$(curl -sf "${AUTH[@]}" "$URL/v1/jobs?limit=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["id"])')"
size="$(curl -sf "${AUTH[@]}" "$URL/v1/jobs/$one/stdout" | wc -c)"
[[ "$size" == 1048576 ]] || die "a job's stdout is $size bytes, not 1 MiB"

# The lists are measured on a server started again over the same store, so that its
# peak is that of serving the jobs, not of running them.
kill "$PID"
wait "$PID" 2>/dev/null || true
start_server
BOOT_KIB="$(awk '$1 == "VmHWM:" {print $2}' "/proc/$PID/status")"

kib() { awk -v f="$1" '$1 == f":" {print $2}' "/proc/$PID/status"; }
measure() {
  local name="$1" path="$2"
  echo 5 >"/proc/$PID/clear_refs"
  local before bytes
  before="$(kib VmRSS)"
  for _ in $(seq "$ROUNDS"); do
    (
      for _ in $(seq 10); do
        curl -sf -o /dev/null -w '%{size_download}\n' "${AUTH[@]}" "$URL$path" >>"$TMP/sizes" &
      done
      wait
    )
  done
  bytes="$(tail -1 "$TMP/sizes")"
  printf '| %s | `%s` | %d | %d | %d |\n' "$name" "$path" "$((before / 1024))" "$(($(kib VmHWM) / 1024))" "$bytes"
}

echo
echo "$N finished jobs of 1 MiB stdout each; server restarted over them (peak $((BOOT_KIB / 1024)) MiB at boot);"
echo "$ROUNDS rounds of 10 parallel requests per row, the peak reset before each row:"
echo
echo "| scenario | request | RSS before (MiB) | peak RSS (MiB) | bytes per answer |"
echo "|---|---|---:|---:|---:|"
measure "page of 1,000, summaries" "/v1/jobs?limit=1000"
measure "page with output (16 MiB cap)" "/v1/jobs?limit=1000&include=output"
measure "one big job" "/v1/jobs/$one"
