// Error classes of @cloudpipe/sdk.
//
//   CloudpipeError                 base of everything the SDK throws on purpose
//   ├─ ApiError                    the server answered `{"error": {"code", "message"}}`
//   │  ├─ BadRequestError          400
//   │  ├─ AuthenticationError      401 (no key, or a key the server does not know)
//   │  ├─ PermissionError          403
//   │  ├─ NotFoundError            404
//   │  ├─ ConflictError            409
//   │  ├─ PayloadTooLargeError     413
//   │  ├─ RateLimitError           429 (quota exceeded, too many failed logins)
//   │  └─ UnavailableError         503 (overloaded, shutting down)
//   ├─ NetworkError                no answer at all (connection refused, reset, DNS)
//   ├─ JobFailedError              a job ended other than `succeeded`
//   └─ ResultError                 a job succeeded but its stdout is not a JSON result

/** Base class of every error the SDK throws on purpose. */
export class CloudpipeError extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** The server answered with an error: `status` and the API's stable `code`. */
export class ApiError extends CloudpipeError {
  constructor(status, code, message, { retryAfterMs = null, body = null } = {}) {
    super(`${message} (HTTP ${status}, ${code})`);
    /** HTTP status. */
    this.status = status;
    /** The API's machine-readable code, e.g. `not_found`, `invalid_request`. */
    this.code = code;
    /** The server's message, without the status and code. */
    this.serverMessage = message;
    /** Milliseconds the server asked to wait (`Retry-After`), if it did. */
    this.retryAfterMs = retryAfterMs;
    /** The raw error body. */
    this.body = body;
  }
}

export class BadRequestError extends ApiError {}
export class AuthenticationError extends ApiError {}
export class PermissionError extends ApiError {}
export class NotFoundError extends ApiError {}
export class ConflictError extends ApiError {}
export class PayloadTooLargeError extends ApiError {}
export class RateLimitError extends ApiError {}
export class UnavailableError extends ApiError {}

const BY_STATUS = new Map([
  [400, BadRequestError],
  [401, AuthenticationError],
  [403, PermissionError],
  [404, NotFoundError],
  [409, ConflictError],
  [413, PayloadTooLargeError],
  [429, RateLimitError],
  [503, UnavailableError],
]);

/**
 * The error for a non-2xx answer. `text` is the body; a body that is not the API's
 * error JSON (a proxy's HTML page, say) gives the code `http_<status>`.
 */
export function apiErrorFrom(status, text, retryAfterMs = null) {
  let code = `http_${status}`;
  let message = text ? text.slice(0, 500) : `HTTP ${status}`;
  let body = null;
  try {
    body = JSON.parse(text);
    if (body && body.error && typeof body.error.code === 'string') {
      code = body.error.code;
      message = String(body.error.message ?? '');
    }
  } catch {
    // not JSON: keep the text
  }
  const Class = BY_STATUS.get(status) ?? ApiError;
  return new Class(status, code, message, { retryAfterMs, body });
}

/** The request got no answer: the connection failed or broke. */
export class NetworkError extends CloudpipeError {}

/**
 * A job ended `failed`, `timed_out` or `cancelled`. For the JS runner, `message` is
 * the uncaught error (`Uncaught TypeError: …`) and `remoteStack` its stack, as the
 * runner printed them.
 */
export class JobFailedError extends CloudpipeError {
  constructor(record) {
    const stderr = record.stderr ?? '';
    const uncaught = lastUncaught(stderr);
    const headline =
      uncaught?.headline ??
      (record.error ? `${record.error.kind}: ${record.error.message}` : `job ${record.status}`);
    super(`job ${record.id} ${record.status}: ${headline}`);
    /** The job's id. */
    this.jobId = record.id;
    /** `failed`, `timed_out` or `cancelled`. */
    this.status = record.status;
    /** The guest's exit code, when it exited. */
    this.exitCode = record.exit_code ?? null;
    /** The server's error kind: `exit`, `trap`, `timeout`, `memory_limit`, `cancelled`, … */
    this.kind = record.error?.kind ?? null;
    /** The server's error message. */
    this.errorMessage = record.error?.message ?? null;
    /** Everything the job wrote to stderr (its console output and the error). */
    this.stderr = stderr;
    /** The remote error's stack frames (`    at f (function.js:1:20)` lines), if any. */
    this.remoteStack = uncaught?.stack ?? null;
    /** The full job record. */
    this.record = record;
  }
}

/** The job succeeded, but its stdout is not the JSON result the runner writes. */
export class ResultError extends CloudpipeError {
  constructor(message, record) {
    super(message);
    this.jobId = record.id;
    this.stdout = record.stdout;
    this.record = record;
  }
}

/** The runner's report of an uncaught error: `Uncaught NAME: message` then `    at …` lines. */
function lastUncaught(stderr) {
  const at = stderr.lastIndexOf('Uncaught ');
  if (at < 0) return null;
  const lines = stderr.slice(at).replace(/\n+$/, '').split('\n');
  const frames = [];
  let i = 1;
  const head = [lines[0]];
  // A message may span lines; the frames start at the first `    at ` line.
  while (i < lines.length && !/^\s+at /.test(lines[i])) head.push(lines[i++]);
  while (i < lines.length && /^\s+at /.test(lines[i])) frames.push(lines[i++]);
  return { headline: head.join('\n'), stack: frames.length ? frames.join('\n') : null };
}
