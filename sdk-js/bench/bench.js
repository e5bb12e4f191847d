// Benchmarks of JS jobs through the SDK, on the real server and the real runner:
//
// - cold start: `await cp.run(() => 1)`, one after the other: the client's round trip
//   (submit with ?wait=, the job's record back, the result parsed), and the records'
//   in-sandbox time (`run_ms`) and queue time (`queue_ms`); then the same through
//   `submit` and `job.result()`;
// - map throughput: `cp.map((x) => x * 2, 1000 items)` at several concurrencies.
//
//   node sdk-js/bench/bench.js [JOBS]        # JOBS sequential runs, default 300
//
// The server binary is CLOUDPIPE_BIN or target/release/cloudpipe (build it with
// `cargo build --release --bin cloudpipe`); the runner guest-runners/js/dist/runner-js.wasm.

import { existsSync } from 'node:fs';
import { join } from 'node:path';

import { repoRoot, startWithRunner } from '../testing/server.js';

const jobs = Number(process.argv[2] ?? 300);
const WARM = 20;

if (!process.env.CLOUDPIPE_BIN) {
  const release = join(repoRoot, 'target', 'release', 'cloudpipe');
  if (!existsSync(release)) {
    console.error('bench: build the release server first: cargo build --release --bin cloudpipe');
    process.exit(2);
  }
  process.env.CLOUDPIPE_BIN = release;
}

const pct = (sorted, p) => sorted[Math.min(sorted.length - 1, Math.floor((sorted.length * p) / 100))];
const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;
const f = (x) => x.toFixed(2);

const { server, cp } = await startWithRunner();
try {
  for (let i = 0; i < WARM; i++) await cp.run(() => 1);

  const tag = `bench-${Date.now()}`;
  const tagged = cp.with({ tags: [tag] });
  const trips = [];
  for (let i = 0; i < jobs; i++) {
    const t0 = performance.now();
    const one = await tagged.run(() => 1);
    trips.push(performance.now() - t0);
    if (one !== 1) throw new Error(`unexpected result ${one}`);
  }
  const records = [];
  let cursor;
  do {
    const page = await cp.jobs.list({ tag, limit: 1000, cursor });
    records.push(...page.jobs.map((j) => j.record));
    cursor = page.nextCursor ?? undefined;
  } while (cursor);
  trips.sort((a, b) => a - b);
  // The same through `submit` (keyed, answered within the server's fast-path window)
  // and `result()` (a request only if the job had not ended by then).
  const keyedTrips = [];
  for (let i = 0; i < jobs; i++) {
    const t0 = performance.now();
    const one = await (await cp.submit(() => 1)).result();
    keyedTrips.push(performance.now() - t0);
    if (one !== 1) throw new Error(`unexpected result ${one}`);
  }
  keyedTrips.sort((a, b) => a - b);
  const run = records.map((r) => r.run_ms).sort((a, b) => a - b);
  const queue = records.map((r) => r.queue_ms).sort((a, b) => a - b);

  console.log(`server: ${process.env.CLOUDPIPE_BIN}`);
  console.log('');
  const row = (label, xs) => `| ${label} | ${f(mean(xs))} | ${f(pct(xs, 50))} | ${f(pct(xs, 90))} | ${f(pct(xs, 99))} |`;
  console.log('| measure | mean | p50 | p90 | p99 |');
  console.log('|---|---|---|---|---|');
  console.log(row(`\`cp.run(() => 1)\` round trip, ms (${jobs} sequential)`, trips));
  console.log(row('in-sandbox `run_ms` of those jobs', run));
  console.log(row('`queue_ms` of those jobs', queue));
  console.log(row('`(await cp.submit(() => 1)).result()`, ms', keyedTrips));
  console.log('');
  console.log('| `cp.map((x) => x * 2, 1000 items)` | wall time | jobs/s |');
  console.log('|---|---|---|');
  const items = Array.from({ length: 1000 }, (_, i) => i);
  for (const concurrency of [1, 8, 32, 64]) {
    const t0 = performance.now();
    const out = await cp.map((x) => x * 2, items, { concurrency });
    const ms = performance.now() - t0;
    if (out[999] !== 1998) throw new Error('map gave a wrong result');
    console.log(`| concurrency ${concurrency} | ${ms.toFixed(0)} ms | ${((1000 * 1000) / ms).toFixed(0)} |`);
  }
} finally {
  await server.stop();
}
