// The transport: one `fetch` per try, the credentials, and the retry policy.
//
// A request is tried again only when it certainly did not run, or when running it
// twice is harmless:
// - 429 and 503 answers that the API itself gave (its error JSON): the server refused
//   the request before doing anything. The wait is the answer's Retry-After, or an
//   exponential backoff without one.
// - no answer at all (connection refused or reset), but only for idempotent requests:
//   reads, cancels, uploads (content-addressed) and submits (which carry an
//   idempotency key, so a second try returns the job the first one made).

import { apiErrorFrom, NetworkError } from './errors.js';

/** The retry policy's defaults; `new Cloudpipe({retry: {...}})` overrides any of them. */
export const DEFAULT_RETRY = Object.freeze({
  /** Tries after the first; 0 turns retrying off. */
  maxRetries: 4,
  initialBackoffMs: 200,
  maxBackoffMs: 5000,
  /** The longest Retry-After waited for; a longer one ends the retries. */
  maxRetryAfterMs: 60000,
});

/** The API's own refusals, which are safe to send again after a wait. */
const RETRYABLE_CODES = new Set([
  'quota_exceeded',
  'too_many_auth_failures',
  'unavailable',
  'auth_unavailable',
]);

/** Milliseconds in a Retry-After value (seconds or an HTTP date), or null. */
export function parseRetryAfter(value, now = Date.now()) {
  if (value == null) return null;
  const v = String(value).trim();
  if (/^\d+$/.test(v)) return Number(v) * 1000;
  const at = Date.parse(v);
  return Number.isNaN(at) ? null : Math.max(0, at - now);
}

/** The wait before retry `n` (from 0), or null when the policy gives up. */
export function retryDelay(policy, n, retryAfterMs) {
  if (n >= policy.maxRetries) return null;
  if (retryAfterMs != null) return retryAfterMs > policy.maxRetryAfterMs ? null : retryAfterMs;
  return Math.min(policy.initialBackoffMs * 2 ** Math.min(n, 20), policy.maxBackoffMs);
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const t = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(t);
      reject(signal.reason);
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/** `Authorization` for a key alone (Bearer) or an account and its key (Basic). */
export function authorization(apiKey, account) {
  if (!apiKey) return null;
  if (!account) return `Bearer ${apiKey}`;
  const bytes = new TextEncoder().encode(`${account}:${apiKey}`);
  let binary = '';
  for (const b of bytes) binary += String.fromCharCode(b);
  return `Basic ${btoa(binary)}`;
}

export class Transport {
  constructor({ url, apiKey, account, fetch: fetchImpl, retry }) {
    if (!url) throw new TypeError('Cloudpipe: `url` is required (e.g. "http://127.0.0.1:7070")');
    this.base = String(url).replace(/\/+$/, '');
    this.auth = authorization(apiKey, account);
    this.fetch = fetchImpl ?? globalThis.fetch?.bind(globalThis);
    if (typeof this.fetch !== 'function') {
      throw new TypeError('Cloudpipe: no global fetch (Node >= 18 or a browser); pass `fetch`');
    }
    this.retry = { ...DEFAULT_RETRY, ...(retry ?? {}) };
  }

  url(path, query) {
    let u = this.base + path;
    if (query) {
      const q = new URLSearchParams();
      for (const [k, v] of Object.entries(query)) if (v != null) q.set(k, String(v));
      const s = q.toString();
      if (s) u += (u.includes('?') ? '&' : '?') + s;
    }
    return u;
  }

  /**
   * Sends a request and returns the `Response` of its last try. API error answers
   * throw (`ApiError` subclasses) unless `raw` is set, in which case only the API's
   * retryable refusals are handled here and every other answer is returned as is.
   */
  async request(method, path, { query, body, headers, idempotent = false, raw = false, signal } = {}) {
    const h = new Headers(headers ?? {});
    if (this.auth && !h.has('authorization')) h.set('authorization', this.auth);
    const url = this.url(path, query);
    for (let n = 0; ; n++) {
      let res;
      try {
        res = await this.fetch(url, { method, headers: h, body, signal });
      } catch (e) {
        if (signal?.aborted) throw signal.reason ?? e;
        const delay = idempotent ? retryDelay(this.retry, n, null) : null;
        if (delay == null) {
          throw new NetworkError(`${method} ${url}: ${e?.cause?.message ?? e?.message ?? e}`, { cause: e });
        }
        await sleep(delay, signal);
        continue;
      }
      if (res.ok || (raw && res.status !== 429 && res.status !== 503)) return res;
      const bytes = new Uint8Array(await res.arrayBuffer());
      const text = new TextDecoder().decode(bytes);
      const retryAfterMs = parseRetryAfter(res.headers.get('retry-after'));
      const error = apiErrorFrom(res.status, text, retryAfterMs);
      if ((res.status === 429 || res.status === 503) && RETRYABLE_CODES.has(error.code)) {
        const delay = retryDelay(this.retry, n, retryAfterMs);
        if (delay != null) {
          await sleep(delay, signal);
          continue;
        }
      }
      if (raw && !RETRYABLE_CODES.has(error.code)) {
        // Not the API's refusal: the function's own 429/503, handed back as it came.
        return new Response(bytes, { status: res.status, statusText: res.statusText, headers: res.headers });
      }
      throw error;
    }
  }

  /** `request` and the answer's JSON. */
  async json(method, path, options = {}) {
    const { json, ...rest } = options;
    if (json !== undefined) {
      rest.body = JSON.stringify(json);
      rest.headers = { 'content-type': 'application/json', ...(rest.headers ?? {}) };
    }
    const res = await this.request(method, path, rest);
    return res.json();
  }
}
