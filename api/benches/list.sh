#!/usr/bin/env bash
# Job lists over many retained jobs: latency of `GET /v1/jobs` pages on the real
# `cloudpipe` binary holding N finished jobs (default 50,000, all succeeded, none
# failed), over loopback with curl.
#
#   bash api/benches/list.sh [PATH/TO/cloudpipe]     # default: target/release/cloudpipe
#
# The jobs are made by one batch of N inputs of the `hello` test component (split 64);
# then each scenario is REPS sequential requests (after 5 warm-up ones):
#   failed, 50        GET /v1/jobs?status=failed&limit=50     (matches nothing)
#   newest 50         GET /v1/jobs?limit=50
#   page of 1,000     GET /v1/jobs?limit=1000
#   last page         GET /v1/jobs?limit=50&cursor=<the 50th-oldest id>
#   batch, 1,000      GET /v1/jobs?batch=ID&limit=1000
#   tag, no match     GET /v1/jobs?tag=none&limit=50
#   status+function   GET /v1/jobs?status=succeeded&function=hello&limit=50
# and the server's resident memory once the jobs are in (VmRSS).
#
# Knobs (environment): LIST_JOBS (50000), LIST_REPS (100), LIST_WASM (a command
# component; default: the test programs' hello.wasm from the last cargo build).
# Listens on 127.0.0.1 only; stops the server it started on exit.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init list
BIN="${1:-$TARGET_DIR/release/cloudpipe}"
N="${LIST_JOBS:-50000}"
REPS="${LIST_REPS:-100}"
KEY="cpk_list_bench_admin_key_000000"
WASM="${LIST_WASM:-$(program HELLO)}"

start_server "$BIN" "$KEY" --concurrency 64
upload hello "$WASM"
log "making $N jobs with one batch"
run_batch '{"function": "hello", "tags": ["bench"]}' 64 < <(seq 0 $((N - 1)))
RSS_KB="$(awk '/VmRSS/ {print $2}' "/proc/$SERVER_PID/status")"

# The cursor of the last page: the 50th-oldest job.
OLD="$(curl -sf "${AUTH[@]}" "$URL/v1/jobs?batch=$BATCH&limit=1000" >/dev/null; \
  python3 - "$URL" "$KEY" <<'PY'
import json, sys, urllib.request
url, key = sys.argv[1], sys.argv[2]
cursor, ids = None, []
while True:
    q = f"{url}/v1/jobs?limit=1000" + (f"&cursor={cursor}" if cursor else "")
    page = json.load(urllib.request.urlopen(urllib.request.Request(q, headers={"Authorization": f"Bearer {key}"})))
    ids += [j["id"] for j in page["jobs"]]
    cursor = page.get("next_cursor")
    if not cursor:
        break
print(ids[-51] if len(ids) > 51 else ids[-1])
PY
)"

scenario() {
  local name="$1" path="$2"
  for _ in $(seq 5); do curl -sf -o /dev/null "${AUTH[@]}" "$URL$path"; done
  for _ in $(seq "$REPS"); do
    curl -sf -o /dev/null -w '%{time_total} %{size_download}\n' "${AUTH[@]}" "$URL$path"
  done | sort -n | awk -v name="$name" -v path="$path" '
    { t[NR] = $1 * 1000; s = $2 }
    END {
      p50 = t[int(NR * 0.5 + 0.5)]; p99 = t[int(NR * 0.99 + 0.5)]
      printf "| %s | `%s` | %d | %.2f | %.2f | %.2f | %d |\n", name, path, NR, p50, p99, t[NR], s
    }'
}

echo
echo "$N retained jobs (none failed), server RSS $((RSS_KB / 1024)) MiB; $REPS sequential requests each (curl, loopback):"
echo
echo "| scenario | request | n | p50 ms | p99 ms | max ms | bytes |"
echo "|---|---|---:|---:|---:|---:|---:|"
scenario "failed, 50" "/v1/jobs?status=failed&limit=50"
scenario "newest 50" "/v1/jobs?limit=50"
scenario "page of 1,000" "/v1/jobs?limit=1000"
scenario "last page" "/v1/jobs?limit=50&cursor=$OLD"
scenario "batch, 1,000" "/v1/jobs?batch=$BATCH&limit=1000"
scenario "tag, no match" "/v1/jobs?tag=none&limit=50"
scenario "status+function" "/v1/jobs?status=succeeded&function=hello&limit=50"
