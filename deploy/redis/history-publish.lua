-- roomcast: publish one message into a history room, atomically: give it
-- the room's next seq (starting the room's epoch if it has none), store it
-- in the room's history, trim the history to its size, renew the ttl, and
-- PUBLISH it on the room's channel. Every roomcast node calls this script
-- for its history rooms; a backend publishing straight into Redis calls it
-- too (docs/protocol.md, "Publishing into a history room from Redis").
--
-- KEYS[1] = {<channel>}:meta   (hash: epoch, seq)
-- KEYS[2] = {<channel>}:hist   (sorted set: stamped envelopes by seq)
-- ARGV[1] = <channel>          e.g. roomcast:room:h:42
-- ARGV[2] = the envelope: a JSON object without seq/epoch
-- ARGV[3] = history.size       ARGV[4] = history.ttl in milliseconds
-- ARGV[5] = "sharded" on a Redis Cluster (roomcast bus.kind = "redis-cluster"):
--           SPUBLISH, so the message stays within the room's shard; else PUBLISH
-- Returns {seq, epoch, receivers}.
local env = ARGV[2]
if string.sub(env, 1, 1) ~= '{' then
  return redis.error_reply('ERR roomcast: the envelope must be a JSON object')
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  local t = redis.call('TIME')
  epoch = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
  redis.call('DEL', KEYS[2])
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local head = '{"seq":' .. string.format('%d', seq) .. ',"epoch":"' .. epoch .. '"'
local rest = string.sub(env, 2)
if string.match(rest, '^%s*}%s*$') then
  env = head .. '}'
else
  env = head .. ',' .. rest
end
redis.call('ZADD', KEYS[2], seq, env)
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[3]) + 1))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
local publish = 'PUBLISH'
if ARGV[5] == 'sharded' then
  publish = 'SPUBLISH'
end
local receivers = redis.call(publish, ARGV[1], env)
return {seq, epoch, receivers}
