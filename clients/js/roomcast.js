// roomcast browser SDK: one connection to a roomcast gateway, its rooms,
// and everything a page would otherwise get wrong when the network does:
// reconnects with capped exponential backoff and full jitter, close codes
// honoured, rooms re-joined and history rooms resumed from the last seq,
// token refresh before expiry, and an application-level ping that finds a
// half-open connection (a laptop waking from sleep).
//
// Plain modern JavaScript, an ES module, no dependencies, no build step:
//   import { Roomcast } from '/sdk/roomcast.js';
// Types: roomcast.d.ts. Protocol: docs/protocol.md.

export const VERSION = '0.1.0';

/** Close codes the gateway uses (docs/protocol.md, "close codes"). */
export const CLOSE = Object.freeze({
  NORMAL: 1000,
  RESTART: 1012,
  SLOW_CONSUMER: 4001,
  HEARTBEAT_TIMEOUT: 4002,
  TOKEN_EXPIRED: 4003,
  ABUSE: 4004,
});

/** A refused request or a failed connection: `code` is the gateway's error code. */
export class RoomcastError extends Error {
  constructor(code, message, extra = {}) {
    super(message || code);
    this.name = 'RoomcastError';
    this.code = code;
    Object.assign(this, extra);
  }
}

const DEFAULTS = {
  /** Reconnect delays: full jitter over min(max, initial * 2^attempt) ms. */
  backoff: { initial: 500, max: 30000 },
  /** After a 1012 (the node restarts): reconnect within this many ms, spread. */
  restartSpread: 2000,
  /** Application-level ping: every `interval` ms; no pong within `timeout` ms = dead. */
  ping: { interval: 20000, timeout: 10000 },
  /** Refresh the token this long before it expires (at most a third of its life). */
  refreshBefore: 60000,
};

/**
 * The delay before reconnect attempt `attempt` (0-based): uniformly random
 * in [0, min(max, initial * 2^attempt)) — "full jitter", so that clients
 * dropped together do not come back together.
 */
export function backoffDelay(attempt, { initial, max }, random = Math.random) {
  const cap = Math.min(max, initial * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
}

/** The `exp` of a JWT (Unix seconds), or undefined. */
export function tokenExpiry(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const json = JSON.parse(atob(part + '='.repeat((4 - (part.length % 4)) % 4)));
    return typeof json.exp === 'number' ? json.exp : undefined;
  } catch {
    return undefined;
  }
}

/** ws(s)://host/ws for a ws, http or bare-host URL. */
function wsUrl(url) {
  const u = new URL(url, globalThis.location?.href);
  if (u.protocol === 'http:') u.protocol = 'ws:';
  if (u.protocol === 'https:') u.protocol = 'wss:';
  if (u.pathname === '/' || u.pathname === '') u.pathname = '/ws';
  return u;
}

export class Roomcast {
  /**
   * @param {string} url  the gateway: ws://host/ws (or http(s)://host)
   * @param {object} [options]  token (string or function returning one, or a promise of one),
   *   backoff, restartSpread, ping, refreshBefore, WebSocket (a constructor, for Node)
   */
  constructor(url, options = {}) {
    this.url = wsUrl(url);
    this.options = {
      ...DEFAULTS,
      ...options,
      backoff: { ...DEFAULTS.backoff, ...options.backoff },
      ping: { ...DEFAULTS.ping, ...options.ping },
    };
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (!this.WebSocket) throw new Error('roomcast: no WebSocket here; pass options.WebSocket');
    this.state = 'connecting';
    this.node = undefined;
    /** room → {history, epoch, seq, joined, waiters} */
    this.rooms = new Map();
    this.handlers = new Map();
    this.requests = new Map();
    this.nextId = 1;
    this.attempt = 0;
    this.ws = null;
    this.token = undefined;
    this.timers = {};
    this.stopped = false;
    this.wake = () => this.checkAlive();
    globalThis.addEventListener?.('online', this.wake);
    globalThis.document?.addEventListener?.('visibilitychange', this.wake);
    this.connect();
  }

