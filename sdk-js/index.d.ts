// Types of @cloudpipe/sdk (hand-written; the wire types follow api/openapi.json).

// ---- wire types (snake_case, as the API sends them) --------------------------------

export type JobStatus = 'queued' | 'running' | 'succeeded' | 'failed' | 'timed_out' | 'cancelled';

export interface JobErrorInfo {
  /** `exit`, `trap`, `memory_limit`, `timeout`, `cancelled`, `function_not_found`, `attempts_exhausted`, `internal`. */
  kind: string;
  message: string;
}

export interface JobRecord {
  id: string;
  account?: string;
  function: string;
  function_id?: string;
  status: JobStatus;
  exit_code?: number;
  stdout: string;
  stderr: string;
  stdout_truncated: boolean;
  stderr_truncated: boolean;
  error?: JobErrorInfo;
  attempts: number;
  max_attempts: number;
  tags?: string[];
  created_at: string;
  started_at?: string;
  finished_at?: string;
  queue_ms?: number;
  run_ms?: number;
  executor: string;
}

export type JobEvent =
  | { event: 'status'; status: JobStatus; record: JobRecord | null }
  | { event: 'stdout'; data: string }
  | { event: 'stderr'; data: string };

export interface FunctionSettings {
  env: Record<string, EnvValue>;
  timeout_ms: number;
  memory_mb: number;
  max_concurrency: number;
  public: boolean;
  allowed_outbound_hosts: string[];
}

export interface FunctionInfo {
  id: string;
  account?: string;
  name?: string;
  kind: 'command' | 'module' | 'http';
  size: number;
  created_at: string;
  settings: FunctionSettings;
}

export interface Health {
  status: string;
  version: string;
  store: string;
}

export interface Quotas {
  max_concurrent_jobs?: number | null;
  max_timeout_ms?: number | null;
  max_memory_mb?: number | null;
  max_function_bytes?: number | null;
  max_finished_jobs?: number | null;
}

export interface Me {
  account: string;
  role: 'admin' | 'user';
  /** Limits in force (`null`: none). */
  quotas: Quotas;
  /** Jobs queued or running now. */
  active_jobs: number;
  /** Bytes of function versions stored. */
  function_bytes: number;
}

// ---- options ------------------------------------------------------------------------

export interface RetryPolicy {
  /** Tries after the first; 0 turns retrying off. Default 4. */
  maxRetries: number;
  /** Default 200. */
  initialBackoffMs: number;
  /** Default 5000. */
  maxBackoffMs: number;
  /** The longest Retry-After waited for; a longer one ends the retries. Default 60000. */
  maxRetryAfterMs: number;
}

export declare const DEFAULT_RETRY: Readonly<RetryPolicy>;

export interface JobOptions {
  /** Wall-clock limit of one attempt; the server's default when absent. */
  timeoutMs?: number;
  /** Linear memory cap in MiB; the server's default when absent. */
  memoryMb?: number;
  tags?: string[];
  /** How many times the job may be started in all (server default 3). */
  maxAttempts?: number;
  /** The function that runs JS jobs (default the built-in `runner:js`). */
  runner?: string;
}

export interface CloudpipeOptions {
  /** The server, e.g. `http://127.0.0.1:7070`. */
  url: string;
  /** Sent as `Authorization: Bearer KEY`. */
  apiKey?: string;
  /** With `apiKey`: sent as Basic `account:key` instead. */
  account?: string;
  /** The function that runs JS jobs (default the built-in `runner:js`). */
  runner?: string;
  retry?: Partial<RetryPolicy>;
  /** A `fetch` to use instead of the global one. */
  fetch?: typeof fetch;
  /** Defaults of every job this client submits. */
  job?: Omit<JobOptions, 'runner'>;
}

export interface Signalled {
  signal?: AbortSignal;
}

export interface InvokeOptions extends Signalled {
  /** Default `GET`. */
  method?: string;
  /** The path below the function, e.g. `/items/7`. */
  path?: string;
  query?: Record<string, string | number | boolean | null | undefined>;
  /** A string, bytes or a Blob as is; any other value as JSON. */
  body?: string | Uint8Array | ArrayBuffer | Blob | unknown;
  headers?: HeadersInit;
}

export interface JobFilter extends Signalled {
  status?: JobStatus;
  tag?: string;
  /** A function name as submitted, or a `sha256:` id. */
  function?: string;
  /** Only this account's jobs (the admin; other accounts see only their own). */
  account?: string;
  /** 1–1000, default 100. */
  limit?: number;
  /** `nextCursor` of the previous page. */
  cursor?: string;
  /** Each job with its stdout and stderr (pages end early at 16 MiB of output). */
  includeOutput?: boolean;
}

export interface UploadSettings {
  timeoutMs?: number;
  memoryMb?: number;
  maxConcurrency?: number;
  public?: boolean;
  allowedOutboundHosts?: string[];
}

// ---- the client ---------------------------------------------------------------------

type Awaited_<T> = T extends PromiseLike<infer U> ? Awaited_<U> : T;
/** What a job of `fn` gives back: its awaited return value, through JSON. */
export type ResultOf<F extends (...args: any[]) => any> = Awaited_<ReturnType<F>>;

export declare class Cloudpipe {
  constructor(options: CloudpipeOptions);
  /** The server's URL. */
  readonly url: string;
  /** The name of the function that runs JS jobs. */
  readonly runner: string;
  readonly functions: Functions;
  readonly jobs: Jobs;
  readonly secrets: Secrets;

