// The SDK against real roomcast nodes: acks and errors, reconnects after a
// restart (1012) with history rooms resumed, a gap beyond history, a refused
// token, token refresh and expiry, and a half-open connection found by the
// ping. Run by tests/it/sdk.rs: node --experimental-websocket --test.

import assert from 'node:assert/strict';
import { after, test } from 'node:test';

import { Roomcast, backoffDelay, tokenExpiry } from '../roomcast.js';
import { SECRET, jwt, next, startNode, startProxy, until } from './harness.mjs';

const AUTH = {
  ROOMCAST__AUTH__ALGORITHM: 'HS256',
  ROOMCAST__AUTH__SECRET: SECRET,
  ROOMCAST__AUTH__LEEWAY: '0s',
};

const open = [];
/** A client that the test run closes at the end. */
function client(url, options) {
  const rc = new Roomcast(url, options);
  open.push(rc);
  return rc;
}
after(() => open.forEach((rc) => rc.close()));

/** Every state a client goes through, in order. */
function states(rc) {
  const seen = [];
  rc.on('state', ({ state }) => seen.push(state));
  return seen;
}

/** The data of the `msg`s of `room` as they arrive. */
function inbox(rc, room) {
  const got = [];
  rc.on('msg', (m) => m.room === room && got.push(m));
  return got;
}

test('reconnect delays are full jitter, doubling up to the cap', () => {
  const b = { initial: 500, max: 30000 };
  assert.equal(backoffDelay(0, b, () => 0), 0);
  assert.equal(backoffDelay(0, b, () => 0.999), 499);
  assert.equal(backoffDelay(3, b, () => 0.999), 3996);
  assert.equal(backoffDelay(40, b, () => 0.999), 29970, 'capped');
  const spread = new Set(Array.from({ length: 50 }, () => backoffDelay(5, b)));
  assert.ok(spread.size > 40, 'random, so clients dropped together come back apart');
  assert.equal(tokenExpiry(jwt({ sub: 'a', exp: 1234 })), 1234);
  assert.equal(tokenExpiry('not a token'), undefined);
});

test('send resolves on the ack and rejects with the gateway code', async () => {
  const node = await startNode('sdk-ack');
  after(() => node.stop('SIGKILL'));
  const rc = client(node.url);
  const got = inbox(rc, 'r');
  const presence = next(rc, 'presence', (p) => p.room === 'r');
  const ack = await rc.join('r');
  assert.equal((await presence).online, 1, 'the room\'s count follows the join');
  assert.equal(ack.op, 'ack');
  assert.equal(rc.node, 'sdk-ack');
  await rc.send('r', 'danmaku', { text: 'hi' });
  await until('the message', () => got.length === 1);
  assert.deepEqual(got[0].data, { text: 'hi' });
  await assert.rejects(rc.send('elsewhere', 'danmaku', {}), { code: 'not_joined' });
  await assert.rejects(rc.join('bad room'), { code: 'bad_room' });
});

test('a node restart (1012) reconnects to another node and a history room misses nothing', async () => {
  const [a, b] = [await startNode('sdk-a'), await startNode('sdk-b')];
  after(() => [a, b].forEach((n) => n.stop('SIGKILL')));
  const lb = await startProxy(a.port);
  after(() => lb.close());
  const rc = client(lb.url, { restartSpread: 300 });
  const seen = states(rc);
  const room = `h:restart-${Date.now()}`;
  const got = inbox(rc, room);
  await rc.join(room);
  const publisher = client(b.url);
  await publisher.join(room);
  for (const n of [1, 2, 3]) await publisher.send(room, 'danmaku', { n });
  await until('the first three', () => got.length === 3);
  // Node a restarts; the balancer sends new connections to b.
  lb.target = b.port;
  const away = next(rc, 'state', (s) => s.state === 'reconnecting');
  a.stop('SIGTERM');
  await away;
  const sentAway = [4, 5].map((n) => publisher.send(room, 'danmaku', { n }));
  await Promise.all(sentAway);
  const recovered = await next(rc, 'recovered', (r) => r.room === room);
  assert.equal(recovered.recovered, true, 'resumed from its last seq');
  await publisher.send(room, 'danmaku', { n: 6 });
  await until('all six', () => got.length >= 6);
  assert.deepEqual(got.map((m) => m.data.n), [1, 2, 3, 4, 5, 6], 'each once, in order');
  assert.equal(rc.node, 'sdk-b');
  assert.equal(await a.exited, 0);
  assert.ok(!seen.includes('closed'), `never gave up: ${seen}`);
});

