#!/usr/bin/env bash
# Job latency of the docker executor through Cloudpipe vs `docker run --rm -i`, same
# image and command, side by side in one run, alternating so that both see the same
# machine. Prints a Markdown table.
#
#   bash api/benches/docker.sh            # N=30 runs of each
#   N=100 bash api/benches/docker.sh
#
# Cloudpipe's figure is the whole round trip of `POST /v1/jobs?wait=60s` (curl):
# submit, durable write, container create/attach/start, output, exit, record. The CLI's
# is `docker run --rm -i --network none IMAGE echo hi` (process start included, as a
# user pays it). Needs: a running dockerd (or root to start one), busybox-static,
# curl, and a release build (done here).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init docker
cd "$ROOT"
N="${N:-30}"
IMAGE="cloudpipe-bench/busybox:1"

docker version >/dev/null 2>&1 || {
  command -v dockerd >/dev/null || die "dockerd not installed (apt-get install -y docker.io)"
  (setsid dockerd >/tmp/cloudpipe-bench-dockerd.log 2>&1 &)
  for _ in $(seq 120); do docker version >/dev/null 2>&1 && break; sleep 0.5; done
  docker version >/dev/null 2>&1 || die "dockerd did not start"
}
if ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
  BB="$(command -v busybox || true)"; [ -n "$BB" ] || die "busybox not installed (apt-get install -y busybox-static)"
  FS="$TMP/image"; mkdir -p "$FS/bin" "$FS/tmp"; chmod 1777 "$FS/tmp"; cp "$BB" "$FS/bin/busybox"
  for a in sh echo cat; do ln -s busybox "$FS/bin/$a"; done
  tar -C "$FS" -c . | docker import --change 'ENV PATH=/bin' - "$IMAGE" >/dev/null
fi

cargo build --release --bin cloudpipe -q
KEY="cpk_docker_bench_admin_key"
RUST_LOG=warn,cloudpipe=info start_server "$TARGET_DIR/release/cloudpipe" "$KEY"
SPEC="{\"executor\":\"docker\",\"image\":\"$IMAGE\",\"command\":[\"echo\",\"hi\"]}"
cp_job() { curl -sS -o "$TMP/out.json" -w '%{time_total}\n' -H "Authorization: Bearer $KEY" \
  -XPOST "$URL/v1/jobs?wait=60s" -d "$SPEC"; grep -q '"stdout":"hi\\n"' "$TMP/out.json" || die "bad job: $(cat "$TMP/out.json")"; }
cli_job() { local s e; s=$(date +%s.%N); [ "$(docker run --rm -i --network none "$IMAGE" echo hi </dev/null)" = hi ] || die "docker run failed"; e=$(date +%s.%N); echo "$e - $s" | bc -l; }

cp_job >/dev/null; cli_job >/dev/null   # warm both
: >"$TMP/cp"; : >"$TMP/cli"
for _ in $(seq "$N"); do cp_job >>"$TMP/cp"; cli_job >>"$TMP/cli"; done

stats() { sort -n "$1" | awk '{ a[NR] = $1 * 1000; s += $1 * 1000 } END {
  printf "%.0f | %.0f | %.0f | %.0f", a[int(NR * 0.5 + 0.5)], a[int(NR * 0.9 + 0.5)], s / NR, a[NR] }'; }
P50_CP="$(sort -n "$TMP/cp" | awk '{ a[NR] = $1 } END { print a[int(NR * 0.5 + 0.5)] }')"
P50_CLI="$(sort -n "$TMP/cli" | awk '{ a[NR] = $1 } END { print a[int(NR * 0.5 + 0.5)] }')"
echo
echo "$N runs each, alternating; $(nproc) CPUs; load average $(cut -d' ' -f1-3 /proc/loadavg); docker $(docker version --format '{{.Server.Version}}')"
echo
echo "| path | p50 ms | p90 ms | mean ms | max ms |"
echo "|---|---|---|---|---|"
echo "| Cloudpipe \`POST /v1/jobs?wait\` (docker executor) | $(stats "$TMP/cp") |"
echo "| \`docker run --rm -i --network none\` | $(stats "$TMP/cli") |"
echo
echo "Cloudpipe / CLI at p50: $(echo "$P50_CP / $P50_CLI" | bc -l | cut -c1-4)x (goal <= 0.8x)"
