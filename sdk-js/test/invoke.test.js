// Functions over HTTP (`/fn/{name}`) and uploads, on the real server: the JS runner is
// a command component, so the server invokes it as CGI (the request body on stdin,
// stdout the response).

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { Cloudpipe, InvokeResponse, NotFoundError, UnavailableError } from '../src/index.js';
import { ADMIN_KEY, startWithRunner } from '../testing/server.js';

let server;
let cp;
let bytes;

before(async () => {
  ({ server, cp, bytes } = await startWithRunner());
});

after(async () => {
  await server?.stop();
});

const slowCall = { source: '(ms) => new Promise((resolve) => setTimeout(() => resolve("ok"), ms))', args: [700] };

test('invoke POSTs a JSON body to a function and returns its answer', async () => {
  const res = await cp.invoke('runner-js', {
    method: 'POST',
    body: { source: '(a, b) => ({ product: a * b })', args: [6, 7] },
  });
  assert.ok(res instanceof InvokeResponse);
  assert.equal(res.status, 200);
  assert.ok(res.ok);
  assert.deepEqual(res.json(), { product: 42 });
  assert.ok(res.invocation, 'x-cloudpipe-invocation is set');
});

test("a function's failure is its answer, and throwIfError names the API code", async () => {
  const res = await cp.invoke('runner-js', { method: 'POST', body: 'not json' });
  assert.equal(res.status, 500);
  assert.equal(res.ok, false);
  assert.throws(() => res.throwIfError(), (e) => e.code === 'function_failed' && e.status === 500);
});

test('invoking a function that does not exist is a 404 with code not_found', async () => {
  const res = await cp.invoke('no-such-function', { method: 'GET', path: '/x' });
  assert.equal(res.status, 404);
  assert.throws(() => res.throwIfError(), NotFoundError);
});

test('uploads return the function info, and the same bytes are the same version', async () => {
  const a = await cp.functions.upload('runner-copy', bytes, { maxConcurrency: 1, timeoutMs: 5000 });
  const b = await cp.functions.upload('runner-copy', bytes);
  assert.equal(a.id, b.id);
  assert.match(a.id, /^sha256:[0-9a-f]{64}$/);
  assert.equal(a.kind, 'command');
  assert.equal(a.size, bytes.length);
  assert.equal(a.settings.max_concurrency, 1);
  assert.equal((await cp.functions.get('runner-copy')).settings.max_concurrency, 1, 'settings stay with the name');
  const listed = await cp.functions.list();
  assert.ok(listed.some((f) => f.name === 'runner-copy'));
});

test('past a function concurrency limit the server answers 503 and the client retries after Retry-After', async () => {
  await cp.functions.upload('runner-one', bytes, { maxConcurrency: 1 });
  const started = performance.now();
  // PUT is idempotent, so the client may send it again; both calls end with the answer.
  const [a, b] = await Promise.all([
    cp.invoke('runner-one', { method: 'PUT', body: slowCall }),
    cp.invoke('runner-one', { method: 'PUT', body: slowCall }),
  ]);
  assert.equal(a.status, 200, a.text());
  assert.equal(b.status, 200, b.text());
  assert.deepEqual([a.json(), b.json()], ['ok', 'ok']);
  // One of them waited for the other (at least the server's Retry-After of 1 s).
  assert.ok(performance.now() - started >= 1000);
});

test('without retries the 503 surfaces as UnavailableError with its Retry-After', async () => {
  await cp.functions.upload('runner-one', bytes, { maxConcurrency: 1 });
  const noRetry = new Cloudpipe({ url: server.url, apiKey: ADMIN_KEY, retry: { maxRetries: 0 } });
  const results = await Promise.allSettled([
    noRetry.invoke('runner-one', { method: 'PUT', body: slowCall }),
    noRetry.invoke('runner-one', { method: 'PUT', body: slowCall }),
  ]);
  const refused = results.filter((r) => r.status === 'rejected').map((r) => r.reason);
  assert.equal(refused.length, 1, JSON.stringify(results.map((r) => r.status)));
  assert.ok(refused[0] instanceof UnavailableError, String(refused[0]));
  assert.equal(refused[0].status, 503);
  assert.ok(refused[0].retryAfterMs >= 1000);
});
