// Jobs of JS functions on the real server and the real runner.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { JobFailedError, Job, NotFoundError } from '../src/index.js';
import { startWithRunner } from '../testing/server.js';

let server;
let cp;

before(async () => {
  ({ server, cp } = await startWithRunner());
});

after(async () => {
  await server?.stop();
});

describe('closures', () => {
  test('a closure with arguments returns its result', async () => {
    const job = await cp.submit((a, b) => a + b, 3, 4);
    assert.ok(job instanceof Job);
    assert.match(job.id, /^[0-9a-f-]{36}$/);
    assert.equal(await job.result(), 7);
    assert.equal(job.status, 'succeeded');
    assert.equal(job.record.exit_code, 0);
  });

  test('arguments and results travel as JSON, objects and arrays included', async () => {
    const result = await cp.run(
      (person, xs) => ({ name: person.name.toUpperCase(), sum: xs.reduce((s, x) => s + x, 0), none: undefined }),
      { name: 'ada' },
      [1, 2, 3, 4],
    );
    assert.deepEqual(result, { name: 'ADA', sum: 10 });
  });

  test('a function returning undefined gives null', async () => {
    assert.equal(await cp.run(() => {}), null);
  });

  test('named functions, methods in shorthand and source text all run', async () => {
    function fib(n) {
      return n < 2 ? n : fib(n - 1) + fib(n - 2);
    }
    assert.equal(await cp.run(fib, 20), 6765);
    const obj = {
      double(x) {
        return x * 2;
      },
    };
    assert.equal(await cp.run(obj.double, 21), 42);
    assert.equal(await cp.run('(s) => s.split("").reverse().join("")', 'abc'), 'cba');
  });

  test('variables closed over do not travel: the function sees only its arguments', async () => {
    const secret = 41;
    const err = await cp.run(() => secret + 1).catch((e) => e);
    assert.ok(err instanceof JobFailedError);
    assert.match(err.message, /ReferenceError: .*secret/);
  });

  test('native and bound functions are refused before anything is sent', async () => {
    await assert.rejects(cp.submit(Math.max, 1, 2), TypeError);
    await assert.rejects(cp.submit(((a) => a).bind(null), 1), TypeError);
  });

  test('Math.random differs between jobs', async () => {
    const [a, b] = await Promise.all([cp.run(() => Math.random()), cp.run(() => Math.random())]);
    assert.notEqual(a, b);
  });
});

describe('async closures', () => {
  test('an async closure is awaited, timers included', async () => {
    const result = await cp.run(async (ms, label) => {
      const started = Date.now();
      await new Promise((resolve) => setTimeout(resolve, ms));
      return { label, waited: Date.now() - started >= ms };
    }, 50, 'late');
    assert.deepEqual(result, { label: 'late', waited: true });
  });

  test('promise chains and intervals settle', async () => {
    const result = await cp.run(
      () =>
        new Promise((resolve) => {
          let n = 0;
          const id = setInterval(() => {
            n += 1;
            if (n === 3) {
              clearInterval(id);
              resolve(n);
            }
          }, 5);
        }).then((n) => n * 10),
    );
    assert.equal(result, 30);
  });

  test('a promise that can never settle fails the job', async () => {
    const err = await cp.run(() => new Promise(() => {})).catch((e) => e);
    assert.ok(err instanceof JobFailedError);
    assert.match(err.message, /never settled/);
  });
});

describe('errors', () => {
  test('a thrown error rejects with its type, message and remote stack', async () => {
    function explode(n) {
      throw new RangeError(`bad value ${n}`);
    }
    const err = await cp.run(explode, 42).catch((e) => e);
    assert.ok(err instanceof JobFailedError, String(err));
    assert.equal(err.status, 'failed');
    assert.equal(err.exitCode, 1);
    assert.equal(err.kind, 'exit');
    assert.match(err.message, /Uncaught RangeError: bad value 42/);
    assert.match(err.remoteStack, /at explode \(function\.js:\d+:\d+\)/);
    assert.match(err.stderr, /RangeError: bad value 42/);
  });

  test('an async rejection rejects too, with console output kept in stderr', async () => {
    const err = await cp
      .run(async () => {
        console.log('about to fail', { step: 1 });
        await null;
        throw new TypeError('async failure');
      })
      .catch((e) => e);
    assert.ok(err instanceof JobFailedError);
    assert.match(err.message, /TypeError: async failure/);
    assert.match(err.stderr, /^about to fail \{"step":1\}$/m);
  });

  test('a thrown non-error value is reported as such', async () => {
    const err = await cp
      .run(() => {
        throw { reason: 'plain object' };
      })
      .catch((e) => e);
    assert.ok(err instanceof JobFailedError);
    assert.match(err.message, /Uncaught \{"reason":"plain object"\}/);
  });

  test('source that is not a function fails with exit code 2', async () => {
    const err = await cp.run('(a, b) =>').catch((e) => e);
    assert.ok(err instanceof JobFailedError);
    assert.equal(err.exitCode, 2);
    assert.match(err.stderr, /not a function expression: SyntaxError/);
  });

  test('a runner that does not exist is a NotFoundError with the API code', async () => {
    const err = await cp.with({ runner: 'no-such-runner' }).submit(() => 1).catch((e) => e);
    assert.ok(err instanceof NotFoundError, String(err));
    assert.equal(err.status, 404);
    assert.equal(err.code, 'not_found');
  });
});

