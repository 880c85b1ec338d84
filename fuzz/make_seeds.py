#!/usr/bin/env python3
"""Writes the seed corpora (corpus/<target>/seed-*): a few small, meaningful
inputs per target. Run from fuzz/: `python3 make_seeds.py`. The input
layouts are described at the top of each fuzz_targets/*.rs."""
import json, os

def frame(opcode, payload, fin=True, mask=b"\x37\xfa\x21\x3d"):
    """A masked client frame."""
    out = bytearray([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        out.append(0x80 | n)
    elif n <= 0xFFFF:
        out += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        out += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    out += mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(out)

def zframe(opcode, payload, fin=True):
    """Masked with the zero key: the payload is readable, easy to mutate."""
    return frame(opcode, payload, fin, mask=b"\0\0\0\0")

def reader(stream, max_b=255, chunk_b=63, leftover=0, sizes=(0x7f,)):
    """frame_reader input: max_message = 1 + 2*max_b, read_chunk = 1 + chunk_b % 128."""
    return bytes([max_b, chunk_b, leftover, len(sizes) - 1, *sizes]) + stream

join = json.dumps({"op": "join", "room": "lobby", "id": 1}).encode()
seeds = {
    "frame_reader": {
        "text": reader(frame(0x1, b"hello, room")),
        "json-join-with-handshake-leftover": reader(zframe(0x1, join), leftover=9),
        "fragmented-text-ping-between": reader(
            frame(0x1, b"hel", fin=False) + frame(0x9, b"p") + frame(0x0, b"lo"),
            sizes=(0, 2, 0x83)),
        "utf8-split-across-fragments": reader(
            zframe(0x1, "\u20ac".encode()[:1], fin=False)
            + zframe(0x0, "\u20ac".encode()[1:2], fin=False)
            + zframe(0x0, "\u20ac".encode()[2:]), sizes=(0,)),
        "binary-16bit-length": reader(frame(0x2, bytes(range(200))), chunk_b=15, sizes=(40, 0x90)),
        "close-1000-bye": reader(frame(0x8, (1000).to_bytes(2, "big") + b"bye")),
        "pong-then-close-empty": reader(frame(0xA, b"") + frame(0x8, b"")),
        "too-big-64bit-length": reader(bytes([0x82, 0x80 | 127]) + (1 << 40).to_bytes(8, "big")
                                       + b"\1\2\3\4" + b"x" * 40, max_b=10),
        "unmasked-then-garbage": reader(bytes([0x81, 0x03]) + b"abc" + b"\xab" * 64, sizes=(7,)),
    },
    "json_request": {
        "join": join,
        "leave": b'{"op":"leave","room":"lobby"}',
        "send": b'{"op":"send","room":"r1","event":"danmaku","data":{"t":"hi","n":[1,2.5,null]},"id":9}',
        "ping": b'{"op":"ping","id":3}',
        "unknown-op": b'{"op":"fly","id":4}',
        "bad-room": b'{"op":"join","room":"a b","id":5}',
        "nested-data": b'{"op":"send","room":"r","event":"e","data":[[[[{"a":"\\u00e9\\"]"}]]]]}',
        "join-since": b'{"op":"join","room":"h:1","since":{"seq":1041,"epoch":"1764120000123456"},"id":6}',
        "join-history": b'{"op":"join","room":"h:1","history":20}',
    },
    "bus_envelope": {
        # byte 0 picks the room, the rest is what arrived on the channel.
        "json-send": b"\x05" + b'{"event":"danmaku","from":"c1","ts":1700000000000,"data":{"t":"hi"}}',
        "backend-minimal": b"\x00" + b'{"event":"live","data":[1,2]}',
        "raw-text": b"\x7f" + '{"event":"message","from":"c","ts":1,"data":"h\\u00e9llo \\"q\\"","raw":"text"}'.encode(),
        "raw-binary": b"\x10" + b'{"event":"message","from":"c","ts":1,"data":"AJ+SlP8=","raw":"binary"}',
        "raw-bad-kind": b"\x01" + b'{"event":"e","data":"x","raw":"xml"}',
        "stamped": b"\x03" + b'{"seq":42,"epoch":"1764120000123456","event":"gift","data":{"g":1}}',
    },
    "ws_query": {
        # byte 0 is max_rooms (% 40).
        "two-rooms-dedup": b"\x08room=a&x=1&room=b&room=a",
        "raw-one-room": b"\x08format=raw&room=r",
        "encoded-room": b"\x02room=a%3Ab%40c&format=json",
        "too-many": b"\x02room=a&room=b&room=c",
        "bad-room": b"\x08room=a+b",
        "since": b"\x08room=a&since=live:h:1:41:1764120000123456",
    },
}
for target, files in seeds.items():
    d = os.path.join("corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(d, "seed-" + name), "wb") as f:
            f.write(data)
