// The SDK in a real browser: headless Chromium (Debian's `chromium`, or CHROMIUM) loads
// test/browser/page.html, which imports the SDK's ESM source and submits a closure to
// the real server with the real runner, then reports what it saw.
//
// The page and the API share one origin: a small server here serves the SDK's files
// and passes /v1/* through to cloudpipe (the API sends no CORS headers, so a page
// reaches it from its own origin, as behind any reverse proxy).

import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { dirname, extname, join, normalize, resolve } from 'node:path';
import { Readable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { after, before, test } from 'node:test';

import { ADMIN_KEY, startWithRunner } from '../testing/server.js';

const sdkRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..');

function chromiumBinary() {
  const candidates = [process.env.CHROMIUM, 'chromium', 'chromium-browser', 'google-chrome'].filter(Boolean);
  for (const c of candidates) {
    if (spawnSync(c, ['--version'], { stdio: 'ignore' }).status === 0) return c;
  }
  throw new Error(
    [
      '',
      '='.repeat(80),
      'NO CHROMIUM: the browser test needs a headless Chromium.',
      'Install it with:  apt-get update && apt-get install -y chromium',
      '(or point CHROMIUM at a Chromium or Chrome binary)',
      '='.repeat(80),
    ].join('\n'),
  );
}

const TYPES = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8' };

/** Serves /page.html and /sdk/* from sdk-js, passes /v1/* to `api`, and takes /report. */
async function startPageServer(api, onReport) {
  const server = createServer(async (req, res) => {
    try {
      const url = new URL(req.url, 'http://localhost');
      if (url.pathname === '/report' && req.method === 'POST') {
        let body = '';
        for await (const chunk of req) body += chunk;
        res.end('thanks');
        onReport(JSON.parse(body));
        return;
      }
      if (url.pathname.startsWith('/v1/')) {
        const chunks = [];
        for await (const chunk of req) chunks.push(chunk);
        const headers = {};
        for (const h of ['authorization', 'content-type', 'accept']) if (req.headers[h]) headers[h] = req.headers[h];
        const upstream = await fetch(api + url.pathname + url.search, {
          method: req.method,
          headers,
          body: chunks.length ? Buffer.concat(chunks) : undefined,
        });
        const out = {};
        upstream.headers.forEach((v, k) => {
          if (!['content-length', 'content-encoding', 'transfer-encoding', 'connection'].includes(k)) out[k] = v;
        });
        res.writeHead(upstream.status, out);
        if (upstream.body) Readable.fromWeb(upstream.body).pipe(res);
        else res.end();
        return;
      }
      const file =
        url.pathname === '/page.html'
          ? join(sdkRoot, 'test', 'browser', 'page.html')
          : url.pathname.startsWith('/sdk/')
            ? join(sdkRoot, normalize(url.pathname.slice('/sdk/'.length)))
            : null;
      if (!file || !file.startsWith(sdkRoot)) {
        res.writeHead(404).end();
        return;
      }
      res.writeHead(200, { 'content-type': TYPES[extname(file)] ?? 'application/octet-stream' });
      res.end(readFileSync(file));
    } catch (e) {
      if (!res.headersSent) res.writeHead(500);
      res.end(String(e));
    }
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return { server, origin: `http://127.0.0.1:${server.address().port}` };
}

let cloudpipe;
let page;
let chromium;

before(async () => {
  chromium = chromiumBinary();
  ({ server: cloudpipe } = await startWithRunner());
});

after(async () => {
  page?.server.closeAllConnections();
  page?.server.close();
  await cloudpipe?.stop();
});

test('a page that imports the SDK submits a closure and reads its result', async () => {
  let reported;
  const report = new Promise((r) => (reported = r));
  page = await startPageServer(cloudpipe.url, reported);
  const profile = mkdtempSync(join(tmpdir(), 'cloudpipe-chromium-'));
  const browser = spawn(
    chromium,
    [
      '--headless=new',
      '--no-sandbox',
      '--disable-gpu',
      '--no-first-run',
      '--disable-extensions',
      `--user-data-dir=${profile}`,
      `${page.origin}/page.html?key=${encodeURIComponent(ADMIN_KEY)}`,
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let browserLog = '';
  browser.stderr.on('data', (d) => (browserLog += d));
  let timer;
  try {
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no report from the page within 60 s; chromium said:\n${browserLog}`)), 60000);
    });
    const seen = await Promise.race([report, timeout]);
    assert.equal(seen.ok, true, `the page failed: ${seen.error}\n${seen.stack}`);
    assert.equal(seen.here, 'object', 'the page ran in a browser');
    assert.deepEqual(seen.result, { sum: 7, where: 'undefined' });
    assert.match(seen.id, /^[0-9a-f-]{36}$/);
    assert.equal(seen.events.at(-1), 'status:succeeded');
    assert.equal(seen.thrown.isJobFailed, true);
    assert.match(seen.thrown.message, /Uncaught Error: from the sandbox/);
    assert.match(seen.thrown.stack, /at remoteFailure \(function\.js:/);
  } finally {
    clearTimeout(timer);
    browser.kill('SIGKILL');
    await new Promise((r) => (browser.exitCode !== null ? r() : browser.once('exit', r)));
    // Chromium's helper processes may still be writing the profile for a moment.
    rmSync(profile, { recursive: true, force: true, maxRetries: 20, retryDelay: 100 });
  }
});