describe('limits', () => {
  test('a busy loop past its timeout ends timed_out', async () => {
    const started = Date.now();
    const err = await cp
      .with({ timeoutMs: 300 })
      .run(() => {
        for (;;) {
          /* spin */
        }
      })
      .catch((e) => e);
    assert.ok(err instanceof JobFailedError, String(err));
    assert.equal(err.status, 'timed_out');
    assert.equal(err.kind, 'timeout');
    assert.ok(Date.now() - started < 10000);
  });

  test('a timer past the timeout ends timed_out', async () => {
    const err = await cp
      .with({ timeoutMs: 300 })
      .run(() => new Promise((resolve) => setTimeout(resolve, 60000)))
      .catch((e) => e);
    assert.ok(err instanceof JobFailedError);
    assert.equal(err.status, 'timed_out');
  });

  test('allocating past the memory cap fails with memory_limit', async () => {
    const err = await cp
      .with({ memoryMb: 16 })
      .run(() => {
        const keep = [];
        for (;;) keep.push(new Array(10000).fill(1));
      })
      .catch((e) => e);
    assert.ok(err instanceof JobFailedError);
    assert.equal(err.status, 'failed');
    assert.equal(err.kind, 'memory_limit');
  });
});

describe('following jobs', () => {
  test('events stream live output and end with the terminal record', async () => {
    const job = await cp.submit(async () => {
      for (let i = 0; i < 5; i++) {
        console.log(`tick ${i}`);
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
      return 'done';
    });
    const events = [];
    for await (const ev of job.events()) events.push(ev);
    const last = events.at(-1);
    assert.equal(last.event, 'status');
    assert.equal(last.status, 'succeeded');
    assert.equal(last.record.stdout, '"done"\n');
    const live = events.filter((e) => e.event === 'stderr').map((e) => e.data).join('');
    // The stream follows from when it opened: the last lines arrive live.
    assert.match(live, /tick 4/);
    assert.match(last.record.stderr, /tick 0\ntick 1\ntick 2\ntick 3\ntick 4\n/);
    assert.equal(await job.result(), 'done');
  });

  test('cancel stops a running job', async () => {
    const job = await cp.submit(() => new Promise((resolve) => setTimeout(resolve, 60000)));
    for await (const ev of job.events()) {
      if (ev.event === 'status' && ev.status === 'running') break;
    }
    const record = await job.cancel();
    assert.ok(['cancelled', 'running'].includes(record.status));
    const err = await job.result().catch((e) => e);
    assert.ok(err instanceof JobFailedError);
    assert.equal(err.status, 'cancelled');
  });

  test('jobs.list filters by tag and pages with a cursor', async () => {
    const tag = `sdk-list-${Date.now()}`;
    const tagged = cp.with({ tags: [tag] });
    const ids = [];
    for (let i = 0; i < 3; i++) ids.push((await tagged.submit((x) => x, i)).id);
    const first = await cp.jobs.list({ tag, limit: 2 });
    assert.equal(first.jobs.length, 2);
    assert.ok(first.nextCursor);
    const second = await cp.jobs.list({ tag, limit: 2, cursor: first.nextCursor });
    const seen = [...first.jobs, ...second.jobs].map((j) => j.id).sort();
    assert.deepEqual(seen, [...ids].sort());
    const one = await cp.jobs.get(ids[0]);
    assert.equal(await one.result(), 0);
  });
});

describe('map', () => {
  test('map over 1,000 items returns every result in order', async (t) => {
    const items = Array.from({ length: 1000 }, (_, i) => i);
    const started = performance.now();
    const results = await cp.map((x) => ({ x, square: x * x }), items, { concurrency: 32 });
    const ms = performance.now() - started;
    assert.equal(results.length, 1000);
    results.forEach((r, i) => assert.deepEqual(r, { x: i, square: i * i }));
    t.diagnostic(`map: 1000 jobs in ${ms.toFixed(0)} ms (${((1000 / ms) * 1000).toFixed(0)} jobs/s)`);
  });

  test('map rejects with the first failure and its index', async () => {
    const err = await cp
      .map(
        (x) => {
          if (x === 7) throw new Error('seven');
          return x;
        },
        Array.from({ length: 20 }, (_, i) => i),
        { concurrency: 4 },
      )
      .catch((e) => e);
    assert.ok(err instanceof JobFailedError);
    assert.equal(err.index, 7);
    assert.match(err.message, /Error: seven/);
  });
});
