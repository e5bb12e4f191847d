// @cloudpipe/sdk: the JavaScript client of Cloudpipe, for Node >= 18 and browsers.
//
//   import { Cloudpipe } from '@cloudpipe/sdk';
//   const cp = new Cloudpipe({ url: 'http://127.0.0.1:7070', apiKey: process.env.CLOUDPIPE_API_KEY });
//   const job = await cp.submit((a, b) => a + b, 3, 4);   // ships the function's source
//   console.log(await job.result());                      // 7
//
// Layout: `Cloudpipe` (this file) holds the transport and makes `Job`s; `http.js` is
// the transport and its retry policy, `sse.js` the event-stream reader, `errors.js`
// the error classes.

import { Transport, parseRetryAfter } from './http.js';
import { readEvents } from './sse.js';
import { apiErrorFrom, ResultError, JobFailedError, CloudpipeError } from './errors.js';

export * from './errors.js';
export { DEFAULT_RETRY } from './http.js';

/** How long one long-poll asks the server to hold (the server caps it at its own maximum). */
const POLL_WAIT = '30s';

/**
 * How long `submit` lets the server hold its answer: the server's fast-path window. A
 * job that ends within it comes back finished from a single commit (so `result()`
 * sends nothing more); a longer one is acknowledged, written `running`, when the
 * window closes.
 */
const SUBMIT_WAIT = '5ms';

const TERMINAL = new Set(['succeeded', 'failed', 'timed_out', 'cancelled']);

/** True once a job status will not change any more. */
export function isTerminal(status) {
  return TERMINAL.has(status);
}

/** The JS source of `fn` (a function, or source text), refusing what cannot travel. */
export function functionSource(fn) {
  if (typeof fn === 'string') return fn;
  if (typeof fn !== 'function') {
    throw new TypeError(`Cloudpipe: expected a function or its source, got ${typeof fn}`);
  }
  const source = Function.prototype.toString.call(fn);
  if (/\{\s*\[native code\]\s*\}\s*$/.test(source)) {
    throw new TypeError(
      'Cloudpipe: a native or bound function has no source to send; pass a function written in JS',
    );
  }
  return source;
}

