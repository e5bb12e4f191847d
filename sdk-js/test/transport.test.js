// The transport's pieces that need no server: the retry policy, Retry-After, the
// credentials header, error classes, function sources; and retries on a refused
// connection (a real one: a port nothing listens on).

import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import { test } from 'node:test';

import {
  apiErrorFrom,
  AuthenticationError,
  Cloudpipe,
  DEFAULT_RETRY,
  functionSource,
  JobFailedError,
  NetworkError,
  RateLimitError,
} from '../src/index.js';
import { authorization, parseRetryAfter, retryDelay } from '../src/http.js';

test('backoff doubles up to its cap, then gives up', () => {
  const d = [0, 1, 2, 3, 4].map((n) => retryDelay(DEFAULT_RETRY, n, null));
  assert.deepEqual(d, [200, 400, 800, 1600, null]);
  const many = { ...DEFAULT_RETRY, maxRetries: 40 };
  assert.equal(retryDelay(many, 39, null), 5000);
});

test('Retry-After is honoured within its limit', () => {
  assert.equal(retryDelay(DEFAULT_RETRY, 0, 3000), 3000);
  assert.equal(retryDelay(DEFAULT_RETRY, 0, 61000), null);
  assert.equal(retryDelay({ ...DEFAULT_RETRY, maxRetries: 0 }, 0, null), null);
});

test('Retry-After reads seconds and HTTP dates', () => {
  const now = Date.parse('Sun, 06 Nov 1994 08:49:37 GMT');
  assert.equal(parseRetryAfter(' 7 ', now), 7000);
  assert.equal(parseRetryAfter('Sun, 06 Nov 1994 08:49:47 GMT', now), 10000);
  assert.equal(parseRetryAfter('Sun, 06 Nov 1994 08:49:00 GMT', now), 0);
  assert.equal(parseRetryAfter('soon', now), null);
  assert.equal(parseRetryAfter(null, now), null);
});

test('credentials: Bearer for a key, Basic for an account and its key', () => {
  assert.equal(authorization('k1', undefined), 'Bearer k1');
  assert.equal(authorization('k1', 'acme'), `Basic ${btoa('acme:k1')}`);
  assert.equal(authorization(undefined, 'acme'), null);
});

test('error answers become classes carrying the API code', () => {
  const e = apiErrorFrom(401, '{"error":{"code":"unauthenticated","message":"no key"}}');
  assert.ok(e instanceof AuthenticationError);
  assert.equal(e.code, 'unauthenticated');
  assert.equal(e.serverMessage, 'no key');
  const r = apiErrorFrom(429, '{"error":{"code":"quota_exceeded","message":"slow down"}}', 2000);
  assert.ok(r instanceof RateLimitError);
  assert.equal(r.retryAfterMs, 2000);
  const html = apiErrorFrom(502, '<html>bad gateway</html>');
  assert.equal(html.code, 'http_502');
});

test('a failed job record becomes a JobFailedError with the remote stack', () => {
  const err = new JobFailedError({
    id: 'j1',
    status: 'failed',
    exit_code: 1,
    error: { kind: 'exit', message: 'exited with code 1' },
    stderr: 'log line\nUncaught TypeError: x is not a function\n    at f (function.js:1:10)\n    at g (function.js:2:3)\n',
  });
  assert.equal(err.message, 'job j1 failed: Uncaught TypeError: x is not a function');
  assert.equal(err.remoteStack, '    at f (function.js:1:10)\n    at g (function.js:2:3)');
  assert.equal(err.kind, 'exit');
});

test('function sources are what toString gives', () => {
  assert.equal(functionSource((a, b) => a + b), '(a, b) => a + b');
  assert.equal(functionSource('x => x'), 'x => x');
  assert.throws(() => functionSource(Math.max), TypeError);
  assert.throws(() => functionSource(42), TypeError);
});

/** A port on 127.0.0.1 that nothing listens on (bound, then released). */
async function closedPort() {
  const srv = createServer();
  await new Promise((r) => srv.listen(0, '127.0.0.1', r));
  const { port } = srv.address();
  await new Promise((r) => srv.close(r));
  return port;
}

test('a refused connection is retried for idempotent calls, then a NetworkError', async () => {
  const port = await closedPort();
  const cp = new Cloudpipe({
    url: `http://127.0.0.1:${port}`,
    retry: { maxRetries: 3, initialBackoffMs: 20, maxBackoffMs: 1000 },
  });
  const started = performance.now();
  await assert.rejects(cp.health(), NetworkError);
  // Three waits: 20 + 40 + 80 ms.
  assert.ok(performance.now() - started >= 140);
});

test('a refused connection is not retried for a call that is not idempotent', async () => {
  const port = await closedPort();
  const cp = new Cloudpipe({ url: `http://127.0.0.1:${port}`, retry: { initialBackoffMs: 1000 } });
  const started = performance.now();
  await assert.rejects(cp.invoke('f', { method: 'POST', body: 'x' }), NetworkError);
  assert.ok(performance.now() - started < 1000);
});
