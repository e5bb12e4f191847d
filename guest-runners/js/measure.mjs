// Measures the JS runner on a running server: submits `() => 1` N times, one after
// the other, to each function named, and prints the job records' in-sandbox time
// (`run_ms`: instantiation, the guest's start-up and its run) and the client's round
// trip (submit with ?wait= until the record comes back).
//
//   node measure.mjs URL KEY N NAME...
//   node measure.mjs http://127.0.0.1:7391 "$CLOUDPIPE_ADMIN_KEY" 200 runner-js runner-js-plain
//
// The first 10 jobs of each function are not counted (compilation, warm caches).

const [url, key, n, ...names] = process.argv.slice(2);
if (!url || !n || names.length === 0) {
  console.error('usage: node measure.mjs URL KEY N NAME...');
  process.exit(2);
}
const WARM = 10;
const stdin = JSON.stringify({ source: '() => 1', args: [] });

function pct(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.floor((sorted.length * p) / 100))];
}

for (const name of names) {
  const run = [];
  const trip = [];
  for (let i = 0; i < WARM + Number(n); i++) {
    const t0 = performance.now();
    const res = await fetch(`${url}/v1/jobs?wait=30s`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${key}` },
      body: JSON.stringify({ function: name, stdin }),
    });
    const record = await res.json();
    const t1 = performance.now();
    if (record.status !== 'succeeded' || record.stdout.trim() !== '1') {
      console.error(`${name}: unexpected record`, record);
      process.exit(1);
    }
    if (i >= WARM) {
      run.push(record.run_ms);
      trip.push(t1 - t0);
    }
  }
  run.sort((a, b) => a - b);
  trip.sort((a, b) => a - b);
  const f = (x) => x.toFixed(3);
  console.log(
    `${name}: ${run.length} jobs; run_ms p50 ${f(pct(run, 50))} p10 ${f(pct(run, 10))} p90 ${f(pct(run, 90))}; ` +
      `round trip ms p50 ${f(pct(trip, 50))} p90 ${f(pct(trip, 90))}`,
  );
}
