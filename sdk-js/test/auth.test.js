// Credentials against the real server (started with CLOUDPIPE_ADMIN_KEY, whose
// account is `admin`). These need the server's authentication (issue #4): a server
// without it accepts any request.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { AuthenticationError, Cloudpipe } from '../src/index.js';
import { ADMIN_KEY, startServer } from '../testing/server.js';

let server;

before(async () => {
  server = await startServer();
});

after(async () => {
  await server?.stop();
});

test('the admin key is accepted', async () => {
  const cp = new Cloudpipe({ url: server.url, apiKey: ADMIN_KEY });
  const me = await cp.me();
  assert.equal(me.account, 'admin');
  assert.equal(me.role, 'admin');
  assert.ok(Array.isArray(await cp.functions.list()));
  const page = await cp.jobs.list({ limit: 1 });
  assert.deepEqual(page.jobs, []);
});

test('a wrong key is refused with 401 and an AuthenticationError', async () => {
  const cp = new Cloudpipe({ url: server.url, apiKey: 'not-a-key-this-server-knows' });
  const err = await cp.jobs.list().catch((e) => e);
  assert.ok(err instanceof AuthenticationError, `expected a 401, got ${err}`);
  assert.equal(err.status, 401);
  assert.equal(typeof err.code, 'string');
});

test('no key at all is refused with 401 too', async () => {
  const cp = new Cloudpipe({ url: server.url });
  const err = await cp.submit(() => 1).catch((e) => e);
  assert.ok(err instanceof AuthenticationError, `expected a 401, got ${err}`);
  assert.equal(err.status, 401);
});

test('an account name with its key goes as Basic credentials and is accepted', async () => {
  const cp = new Cloudpipe({ url: server.url, apiKey: ADMIN_KEY, account: 'admin' });
  assert.ok(Array.isArray(await cp.functions.list()));
  const wrong = new Cloudpipe({ url: server.url, apiKey: ADMIN_KEY, account: 'someone-else' });
  const err = await wrong.functions.list().catch((e) => e);
  assert.ok(err instanceof AuthenticationError, `expected a 401, got ${err}`);
});
