// Test harness for the SDK: real roomcast processes (ROOMCAST_BIN) on a real
// Redis (REDIS_URL), a loopback TCP proxy that plays load balancer and
// network (switch the target, freeze the connections, refuse), and HS256
// tokens. tests/it/sdk.rs runs these tests with both set.

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export const BIN = process.env.ROOMCAST_BIN;
export const REDIS_URL = process.env.REDIS_URL;
if (!BIN || !REDIS_URL) {
  throw new Error('set ROOMCAST_BIN (the roomcast binary) and REDIS_URL (a test redis-server): cargo test runs these from tests/it/sdk.rs');
}

export const SECRET = 'sdk-test-secret-0123456789abcdef0123456789';

/** Poll `check` until it is true, or fail after `ms`. */
export async function until(what, check, ms = 10000) {
  const end = Date.now() + ms;
  for (;;) {
    if (await check()) return;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** The next `event` of `rc` that `filter` accepts. */
export function next(rc, event, filter = () => true, ms = 10000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`timed out waiting for ${event}`));
    }, ms);
    const off = rc.on(event, (v) => {
      if (!filter(v)) return;
      clearTimeout(timer);
      off();
      resolve(v);
    });
  });
}

export function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** An HS256 JWT. */
export function jwt(claims, secret = SECRET) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}

const CONFIG = `
[[namespaces]]
prefix = "h:"
history = { size = 100, ttl = "5m" }

[[namespaces]]
prefix = "s:"
history = { size = 3, ttl = "5m" }
`;

const children = new Set();
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL');
});

/** A roomcast node on the test Redis; `env` adds ROOMCAST__… settings. */
export async function startNode(id, env = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'roomcast-sdk-'));
  const config = join(dir, 'roomcast.toml');
  writeFileSync(config, CONFIG);
  const port = await freePort();
  const child = spawn(BIN, ['--config', config], {
    env: {
      ...process.env,
      ROOMCAST__SERVER__LISTEN: `127.0.0.1:${port}`,
      ROOMCAST__NODE__ID: id,
      ROOMCAST__BUS__KIND: 'redis',
      ROOMCAST__BUS__REDIS__URL: REDIS_URL,
      ROOMCAST__SHUTDOWN__DRAIN: '200ms',
      ROOMCAST__LOG__LEVEL: 'warn',
      ...env,
    },
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  children.add(child);
  const exited = new Promise((resolve) => child.on('exit', (code) => {
    children.delete(child);
    resolve(code);
  }));
  await until(`node ${id} to be ready`, async () => {
    try {
      return (await fetch(`http://127.0.0.1:${port}/readyz`)).ok;
    } catch {
      return false;
    }
  });
  return {
    id,
    port,
    url: `ws://127.0.0.1:${port}/ws`,
    exited,
    stop: (signal = 'SIGTERM') => child.kill(signal),
  };
}

/**
 * A TCP proxy on loopback: the load balancer and the network between the
 * SDK and the nodes. `target` can change; `freeze()` silently stops
 * forwarding on the connections open now (a half-open link); `refuse`
 * closes new connections at once.
 */
export async function startProxy(target) {
  const pairs = new Set();
  const proxy = { target, refuse: false, accepted: 0 };
  const server = net.createServer((client) => {
    proxy.accepted += 1;
    if (proxy.refuse) return client.destroy();
    const upstream = net.connect(proxy.target, '127.0.0.1');
    const pair = { client, upstream, frozen: false };
    pairs.add(pair);
    const pipe = (from, to) => {
      from.on('data', (d) => pair.frozen || to.write(d));
      from.on('error', () => to.destroy());
      from.on('close', () => {
        if (!pair.frozen) to.end();
        pairs.delete(pair);
      });
    };
    pipe(client, upstream);
    pipe(upstream, client);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  proxy.port = server.address().port;
  proxy.url = `ws://127.0.0.1:${proxy.port}/ws`;
  proxy.freeze = () => {
    for (const p of pairs) p.frozen = true;
  };
  proxy.cut = () => {
    for (const p of pairs) {
      p.client.destroy();
      p.upstream.destroy();
    }
  };
  proxy.close = () => {
    proxy.cut();
    server.close();
  };
  return proxy;
}