test('a gap beyond the history is reported as recovered: false', async () => {
  const node = await startNode('sdk-gap');
  after(() => node.stop('SIGKILL'));
  const lb = await startProxy(node.port);
  after(() => lb.close());
  const rc = client(lb.url, { backoff: { initial: 50, max: 200 } });
  const room = `s:gap-${Date.now()}`;
  await rc.join(room);
  const publisher = client(node.url);
  await publisher.join(room);
  await publisher.send(room, 'danmaku', { n: 0 });
  await until('the first message', () => rc.rooms.get(room).seq >= 1);
  // The network goes away for a while; ten messages pass (history keeps 3).
  lb.refuse = true;
  lb.cut();
  await next(rc, 'state', (s) => s.state === 'reconnecting');
  let last;
  for (let n = 1; n <= 10; n++) last = await publisher.send(room, 'danmaku', { n });
  lb.refuse = false;
  const recovered = await next(rc, 'recovered', (r) => r.room === room);
  assert.equal(recovered.recovered, false, 'the page must reload its state');
  assert.equal(recovered.ack.seq, last.seq, 'and goes on from the room\'s last seq');
});

test('a refused token stops the client and says why, without retrying', async () => {
  const node = await startNode('sdk-auth', { ...AUTH, ROOMCAST__AUTH__ANONYMOUS: 'false' });
  after(() => node.stop('SIGKILL'));
  const lb = await startProxy(node.port);
  after(() => lb.close());
  const bad = jwt({ sub: 'eve', exp: Math.floor(Date.now() / 1000) + 60 }, 'another-secret-0123456789abcdef0123');
  const rc = client(lb.url, { token: bad });
  const error = await next(rc, 'error');
  assert.equal(error.code, 'unauthorized');
  assert.match(error.message, /bad_signature/);
  assert.equal(rc.state, 'closed');
  const attempts = lb.accepted;
  await new Promise((r) => setTimeout(r, 1000));
  assert.equal(lb.accepted, attempts, 'no retry after an auth failure');
});

test('the token is refreshed before it expires, and a failed refresh reconnects after 4003', async () => {
  const node = await startNode('sdk-token', AUTH);
  after(() => node.stop('SIGKILL'));
  let calls = 0;
  const token = async () => {
    calls += 1;
    if (calls === 3) throw new Error('the auth backend is down');
    const life = calls === 4 ? 600 : 2;
    return jwt({ sub: 'ana', exp: Math.floor(Date.now() / 1000) + life, info: { name: 'ana' } });
  };
  const rc = client(node.url, { token });
  const seen = states(rc);
  const got = inbox(rc, 'r');
  await rc.join('r');
  // Call 2 refreshes at 2/3 of the token's life: the connection outlives it.
  await until('a refresh', () => calls >= 2);
  await new Promise((r) => setTimeout(r, 600));
  assert.equal(seen.filter((s) => s === 'open').length, 1, `one connection so far: ${seen}`);
  // Call 3 fails: the node closes with 4003 at expiry; call 4 reconnects.
  await until('a reconnect with a fresh token', () => calls >= 4 && rc.state === 'open', 8000);
  assert.ok(seen.filter((s) => s === 'open').length >= 2, `reconnected: ${seen}`);
  await until('the room re-joined', () => rc.rooms.get('r').joined);
  const sent = await rc.send('r', 'danmaku', { text: 'still here' });
  assert.equal(sent.op, 'ack');
  await until('its message', () => got.some((m) => m.data.text === 'still here'));
  assert.deepEqual(got.at(-1).info, { name: 'ana' });
});

test('messages to a user reach every connection of that user', async () => {
  const node = await startNode('sdk-users', AUTH);
  after(() => node.stop('SIGKILL'));
  const exp = Math.floor(Date.now() / 1000) + 600;
  const ana = client(node.url, { token: jwt({ sub: 'ana', exp }) });
  const bob = client(node.url, { token: jwt({ sub: 'bob', exp }) });
  await until('both open', () => ana.state === 'open' && bob.state === 'open');
  const got = next(bob, 'msg', (m) => m.to === 'bob');
  await ana.sendTo('bob', 'rtc.offer', { sdp: 'v=0' });
  const m = await got;
  assert.equal(m.from, 'ana');
  assert.deepEqual(m.data, { sdp: 'v=0' });
});

test('a half-open connection is found by the ping and replaced', async () => {
  const node = await startNode('sdk-ping');
  after(() => node.stop('SIGKILL'));
  const lb = await startProxy(node.port);
  after(() => lb.close());
  const rc = client(lb.url, { ping: { interval: 200, timeout: 300 }, backoff: { initial: 50, max: 100 } });
  const got = inbox(rc, 'r');
  await rc.join('r');
  const seen = states(rc);
  // The link goes silent in both directions, without a FIN or RST.
  lb.freeze();
  await until('a new connection', () => seen.includes('reconnecting') && rc.state === 'open', 5000);
  await until('the room re-joined', () => rc.rooms.get('r').joined);
  await rc.send('r', 'danmaku', { text: 'back' });
  await until('its message', () => got.some((m) => m.data.text === 'back'));
});