  /** The same client with these options for every job it submits. */
  with(options: JobOptions): Cloudpipe;

  /**
   * Submits `fn(...args)` as a job and returns its Job once it is durable (within a few
   * milliseconds: a job that ends that soon comes back already finished). `fn` travels as source:
   * it sees its arguments and the runner's globals, not variables it closed over.
   * `args` travel as JSON.
   */
  submit<F extends (...args: any[]) => any>(fn: F | string, ...args: Parameters<F>): Promise<Job<ResultOf<F>>>;

  /** Submits `fn(...args)` and waits for its result. */
  run<F extends (...args: any[]) => any>(fn: F | string, ...args: Parameters<F>): Promise<ResultOf<F>>;

  /** `fn(item)` for every item, at most `concurrency` (default 16) jobs at once; results in order. */
  map<T, F extends (item: T) => any>(
    fn: F | string,
    items: Iterable<T>,
    options?: { concurrency?: number } & Signalled,
  ): Promise<ResultOf<F>[]>;

  /** An HTTP request to a function's endpoint (`/fn/{name}{path}`); its answer whatever the status. */
  invoke(name: string, options?: InvokeOptions): Promise<InvokeResponse>;

  /** Who the key belongs to and the limits in force (`/v1/me`). */
  me(options?: Signalled): Promise<Me>;

  /** The server's `/healthz`. */
  health(): Promise<Health>;
}

export declare class Job<R = unknown> {
  /** The record as last seen. */
  record: JobRecord;
  readonly id: string;
  readonly status: JobStatus;
  /** Reads the record again. */
  refresh(options?: Signalled): Promise<JobRecord>;
  /** Waits until the job ends; its final record. */
  wait(options?: Signalled): Promise<JobRecord>;
  /** Waits until the job ends: its result, or a JobFailedError. */
  result(options?: Signalled): Promise<R>;
  /** The job's server-sent events; ends after the terminal status. */
  events(options?: Signalled): AsyncGenerator<JobEvent, void, undefined>;
  /** Cancels the job; its record. */
  cancel(options?: Signalled): Promise<JobRecord>;
}

export declare class InvokeResponse {
  readonly status: number;
  readonly ok: boolean;
  readonly headers: Headers;
  readonly body: Uint8Array;
  /** `x-cloudpipe-invocation`. */
  readonly invocation: string | null;
  text(): string;
  json<T = unknown>(): T;
  /** `this` for a status below 400, else throws the matching ApiError. */
  throwIfError(): this;
}

export interface Functions {
  upload(name: string, bytes: Uint8Array | ArrayBuffer | Blob, settings?: UploadSettings, options?: Signalled): Promise<FunctionInfo>;
  list(options?: Signalled): Promise<FunctionInfo[]>;
  get(name: string, options?: Signalled): Promise<FunctionInfo>;
  update(name: string, patch: Partial<FunctionSettings>, options?: Signalled): Promise<FunctionInfo>;
  delete(name: string, options?: Signalled): Promise<FunctionInfo[]>;
}

/** A secret as listed: never its value. */
export interface SecretInfo {
  name: string;
  /** RFC 3339. */
  created_at: string;
  updated_at: string;
}

/** An environment variable's value: a text, or the value of one of the account's secrets. */
export type EnvValue = string | { secret: string };

export interface Secrets {
  put(name: string, value: string, options?: Signalled): Promise<SecretInfo>;
  list(options?: Signalled): Promise<SecretInfo[]>;
  delete(name: string, options?: Signalled): Promise<void>;
}

export interface Jobs {
  list(filter?: JobFilter): Promise<{ jobs: Job[]; nextCursor: string | null }>;
  get(id: string, options?: Signalled): Promise<Job>;
}

export declare function isTerminal(status: JobStatus): boolean;
/** The JS source of `fn`; throws TypeError for native and bound functions. */
export declare function functionSource(fn: ((...args: any[]) => any) | string): string;

// ---- errors -------------------------------------------------------------------------

export declare class CloudpipeError extends Error {}

export declare class ApiError extends CloudpipeError {
  /** HTTP status. */
  readonly status: number;
  /** The API's machine-readable code (`not_found`, `invalid_request`, `unauthenticated`, …). */
  readonly code: string;
  readonly serverMessage: string;
  readonly retryAfterMs: number | null;
  readonly body: unknown;
}
export declare class BadRequestError extends ApiError {}
export declare class AuthenticationError extends ApiError {}
export declare class PermissionError extends ApiError {}
export declare class NotFoundError extends ApiError {}
export declare class ConflictError extends ApiError {}
export declare class PayloadTooLargeError extends ApiError {}
export declare class RateLimitError extends ApiError {}
export declare class UnavailableError extends ApiError {}

export declare function apiErrorFrom(status: number, text: string, retryAfterMs?: number | null): ApiError;

export declare class NetworkError extends CloudpipeError {}

export declare class JobFailedError extends CloudpipeError {
  readonly jobId: string;
  readonly status: JobStatus;
  readonly exitCode: number | null;
  /** `exit`, `trap`, `timeout`, `memory_limit`, `cancelled`, … */
  readonly kind: string | null;
  readonly errorMessage: string | null;
  readonly stderr: string;
  /** The remote error's stack frames, if the runner printed any. */
  readonly remoteStack: string | null;
  readonly record: JobRecord;
}

export declare class ResultError extends CloudpipeError {
  readonly jobId: string;
  readonly stdout: string;
  readonly record: JobRecord;
}
