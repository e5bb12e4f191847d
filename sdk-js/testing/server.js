// Starts the real `cloudpipe serve` (a child process on a port the OS picks, with a
// fresh data dir) and uploads the real JS runner to it. Nothing here is simulated:
// when the server binary or the runner is missing, the tests fail and say how to
// build them.
//
// Environment:
//   CLOUDPIPE_BIN        the server binary (default: the newer of
//                        target/release/cloudpipe and target/debug/cloudpipe at the
//                        repository root; built with `cargo build --bin cloudpipe`
//                        when neither exists)
//   CLOUDPIPE_RUNNER_JS  the runner (default guest-runners/js/dist/runner-js.wasm)

import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { Cloudpipe } from '../src/index.js';

export const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

/** The admin key the test servers start with (`CLOUDPIPE_ADMIN_KEY`). */
export const ADMIN_KEY = 'sdk-js-test-admin-key-0123456789';

/** The built-in name of the runner (the server registers it from `--runner-js`). */
export const RUNNER = 'runner:js';

/** The name the runner is also uploaded under, to invoke it over HTTP. */
export const UPLOADED_RUNNER = 'runner-js';

function loud(lines) {
  const bar = '='.repeat(80);
  return `\n${bar}\n${lines.join('\n')}\n${bar}\n`;
}

/** The server binary, built first when there is none. */
export function serverBinary() {
  if (process.env.CLOUDPIPE_BIN) {
    if (!existsSync(process.env.CLOUDPIPE_BIN)) {
      throw new Error(loud([`CLOUDPIPE_BIN=${process.env.CLOUDPIPE_BIN} does not exist.`]));
    }
    return process.env.CLOUDPIPE_BIN;
  }
  const candidates = ['release', 'debug']
    .map((p) => join(repoRoot, 'target', p, 'cloudpipe'))
    .filter((p) => existsSync(p))
    .sort((a, b) => statSync(b).mtimeMs - statSync(a).mtimeMs);
  if (candidates.length > 0) return candidates[0];
  process.stderr.write('sdk-js tests: no cloudpipe binary yet; running `cargo build --bin cloudpipe`\n');
  const r = spawnSync('cargo', ['build', '--bin', 'cloudpipe'], { cwd: repoRoot, stdio: 'inherit' });
  const built = join(repoRoot, 'target', 'debug', 'cloudpipe');
  if (r.status !== 0 || !existsSync(built)) {
    throw new Error(loud(['`cargo build --bin cloudpipe` failed: the SDK tests need the server.']));
  }
  return built;
}

/** The JS runner's bytes; a loud failure when it has not been built. */
export function runnerBytes() {
  const path = process.env.CLOUDPIPE_RUNNER_JS ?? join(repoRoot, 'guest-runners', 'js', 'dist', 'runner-js.wasm');
  if (!existsSync(path)) {
    throw new Error(
      loud([
        `THE JS RUNNER IS NOT BUILT: ${path} does not exist.`,
        'The SDK tests run real jobs on it. Build it with:',
        '  guest-runners/js/build.sh',
        '(it needs: apt-get install -y clang lld wasi-libc llvm; rustup target add wasm32-wasip2)',
      ]),
    );
  }
  return readFileSync(path);
}

/**
 * Starts `cloudpipe serve` and resolves once it listens. `stop()` kills it and removes
 * its data dir. `log` holds its stderr lines (shown when a start fails).
 */
export async function startServer({ env = {}, args = [] } = {}) {
  const bin = serverBinary();
  const dataDir = mkdtempSync(join(tmpdir(), 'cloudpipe-sdk-js-'));
  const child = spawn(bin, ['serve', '--listen', '127.0.0.1:0', '--data-dir', dataDir, ...args], {
    env: { ...process.env, RUST_LOG: 'info', NO_COLOR: '1', CLOUDPIPE_ADMIN_KEY: ADMIN_KEY, ...env },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const log = [];
  const url = await new Promise((resolvePromise, reject) => {
    let buffered = '';
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`cloudpipe did not start within 60 s:\n${log.join('\n')}`));
    }, 60000);
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk) => {
      buffered += chunk;
      let nl;
      while ((nl = buffered.indexOf('\n')) >= 0) {
        // eslint-disable-next-line no-control-regex
        const line = buffered.slice(0, nl).replace(/\x1b\[[0-9;]*m/g, '');
        buffered = buffered.slice(nl + 1);
        if (log.length < 10000) log.push(line);
        const m = line.includes('cloudpipe serving') && line.match(/url=(\S+)/);
        if (m) {
          clearTimeout(timer);
          resolvePromise(m[1]);
        }
      }
    });
    child.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`cloudpipe exited (${code}) before listening:\n${log.join('\n')}`));
    });
  });
  return {
    url,
    log,
    child,
    async stop() {
      if (child.exitCode === null) {
        const exited = new Promise((r) => child.once('exit', r));
        child.kill('SIGTERM');
        const t = setTimeout(() => child.kill('SIGKILL'), 10000);
        await exited;
        clearTimeout(t);
      }
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/** The runner's path (it must exist: see `runnerBytes`). */
export function runnerPath() {
  return process.env.CLOUDPIPE_RUNNER_JS ?? join(repoRoot, 'guest-runners', 'js', 'dist', 'runner-js.wasm');
}

/**
 * A server with the runner built in (`--runner-js`, as `runner:js`) and also uploaded
 * under a name (for HTTP invocation), and an admin client of it.
 */
export async function startWithRunner() {
  const bytes = runnerBytes();
  const server = await startServer({ args: ['--runner-js', runnerPath()] });
  const cp = new Cloudpipe({ url: server.url, apiKey: ADMIN_KEY });
  try {
    await cp.functions.upload(UPLOADED_RUNNER, bytes);
  } catch (e) {
    await server.stop();
    throw e;
  }
  return { server, cp, bytes };
}