function randomKey() {
  const c = globalThis.crypto;
  if (c?.randomUUID) return c.randomUUID();
  const bytes = new Uint8Array(16);
  if (c?.getRandomValues) c.getRandomValues(bytes);
  // Without Web Crypto (Node 18 without the global): the key only has to be unique
  // among this account's submits, which Math.random's 128 bits here give in practice.
  else for (let i = 0; i < 16; i++) bytes[i] = Math.floor(Math.random() * 256);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/** Job options (camelCase) to the job spec's fields. */
function specFields(o) {
  const spec = {};
  if (o.timeoutMs != null) spec.timeout_ms = o.timeoutMs;
  if (o.memoryMb != null) spec.memory_mb = o.memoryMb;
  if (o.tags != null && o.tags.length > 0) spec.tags = [...o.tags];
  if (o.maxAttempts != null) spec.max_attempts = o.maxAttempts;
  return spec;
}

const JOB_OPTIONS = ['timeoutMs', 'memoryMb', 'tags', 'maxAttempts', 'runner'];

/** A client of one Cloudpipe server. Make one per server and keep it. */
export class Cloudpipe {
  /**
   * @param {object} options
   * @param {string} options.url        the server, e.g. `http://127.0.0.1:7070`
   * @param {string} [options.apiKey]   sent as `Authorization: Bearer KEY`
   * @param {string} [options.account]  with `apiKey`: sent as Basic `account:key` instead
   * @param {string} [options.runner]   the function that runs JS jobs (default the built-in `runner:js`)
   * @param {object} [options.retry]    overrides of `DEFAULT_RETRY`
   * @param {Function} [options.fetch]  a `fetch` to use instead of the global one
   * @param {object} [options.job]      defaults of every job: `timeoutMs`, `memoryMb`, `tags`, `maxAttempts`
   */
  constructor(options = {}) {
    const { url, apiKey, account, fetch, retry, runner = 'runner:js', job = {} } = options;
    this._t = options._transport ?? new Transport({ url, apiKey, account, fetch, retry });
    this._job = { runner, ...job };
    this.functions = new Functions(this._t);
    this.jobs = new Jobs(this);
    this.secrets = new Secrets(this._t);
  }

  /** The server's URL. */
  get url() {
    return this._t.base;
  }

  /** The name of the function that runs JS jobs. */
  get runner() {
    return this._job.runner;
  }

  /**
   * The same client with these job options (`timeoutMs`, `memoryMb`, `tags`,
   * `maxAttempts`, `runner`) for every job it submits:
   * `cp.with({ timeoutMs: 500 }).submit(fn)`.
   */
  with(jobOptions) {
    for (const k of Object.keys(jobOptions)) {
      if (!JOB_OPTIONS.includes(k)) throw new TypeError(`Cloudpipe.with: unknown option ${k}`);
    }
    return new Cloudpipe({ _transport: this._t, job: { ...this._job, ...jobOptions } });
  }

  /**
   * Submits `fn(...args)` as a job and returns its `Job` once it is durable (within
   * a few milliseconds: a job that ends that soon comes back already finished). `fn`
   * travels as source: it sees its arguments and the runner's globals, not variables
   * it closed over. `args` travel as JSON.
   */
  async submit(fn, ...args) {
    return this._submit(fn, args, { wait: SUBMIT_WAIT, keyed: true });
  }

  /** Submits `fn(...args)` and waits for its result: `await cp.run((a, b) => a + b, 3, 4)` is 7. */
  async run(fn, ...args) {
    const job = await this._submit(fn, args, { wait: POLL_WAIT, keyed: true });
    return job.result();
  }

  /**
   * Runs `fn(item)` for every item as jobs, at most `concurrency` at once, and
   * returns the results in the items' order. The first failure rejects (its error
   * carries `index`); no new job starts after it.
   */
  async map(fn, items, { concurrency = 16, signal } = {}) {
    const source = functionSource(fn);
    const list = Array.from(items);
    const results = new Array(list.length);
    let next = 0;
    let failed = null;
    const worker = async () => {
      while (failed === null && next < list.length) {
        const i = next++;
        try {
          signal?.throwIfAborted();
          const job = await this._submit(source, [list[i]], { wait: POLL_WAIT, keyed: true, signal });
          results[i] = await job.result({ signal });
        } catch (e) {
          if (failed === null) {
            if (e instanceof Error) e.index = i;
            failed = e;
          }
        }
      }
    };
    const n = Math.max(1, Math.min(concurrency, list.length));
    await Promise.all(Array.from({ length: n }, worker));
    if (failed !== null) throw failed;
    return results;
  }

  /**
   * `keyed`: send an idempotency key, so that a try repeated after a lost answer
   * returns the job the first try made. With a `wait`, the server still runs a short
   * job before its first write and commits it once, finished, the key in the same
   * commit.
   */
  async _submit(fn, args, { wait = null, keyed = false, signal } = {}) {
    const { runner, ...jobOptions } = this._job;
    const spec = {
      function: runner,
      stdin: JSON.stringify({ source: functionSource(fn), args }),
      ...specFields(jobOptions),
    };
    if (keyed) spec.idempotency_key = randomKey();
    const record = await this._t.json('POST', '/v1/jobs', {
      query: wait ? { wait } : undefined,
      json: spec,
      idempotent: true,
      signal,
    });
    return new Job(this._t, record);
  }

  /**
   * Sends an HTTP request to a function's endpoint (`/fn/{name}{path}`) and returns
   * its answer, whatever its status (as `fetch` does; `throwIfError()` turns the
   * API's error answers into errors). `body` may be a string, bytes, a Blob, or any
   * other value, sent as JSON.
   */
  async invoke(name, { method = 'GET', path = '', query, body, headers, signal } = {}) {
    const h = new Headers(headers ?? {});
    let payload = body;
    if (
      body != null &&
      typeof body !== 'string' &&
      !(body instanceof Uint8Array) &&
      !(body instanceof ArrayBuffer) &&
      !(typeof Blob !== 'undefined' && body instanceof Blob)
    ) {
      payload = JSON.stringify(body);
      if (!h.has('content-type')) h.set('content-type', 'application/json');
    }
    const p = path === '' || path.startsWith('/') ? path : `/${path}`;
    const m = method.toUpperCase();
    const res = await this._t.request(m, `/fn/${encodeURIComponent(name)}${p}`, {
      query,
      body: payload,
      headers: h,
      idempotent: ['GET', 'HEAD', 'PUT', 'DELETE', 'OPTIONS'].includes(m),
      raw: true,
      signal,
    });
    return new InvokeResponse(res.status, res.headers, new Uint8Array(await res.arrayBuffer()));
  }

  /** Who the key belongs to and the limits in force (`/v1/me`): `{account, role, quotas, active_jobs, function_bytes}`. */
  async me({ signal } = {}) {
    return this._t.json('GET', '/v1/me', { idempotent: true, signal });
  }

  /** The server's `/healthz`. */
  async health() {
    return this._t.json('GET', '/healthz', { idempotent: true });
  }
}

/** A function's answer to `invoke`. */
export class InvokeResponse {
  constructor(status, headers, body) {
    this.status = status;
    this.ok = status >= 200 && status < 300;
    this.headers = headers;
    /** The body's bytes. */
    this.body = body;
  }

  /** The invocation's id (`x-cloudpipe-invocation`), which names it in the function's log. */
  get invocation() {
    return this.headers.get('x-cloudpipe-invocation');
  }

  text() {
    return new TextDecoder().decode(this.body);
  }

  json() {
    return JSON.parse(this.text());
  }

  /** `this` for a status below 400; otherwise the matching `ApiError`. */
  throwIfError() {
    if (this.status < 400) return this;
    throw apiErrorFrom(this.status, this.text(), parseRetryAfter(this.headers.get('retry-after')));
  }
}

/** One job: its id, its last known record, and the ways to follow it. */
export class Job {
  constructor(transport, record) {
    this._t = transport;
    /** The job's record as last seen (snake_case, as the API sends it). */
    this.record = record;
  }

  get id() {
    return this.record.id;
  }

  /** The status as last seen: `queued`, `running`, `succeeded`, `failed`, `timed_out`, `cancelled`. */
  get status() {
    return this.record.status;
  }

  _path(suffix = '') {
    return `/v1/jobs/${encodeURIComponent(this.id)}${suffix}`;
  }

  /** Reads the record again. */
  async refresh({ signal } = {}) {
    this.record = await this._t.json('GET', this._path(), { idempotent: true, signal });
    return this.record;
  }

  /** Waits (long-polling) until the job ends and returns its final record. */
  async wait({ signal } = {}) {
    while (!isTerminal(this.record.status)) {
      this.record = await this._t.json('GET', this._path('/result'), {
        query: { wait: POLL_WAIT },
        idempotent: true,
        signal,
      });
    }
    return this.record;
  }

  /**
   * Waits until the job ends and returns the function's result (its stdout parsed as
   * JSON). A job that did not succeed rejects with `JobFailedError` (its stderr, exit
   * code, error kind and, for the JS runner, the remote error's message and stack).
   */
  async result({ signal } = {}) {
    const record = await this.wait({ signal });
    if (record.status !== 'succeeded') throw new JobFailedError(record);
    if (record.stdout_truncated) {
      throw new ResultError(`job ${record.id}: its output went past the server's output cap`, record);
    }
    const text = record.stdout.trim();
    if (text === '') return undefined;
    try {
      return JSON.parse(text);
    } catch (e) {
      throw new ResultError(`job ${record.id}: stdout is not JSON: ${e.message}`, record);
    }
  }

  /**
   * The job's server-sent events, as an async iterator of the API's `JobEvent`s:
   * `{event: 'status', status, record}` (the last one carries the terminal status and
   * the full record), `{event: 'stdout', data}`, `{event: 'stderr', data}`. Ends after
   * the terminal status; `break` closes the stream.
   */
  async *events({ signal } = {}) {
    for (let attempt = 0; ; attempt++) {
      const res = await this._t.request('GET', this._path('/events'), {
        headers: { accept: 'text/event-stream' },
        idempotent: true,
        signal,
      });
      if (!res.body) throw new CloudpipeError('the event stream has no body (this fetch cannot stream)');
      for await (const ev of readEvents(res.body)) {
        let data;
        try {
          data = JSON.parse(ev.data);
        } catch {
          continue;
        }
        if (data.event === undefined) data.event = ev.event;
        if (data.event === 'status') {
          if (data.record) this.record = data.record;
          else this.record = { ...this.record, status: data.status };
        }
        yield data;
        if (data.event === 'status' && isTerminal(data.status)) return;
      }
      // The stream ended before the job did (the server restarted, a proxy cut it):
      // the record tells where it is; follow again if it is still going.
      await this.refresh({ signal });
      if (isTerminal(this.record.status)) {
        yield { event: 'status', status: this.record.status, record: this.record };
        return;
      }
      if (attempt >= this._t.retry.maxRetries) {
        throw new CloudpipeError(`job ${this.id}: the event stream kept ending before the job`);
      }
    }
  }

  /** Cancels the job (a queued one at once, a running one within a moment) and returns its record. */
  async cancel({ signal } = {}) {
    this.record = await this._t.json('POST', this._path('/cancel'), { idempotent: true, signal });
    return this.record;
  }
}

/** `cp.jobs`: listing and looking up jobs. */
class Jobs {
  constructor(client) {
    this._c = client;
  }

  /**
   * One page of jobs, newest first: `{jobs: Job[], nextCursor}`. The filter's fields
   * (`status`, `tag`, `function`, `account` (the admin only; others see their own),
   * `limit` 1–1000, `cursor`) each narrow the list. Listed jobs come without stdout
   * and stderr unless `includeOutput` is set (a page with output ends early, with a
   * `nextCursor`, once it holds 16 MiB of output).
   */
  async list({ status, tag, function: fn, account, limit, cursor, includeOutput, signal } = {}) {
    const t = this._c._t;
    const page = await t.json('GET', '/v1/jobs', {
      query: { status, tag, function: fn, account, limit, cursor, include: includeOutput ? 'output' : undefined },
      idempotent: true,
      signal,
    });
    return { jobs: page.jobs.map((r) => new Job(t, r)), nextCursor: page.next_cursor ?? null };
  }

  /** The job with this id. */
  async get(id, { signal } = {}) {
    const t = this._c._t;
    return new Job(t, await t.json('GET', `/v1/jobs/${encodeURIComponent(id)}`, { idempotent: true, signal }));
  }
}

/** Function settings (camelCase) to the upload's query parameters. */
function settingsQuery(s = {}) {
  return {
    timeout_ms: s.timeoutMs,
    memory_mb: s.memoryMb,
    max_concurrency: s.maxConcurrency,
    public: s.public,
    allowed_outbound_hosts: s.allowedOutboundHosts?.join(','),
  };
}

/**
 * `cp.secrets`: the account's write-only secrets. A value goes in and never comes
 * back; jobs and functions name a secret in their env as `{ secret: 'name' }`
 * (`cp.functions.update('f', { env: { TOKEN: { secret: 'api-token' } } })`).
 */
class Secrets {
  constructor(transport) {
    this._t = transport;
  }

  /** Creates or replaces a secret; returns its name and times (never the value). */
  async put(name, value, { signal } = {}) {
    return this._t.json('PUT', `/v1/secrets/${encodeURIComponent(name)}`, {
      json: { value },
      idempotent: true,
      signal,
    });
  }

  /** The account's secrets: names and times. */
  async list({ signal } = {}) {
    return (await this._t.json('GET', '/v1/secrets', { idempotent: true, signal })).secrets;
  }

  /** Deletes a secret. */
  async delete(name, { signal } = {}) {
    await this._t.request('DELETE', `/v1/secrets/${encodeURIComponent(name)}`, { idempotent: true, signal });
  }
}

/** `cp.functions`: uploading and managing functions (Wasm binaries). */
class Functions {
  constructor(transport) {
    this._t = transport;
  }

  /**
   * Uploads a Wasm binary (Uint8Array, ArrayBuffer or Blob) under `name` and returns
   * its info. `settings`: `timeoutMs`, `memoryMb`, `maxConcurrency`, `public`,
   * `allowedOutboundHosts` (the name's settings, kept across versions).
   */
  async upload(name, bytes, settings = {}, { signal } = {}) {
    return this._t.json('POST', '/v1/functions', {
      query: { name, ...settingsQuery(settings) },
      body: bytes,
      headers: { 'content-type': 'application/wasm' },
      // Content-addressed: the same bytes again are the same version.
      idempotent: true,
      signal,
    });
  }

  /** The named functions. */
  async list({ signal } = {}) {
    return (await this._t.json('GET', '/v1/functions', { idempotent: true, signal })).functions;
  }

  /** A function by name or id (`sha256:…`). */
  async get(name, { signal } = {}) {
    return this._t.json('GET', `/v1/functions/${encodeURIComponent(name)}`, { idempotent: true, signal });
  }

  /** Changes a name's settings (the API's snake_case fields: `env`, `timeout_ms`, …). */
  async update(name, patch, { signal } = {}) {
    return this._t.json('PATCH', `/v1/functions/${encodeURIComponent(name)}`, { json: patch, signal });
  }

  /** Deletes a name and its versions, or one version by id; returns what was deleted. */
  async delete(name, { signal } = {}) {
    const r = await this._t.json('DELETE', `/v1/functions/${encodeURIComponent(name)}`, {
      idempotent: true,
      signal,
    });
    return r.functions;
  }
}