  /** Listen to 'msg' | 'presence' | 'state' | 'error' | 'recovered' | 'skipped'; returns a function that stops it. */
  on(event, handler) {
    if (!this.handlers.has(event)) this.handlers.set(event, new Set());
    this.handlers.get(event).add(handler);
    return () => this.handlers.get(event)?.delete(handler);
  }

  emit(event, value) {
    for (const handler of this.handlers.get(event) ?? []) {
      try {
        handler(value);
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
    }
  }

  /**
   * Join `room` (now, or as soon as connected; again after every reconnect).
   * `history: N` replays a history room's last N messages on the first join.
   * Resolves with the join's ack; rejects with a RoomcastError (forbidden, bad_room…).
   */
  join(room, { history } = {}) {
    let entry = this.rooms.get(room);
    if (!entry) {
      entry = { history, epoch: undefined, seq: undefined, joined: false, waiters: [] };
      this.rooms.set(room, entry);
      if (this.state === 'open') this.sendJoin(room, entry);
    }
    if (entry.joined) return Promise.resolve(entry.ack);
    return new Promise((resolve, reject) => entry.waiters.push({ resolve, reject }));
  }

  /** Leave `room`; it is not re-joined after a reconnect. */
  leave(room) {
    const entry = this.rooms.get(room);
    this.rooms.delete(room);
    for (const w of entry?.waiters ?? []) w.reject(new RoomcastError('left', `left ${room}`));
    if (this.state !== 'open' || !entry?.joined) return Promise.resolve();
    return this.request({ op: 'leave', room }).then(() => undefined);
  }

  /** Send `event` with `data` to `room` (joined): resolves on the ack ({seq} in history rooms). */
  send(room, event, data = null) {
    return this.request({ op: 'send', room, event, data });
  }

  /** Send `event` with `data` to every connection of user `user`. */
  sendTo(user, event, data = null) {
    return this.request({ op: 'send', to: user, event, data });
  }

  /** Close for good. */
  close() {
    this.stopped = true;
    globalThis.removeEventListener?.('online', this.wake);
    globalThis.document?.removeEventListener?.('visibilitychange', this.wake);
    const ws = this.ws;
    this.lost(new RoomcastError('closed', 'closed by the page'));
    if (ws && ws.readyState <= 1) ws.close(CLOSE.NORMAL);
    this.setState('closed');
  }

  // ---- internals ---------------------------------------------------------

  setState(state, extra = {}) {
    if (this.state === state && !extra.force) return;
    this.state = state;
    this.emit('state', { state, node: this.node, ...extra });
  }

  async currentToken(fresh) {
    const { token } = this.options;
    if (typeof token === 'function') {
      if (fresh || this.token === undefined) this.token = await token();
    } else {
      this.token = token;
    }
    return this.token;
  }

  async connect() {
    if (this.stopped) return;
    let token;
    try {
      token = await this.currentToken(false);
    } catch (e) {
      this.emit('error', new RoomcastError('token', `the token function failed: ${e?.message ?? e}`));
      return this.retry(backoffDelay(this.attempt++, this.options.backoff));
    }
    if (this.stopped) return;
    const url = new URL(this.url);
    if (token) url.searchParams.set('token', token);
    const ws = new this.WebSocket(url.href);
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
    };
    ws.onmessage = (event) => {
      if (this.ws !== ws) return;
      this.alive();
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      this.frame(frame);
    };
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.closed(event.code, event.reason, opened, url);
    };
    // A refused handshake: browsers report an error, then a close (1006);
    // some runtimes only the error. Either way, once.
    ws.onerror = () => {
      if (this.ws === ws && !opened) this.closed(1006, '', false, url);
    };
  }

  frame(f) {
    switch (f.op) {
      case 'welcome':
        this.node = f.node;
        this.attempt = 0;
        this.setState('open', { force: true });
        this.startPing();
        this.scheduleRefresh();
        for (const [room, entry] of this.rooms) this.sendJoin(room, entry);
        break;
      case 'msg': {
        const entry = f.room !== undefined ? this.rooms.get(f.room) : undefined;
        if (entry && typeof f.seq === 'number') {
          if (entry.epoch !== f.epoch) {
            entry.epoch = f.epoch;
            entry.seq = f.seq;
          } else {
            entry.seq = Math.max(entry.seq ?? 0, f.seq);
          }
        }
        this.emit('msg', f);
        break;
      }
      case 'presence':
        this.emit('presence', { room: f.room, online: f.online });
        break;
      case 'skipped':
        // This client lagged: the gateway let it miss `count` droppable messages.
        this.emit('skipped', { room: f.room, count: f.count });
        break;
      case 'ack':
      case 'error':
      case 'pong': {
        const pending = f.id !== undefined ? this.requests.get(f.id) : undefined;
        if (pending) {
          this.requests.delete(f.id);
          if (f.op === 'error') {
            pending.reject(new RoomcastError(f.code, f.message, { retryMs: f.retry_ms }));
          } else {
            pending.resolve(f);
          }
        } else if (f.op === 'error') {
          this.emit('error', new RoomcastError(f.code, f.message));
        }
        break;
      }
      default:
        break; // ops this SDK does not know are ignored, as the protocol asks
    }
  }

  /** Send a request with an id: resolves with its ack, rejects with its error. */
  request(frame) {
    if (this.state !== 'open' || !this.ws || this.ws.readyState !== 1) {
      return Promise.reject(new RoomcastError('not_connected', `not connected (${this.state})`));
    }
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.requests.set(id, { resolve, reject });
      this.ws.send(JSON.stringify({ ...frame, id }));
    });
  }

  sendJoin(room, entry) {
    const join = { op: 'join', room };
    const resume = entry.epoch !== undefined && entry.seq !== undefined;
    if (resume) join.since = { seq: entry.seq, epoch: entry.epoch };
    else if (entry.history) join.history = entry.history;
    this.request(join).then(
      (ack) => {
        if (this.rooms.get(room) !== entry) return;
        if (ack.epoch !== undefined && !(resume && ack.recovered)) {
          entry.epoch = ack.epoch;
          entry.seq = ack.seq;
        }
        entry.joined = true;
        entry.ack = ack;
        if (resume) this.emit('recovered', { room, recovered: ack.recovered === true, ack });
        for (const w of entry.waiters.splice(0)) w.resolve(ack);
      },
      (err) => {
        if (this.rooms.get(room) !== entry) return;
        if (err.code === 'not_connected' || err.code === 'connection_lost') return; // re-joined on reconnect
        if (err.code === 'unavailable' || err.code === 'rate_limited') {
          // The gateway cannot take it now: try again.
          setTimeout(() => this.state === 'open' && this.rooms.get(room) === entry && this.sendJoin(room, entry), err.retryMs ?? 1000);
          return;
        }
        this.rooms.delete(room);
        for (const w of entry.waiters.splice(0)) w.reject(err);
        this.emit('error', err);
      },
    );
  }

  /** The connection is gone: stop its timers, fail what waited on it. */
  lost(err) {
    clearInterval(this.timers.ping);
    clearTimeout(this.timers.pong);
    clearTimeout(this.timers.refresh);
    this.timers = {};
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    }
    for (const [, pending] of this.requests) pending.reject(err);
    this.requests.clear();
    for (const entry of this.rooms.values()) entry.joined = false;
  }

  async closed(code, reason, opened, url) {
    this.lost(new RoomcastError('connection_lost', 'the connection was lost before the reply; the outcome is unknown'));
    if (this.stopped) return this.setState('closed');
    if (!opened) return this.handshakeFailed(url);
    switch (code) {
      case CLOSE.RESTART:
        // The node restarts: come back soon, spread so that not all at once.
        return this.retry(Math.floor(Math.random() * this.options.restartSpread));
      case CLOSE.TOKEN_EXPIRED:
        this.token = undefined;
        if (typeof this.options.token !== 'function') {
          return this.fail(new RoomcastError('token_expired', 'the token expired and there is no token function to renew it'));
        }
        return this.retry(0);
      default:
        // Slow consumer, heartbeat timeout, abuse, a lost network: resume
        // with backoff (history rooms pick up from their last seq).
        return this.retry(backoffDelay(this.attempt++, this.options.backoff));
    }
  }

  /** Stop for good and say why. */
  fail(err) {
    this.stopped = true;
    this.setState('closed', { error: err });
    this.emit('error', err);
  }

  /**
   * The handshake failed. A browser cannot see the HTTP status of a refused
   * WebSocket, so ask the same URL over plain HTTP: the gateway answers a
   * non-WebSocket GET with the refusal the handshake would get.
   */
  async handshakeFailed(url) {
    let status, body, retryAfter;
    try {
      const http = new URL(url);
      http.protocol = http.protocol === 'wss:' ? 'https:' : 'http:';
      const resp = await fetch(http.href, { cache: 'no-store' });
      status = resp.status;
      retryAfter = Number(resp.headers.get('retry-after')) || undefined;
      body = await resp.json().catch(() => undefined);
    } catch {
      // Unreachable (or a cross-origin answer we may not read): just retry.
    }
    if (this.stopped) return;
    const error = body?.error;
    if (status === 401 && error) {
      const expired = /^expired/.test(error.message ?? '');
      if (expired && typeof this.options.token === 'function' && this.attempt < 3) {
        this.token = undefined;
        return this.retry(backoffDelay(this.attempt++, this.options.backoff));
      }
      return this.fail(new RoomcastError(error.code, error.message));
    }
    if ((status === 403 || status === 400) && error) {
      return this.fail(new RoomcastError(error.code, error.message));
    }
    const delay = backoffDelay(this.attempt++, this.options.backoff);
    return this.retry(retryAfter ? Math.max(delay, retryAfter * 1000) : delay);
  }

  retry(delay) {
    if (this.stopped) return;
    this.setState('reconnecting', { delay });
    clearTimeout(this.timers.retry);
    this.timers.retry = setTimeout(() => {
      this.setState('connecting');
      this.connect();
    }, delay);
  }

  // ---- liveness: application-level ping ---------------------------------

  startPing() {
    const { interval } = this.options.ping;
    this.timers.ping = setInterval(() => this.checkAlive(), interval);
  }

  /** Ping now; without any frame back within the timeout, the connection is dead. */
  checkAlive() {
    const ws = this.ws;
    if (!ws || this.state !== 'open' || this.timers.pong) return;
    const id = this.nextId++;
    try {
      ws.send(JSON.stringify({ op: 'ping', id }));
    } catch {
      return;
    }
    this.timers.pong = setTimeout(() => {
      if (this.ws !== ws) return;
      // Half-open: the close handshake would never finish. Drop it and go.
      try {
        ws.close(4000, 'ping timeout');
      } catch {
        // already closing
      }
      this.closed(4000, 'ping timeout', true);
    }, this.options.ping.timeout);
  }

  /** Any frame is a sign of life. */
  alive() {
    clearTimeout(this.timers.pong);
    this.timers.pong = undefined;
  }

  // ---- token refresh -----------------------------------------------------

  scheduleRefresh() {
    if (typeof this.options.token !== 'function' || !this.token) return;
    const exp = tokenExpiry(this.token);
    if (exp === undefined) return;
    const left = exp * 1000 - Date.now();
    const before = Math.min(this.options.refreshBefore, left / 3);
    clearTimeout(this.timers.refresh);
    this.timers.refresh = setTimeout(() => this.refresh(), Math.max(0, left - before));
  }

  async refresh() {
    try {
      const token = await this.currentToken(true);
      await this.request({ op: 'refresh', token });
      this.scheduleRefresh();
    } catch (e) {
      // The connection is closed with 4003 at expiry; then a new token is fetched.
      this.emit('error', e instanceof RoomcastError ? e : new RoomcastError('token', String(e?.message ?? e)));
    }
  }
}
