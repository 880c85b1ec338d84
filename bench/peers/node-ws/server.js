'use strict';
// Comparison peer for roomcast benchmarks: the broadcast server people hand-roll
// with Node `ws` + `ioredis`. A client connects to ws://HOST:PORT/<room>; every
// frame it sends is PUBLISHed to Redis channel `peer:room:<room>`; this node
// SUBSCRIBEs to a room's channel while it has local clients in that room, and
// relays every message from Redis to all of them (the sender included).
//
// Redis carries bytes only, so a one-byte tag in front of the payload ('t' text,
// 'b' binary) keeps the frame type; the payload itself is relayed byte for byte.
const http = require('node:http');
const { WebSocketServer } = require('ws');
const Redis = require('ioredis');

const HOST = process.env.HOST || '127.0.0.1';
const PORT = Number(process.env.PORT || 9090);
const REDIS_URL = process.env.REDIS_URL || 'redis://127.0.0.1:6379';
const PREFIX = 'peer:room:';
const TAG_TEXT = Buffer.from('t');
const TAG_BINARY = Buffer.from('b');

const pub = new Redis(REDIS_URL);
const sub = new Redis(REDIS_URL);
for (const r of [pub, sub]) r.on('error', (e) => console.error('redis:', e.message));

// channel -> { refs: connections joined or joining, clients: Set<WebSocket>, ready: Promise }
const rooms = new Map();

function join(channel) {
  let room = rooms.get(channel);
  if (!room) {
    room = { refs: 0, clients: new Set(), ready: sub.subscribe(channel) };
    rooms.set(channel, room);
  }
  room.refs += 1;
  return room;
}

function leave(channel, ws) {
  const room = rooms.get(channel);
  if (!room) return;
  room.clients.delete(ws);
  if (--room.refs === 0) {
    rooms.delete(channel);
    // Same connection as SUBSCRIBE, so a later re-join's SUBSCRIBE is ordered after this.
    sub.unsubscribe(channel).catch((e) => console.error('unsubscribe:', e.message));
  }
}

sub.on('messageBuffer', (channelBuf, msg) => {
  const room = rooms.get(channelBuf.toString());
  if (!room || msg.length === 0) return;
  const binary = msg[0] === TAG_BINARY[0];
  const payload = msg.subarray(1);
  for (const ws of room.clients) {
    if (ws.readyState === ws.OPEN) ws.send(payload, { binary });
  }
});

const server = http.createServer((req, res) => {
  res.writeHead(426, { 'content-type': 'text/plain' }).end('connect with WebSocket to /<room>\n');
});
const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false });

server.on('upgrade', async (req, socket, head) => {
  const room = req.url.split('?')[0].slice(1);
  if (!room) return socket.destroy();
  const channel = PREFIX + room;
  const state = join(channel);
  let ws;
  socket.once('close', () => leave(channel, ws)); // fires whether or not the upgrade completes
  try {
    await state.ready; // answer the handshake only once the room's channel is subscribed
  } catch (e) {
    console.error('subscribe:', e.message);
    return socket.destroy();
  }
  if (socket.destroyed) return;
  wss.handleUpgrade(req, socket, head, (client) => {
    ws = client;
    state.clients.add(ws);
    ws.on('message', (data, isBinary) => {
      pub.publish(channel, Buffer.concat([isBinary ? TAG_BINARY : TAG_TEXT, data]))
        .catch((e) => console.error('publish:', e.message));
    });
    ws.on('error', () => ws.terminate());
  });
});

server.listen(PORT, HOST, () => console.log(`node-ws peer listening on ws://${HOST}:${PORT}/<room>, redis ${REDIS_URL}`));

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.once(sig, () => {
    rooms.clear(); // no UNSUBSCRIBE per room on the way out
    for (const ws of wss.clients) ws.close(1001, 'server shutting down');
    server.close();
    setTimeout(() => process.exit(0), 500).unref();
    Promise.allSettled([pub.quit(), sub.quit()]).then(() => process.exit(0));
  });
}
