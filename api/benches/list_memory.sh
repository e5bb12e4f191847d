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

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init list_memory
BIN="${1:-$TARGET_DIR/release/cloudpipe}"
N="${LISTMEM_JOBS:-1000}"
ROUNDS="${LISTMEM_ROUNDS:-3}"
KEY="cpk_listmem_bench_admin_key_0000"
WASM="${LISTMEM_WASM:-$(program FLOOD)}"

start_server "$BIN" "$KEY" --concurrency 16
upload flood "$WASM"
log "making $N jobs of 1 MiB of stdout with one batch"
run_batch '{"function": "flood"}' 16 < <(seq "$N" | sed "s/.*/1/")
one="$(curl -sf "${AUTH[@]}" "$URL/v1/jobs?limit=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["id"])')"
size="$(curl -sf "${AUTH[@]}" "$URL/v1/jobs/$one/stdout" | wc -c)"
[[ "$size" == 1048576 ]] || die "a job's stdout is $size bytes, not 1 MiB"

# The lists are measured on a server started again over the same store, so that its
# peak is that of serving the jobs, not of running them.
stop_server
start_server "$BIN" "$KEY" --concurrency 16
BOOT_KIB="$(awk '$1 == "VmHWM:" {print $2}' "/proc/$SERVER_PID/status")"

kib() { awk -v f="$1" '$1 == f":" {print $2}' "/proc/$SERVER_PID/status"; }
measure() {
  local name="$1" path="$2"
  echo 5 >"/proc/$SERVER_PID/clear_refs"
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
