'use strict';
// Comparison peer for roomcast benchmarks: the broadcast server people build with
// uWebSockets.js (the native uWS binding) + `ioredis`. Same protocol and Redis layout
// as bench/peers/node-ws: a client connects to ws://HOST:PORT/<room>; every frame it
// sends is PUBLISHed to Redis channel `peer:room:<room>`; this node SUBSCRIBEs to a
// room's channel while it has local clients in that room, and relays every message
// from Redis to all of them (the sender included).
//
// The local fan-out is uWS's own pub/sub: each socket subscribes to the uWS topic
// `peer:room:<room>` when it opens, and a message from Redis goes out with
// app.publish(), which writes it to every subscriber in C++.
//
// Redis carries bytes only, so a one-byte tag in front of the payload ('t' text,
// 'b' binary) keeps the frame type; the payload itself is relayed byte for byte.
const path = require('node:path');
const Redis = require('ioredis');

// Load the native binary itself. The package's own entry point silently falls back
// to a pure-JS implementation (on top of `ws`) when the binary does not load, which
// would make this peer a second node-ws; fail loudly instead.
const PKG_DIR = path.dirname(require.resolve('@trufflesuite/uws-js-unofficial/package.json'));
const BINARY = `uws_${process.platform}_${process.arch}_${process.versions.modules}.node`;
let uWS;
try {
  uWS = require(path.join(PKG_DIR, 'binaries', BINARY));
} catch (e) {
  console.error(`uws peer: cannot load the native uWebSockets.js binary ${BINARY} ` +
    `(Node ${process.version}; binaries exist for Node 16, 18 and 20): ${e.message}`);
  process.exit(1);
}

const HOST = process.env.HOST || '127.0.0.1';
const PORT = Number(process.env.PORT || 9092);
const REDIS_URL = process.env.REDIS_URL || 'redis://127.0.0.1:6379';
const PREFIX = 'peer:room:';
const TAG_TEXT = 't'.charCodeAt(0);
const TAG_BINARY = 'b'.charCodeAt(0);

const pub = new Redis(REDIS_URL);
const sub = new Redis(REDIS_URL);
for (const r of [pub, sub]) r.on('error', (e) => console.error('redis:', e.message));

// channel -> { refs: connections joined or joining, ready: Promise of the SUBSCRIBE }
const rooms = new Map();
const sockets = new Set(); // open WebSockets, only to close them on shutdown
let listenSocket = null;
let shuttingDown = false;

function join(channel) {
  let room = rooms.get(channel);
  if (!room) {
    room = { refs: 0, ready: sub.subscribe(channel) };
    room.ready.catch(() => {}); // handled by whoever awaits it
    rooms.set(channel, room);
  }
  room.refs += 1;
  return room;
}

function leave(channel) {
  const room = rooms.get(channel);
  if (!room) return;
  if (--room.refs === 0) {
    rooms.delete(channel);
    // Same connection as SUBSCRIBE, so a later re-join's SUBSCRIBE is ordered after this.
    sub.unsubscribe(channel).catch((e) => console.error('unsubscribe:', e.message));
  }
}

const app = uWS.App();

sub.on('messageBuffer', (channel, msg) => {
  if (msg.length === 0) return;
  // The uWS topic is the channel name; the Buffer is passed as is (no string decode).
  app.publish(channel, msg.subarray(1), msg[0] === TAG_BINARY);
});

app.ws('/*', {
  compression: uWS.DISABLED,
  maxPayloadLength: 64 * 1024, // roomcast's default limits.max_message_bytes
  idleTimeout: 0, // no heartbeats, like node-ws
  maxLifetime: 0,
  // roomcast's default limits.outbound_queue_bytes: a client with more queued than
  // this is a slow consumer and is disconnected (uWS would otherwise skip it silently).
  maxBackpressure: 1024 * 1024,
  closeOnBackpressureLimit: true,

  upgrade: async (res, req, context) => {
    // req is only valid until the first await: read everything now.
    const room = req.getUrl().slice(1); // getUrl() excludes the query string
    const key = req.getHeader('sec-websocket-key');
    const protocol = req.getHeader('sec-websocket-protocol');
    const extensions = req.getHeader('sec-websocket-extensions');
    if (!room) {
      res.writeStatus('400 Bad Request').end('connect with WebSocket to /<room>\n');
      return;
    }
    const channel = PREFIX + room;
    const state = join(channel);
    let aborted = false;
    res.onAborted(() => {
      aborted = true;
      leave(channel);
    });
    try {
      await state.ready; // answer the handshake only once the room's channel is subscribed
    } catch (e) {
      if (aborted) return;
      console.error('subscribe:', e.message);
      leave(channel);
      res.cork(() => res.writeStatus('503 Service Unavailable').end('redis subscribe failed\n', true));
      return;
    }
    if (aborted) return;
    res.cork(() => res.upgrade({ channel }, key, protocol, extensions, context));
  },

  open: (ws) => {
    sockets.add(ws);
    ws.subscribe(ws.getUserData().channel);
  },

  message: (ws, message, isBinary) => {
    // `message` is only valid during this callback: copy it (with the tag) right away.
    const frame = Buffer.allocUnsafe(message.byteLength + 1);
    frame[0] = isBinary ? TAG_BINARY : TAG_TEXT;
    frame.set(new Uint8Array(message), 1);
    pub.publish(ws.getUserData().channel, frame).catch((e) => console.error('publish:', e.message));
  },

  close: (ws) => {
    sockets.delete(ws);
    if (!shuttingDown) leave(ws.getUserData().channel); // uWS drops its topic subscriptions itself
  },
});

app.any('/*', (res) => {
  res.writeStatus('426 Upgrade Required').writeHeader('content-type', 'text/plain')
    .end('connect with WebSocket to /<room>\n');
});

app.listen(HOST, PORT, (token) => {
  if (!token) {
    console.error(`uws peer: cannot listen on ${HOST}:${PORT}`);
    process.exit(1);
  }
  listenSocket = token;
  console.log(`uws peer (uWebSockets.js ${BINARY}) listening on ws://${HOST}:${PORT}/<room>, redis ${REDIS_URL}`);
});

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.once(sig, () => {
    shuttingDown = true;
    rooms.clear(); // no UNSUBSCRIBE per room on the way out
    if (listenSocket) uWS.us_listen_socket_close(listenSocket);
    listenSocket = null;
    for (const ws of [...sockets]) ws.end(1001, 'server shutting down');
    setTimeout(() => process.exit(0), 500).unref();
    Promise.allSettled([pub.quit(), sub.quit()]).then(() => process.exit(0));
  });
}
