#!/usr/bin/env bash
# Where a sequential `POST /v1/jobs?wait=30s` goes: the client's round trip over one
# keep-alive connection (p50, p99) and, from the server's tracing spans (debug level,
# logged with their busy and idle time as they close), the median of each stage:
# api.auth, api.read_body, api.parse, runtime.submit (runtime.prepare,
# runtime.execute, store.insert_job), api.serialise.
#
#   bash api/benches/submit-breakdown.sh            # BREAKDOWN_N (2000) requests
#
# Needs the release server (`cargo build --release -p cloudpipe-api`; or
# BREAKDOWN_CLOUDPIPE), node >= 18 and the test programs of the workspace's test build
# (`cargo build --workspace --all-targets`). The spans' logging costs some time of its
# own, so the client figures are also given from a second run with spans off.
# Everything listens on 127.0.0.1; the server is stopped on exit.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init breakdown
cd "$ROOT"
N="${BREAKDOWN_N:-2000}"
CLOUDPIPE="${BREAKDOWN_CLOUDPIPE:-$TARGET_DIR/release/cloudpipe}"
HELLO="$(program HELLO)"
KEY="cpk_breakdown_bench_admin_key"

# run LOG_FILTER: starts a server, runs N sequential submits, prints the client's figures.
run() {
  rm -rf "$TMP/data"
  RUST_LOG="$1" start_server "$CLOUDPIPE" "$KEY" --no-runner-js
  upload hello "$HELLO"
  URL="$URL" KEY="$KEY" N="$N" node --input-type=module -e '
    const { URL: url, KEY: key, N } = process.env;
    const n = Number(N), warm = 200, times = [], run = [];
    const body = JSON.stringify({ function: "hello" });
    const headers = { authorization: `Bearer ${key}`, "content-type": "application/json" };
    for (let i = 0; i < warm + n; i++) {
      const t0 = performance.now();
      const res = await fetch(`${url}/v1/jobs?wait=30s`, { method: "POST", headers, body });
      const job = await res.json();
      if (job.status !== "succeeded") throw new Error(JSON.stringify(job));
      if (i >= warm) { times.push(performance.now() - t0); run.push(job.run_ms); }
    }
    times.sort((a, b) => a - b); run.sort((a, b) => a - b);
    const p = (xs, q) => xs[Math.min(xs.length - 1, Math.floor(xs.length * q))].toFixed(3);
    console.log(`| ${n} | ${p(times, 0.5)} | ${p(times, 0.9)} | ${p(times, 0.99)} | ${p(run, 0.5)} |`);
  '
  stop_server
}

echo "load average $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs; $CLOUDPIPE"
echo
echo "| spans | requests | client p50 ms | p90 ms | p99 ms | job run_ms p50 |"
echo "|---|---:|---:|---:|---:|---:|"
printf '| off '; run warn
printf '| on '; run "warn,cloudpipe_api=debug,cloudpipe_runtime=debug"

# Span lines: `... api.parse: close time.busy=12.3µs time.idle=4.5µs`; the median of
# busy + idle per span, over the measured requests (past the warm-up).
echo
echo "| span | median µs (busy + idle) | median busy µs |"
echo "|---|---:|---:|"
sed 's/\x1b\[[0-9;]*m//g' "$TMP/log" | awk '
  function us(v) {
    if (v ~ /ns$/) { sub(/ns$/, "", v); return v / 1000 }
    if (v ~ /µs$/) { sub(/µs$/, "", v); return v + 0 }
    if (v ~ /ms$/) { sub(/ms$/, "", v); return v * 1000 }
    if (v ~ /s$/) { sub(/s$/, "", v); return v * 1e6 }
    return v + 0
  }
  / close time.busy=/ {
    name = ""; b = ""; d = ""
    for (i = 1; i <= NF; i++) {
      # `api.x{..}:runtime.y{..}: close ...`: the innermost span is the last one.
      if ($i ~ /^(api|runtime|store)\.[a-z_]+[:{]/) {
        name = $i; gsub(/\{[^}]*\}/, "", name); sub(/:$/, "", name); sub(/.*:/, "", name)
      }
      if ($i ~ /^time.busy=/) { b = $i; sub(/time.busy=/, "", b) }
      if ($i ~ /^time.idle=/) { d = $i; sub(/time.idle=/, "", d) }
    }
    if (name != "") printf "%s %.3f %.3f\n", name, us(b) + us(d), us(b)
  }' > "$TMP/spans.txt"
for name in $(cut -d' ' -f1 "$TMP/spans.txt" | sort -u); do
  grep "^$name " "$TMP/spans.txt" | tail -n "$N" > "$TMP/one.txt"
  k="$(wc -l < "$TMP/one.txt")"; mid=$(( (k + 1) / 2 ))
  tot="$(cut -d' ' -f2 "$TMP/one.txt" | sort -g | sed -n "${mid}p")"
  busy="$(cut -d' ' -f3 "$TMP/one.txt" | sort -g | sed -n "${mid}p")"
  echo "| $name | $tot | $busy |"
done
