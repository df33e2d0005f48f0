#!lua name=pushnode_webhooks
--
-- The webhook queue, shared by every node, as a Redis Functions library. KEYS[1] is the
-- queue's prefix, `pushnode:webhooks:{q}` (one slot in a Redis Cluster):
--
--   <prefix>:due     sorted set: entry id -> when it may be sent (ms); a claimed entry's
--                    score is pushed to the end of its lease, so no other node takes it
--   <prefix>:events  hash: entry id -> the entry (JSON: endpoint, event, time, attempts)
--   <prefix>:seq     the last entry id
--
-- A node claims due entries, sends them, and on success deletes them; on failure it puts them
-- back with a later due time; a node that dies holding a lease lets it expire and another
-- node sends them. Times come from Redis (TIME).

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- FCALL pushnode_webhook_push 1 <prefix> <max> <entry>...
-- Returns {queued, dropped}: entries beyond <max> waiting are dropped.
local function push(keys, args)
  local prefix, max = keys[1], tonumber(args[1])
  local now = now_ms()
  local queued, dropped = 0, 0
  for i = 2, #args do
    if redis.call('ZCARD', prefix .. ':due') >= max then
      dropped = dropped + 1
    else
      local id = redis.call('INCR', prefix .. ':seq')
      redis.call('HSET', prefix .. ':events', id, args[i])
      redis.call('ZADD', prefix .. ':due', now, id)
      queued = queued + 1
    end
  end
  return {queued, dropped}
end

-- FCALL pushnode_webhook_claim 1 <prefix> <max> <lease ms>
-- Returns {id, entry, id, entry, ...}: up to <max> due entries, leased to the caller.
local function claim(keys, args)
  local prefix, max, lease = keys[1], tonumber(args[1]), tonumber(args[2])
  local now = now_ms()
  local ids = redis.call('ZRANGEBYSCORE', prefix .. ':due', '-inf', now, 'LIMIT', 0, max)
  local out = {}
  for _, id in ipairs(ids) do
    local entry = redis.call('HGET', prefix .. ':events', id)
    if entry then
      redis.call('ZADD', prefix .. ':due', now + lease, id)
      out[#out + 1] = id
      out[#out + 1] = entry
    else
      redis.call('ZREM', prefix .. ':due', id)
    end
  end
  return out
end

-- FCALL pushnode_webhook_done 1 <prefix> <id>...   (sent, or dropped for good)
local function done(keys, args)
  local prefix = keys[1]
  for _, id in ipairs(args) do
    redis.call('ZREM', prefix .. ':due', id)
    redis.call('HDEL', prefix .. ':events', id)
  end
  return #args
end

-- FCALL pushnode_webhook_retry 1 <prefix> [<id> <delay ms> <entry>]...
-- Puts failed entries back, rewritten (their attempt count), due after their delay.
local function retry(keys, args)
  local prefix = keys[1]
  local now = now_ms()
  for i = 1, #args, 3 do
    if redis.call('HEXISTS', prefix .. ':events', args[i]) == 1 then
      redis.call('HSET', prefix .. ':events', args[i], args[i + 2])
      redis.call('ZADD', prefix .. ':due', now + tonumber(args[i + 1]), args[i])
    end
  end
  return 1
end

redis.register_function('pushnode_webhook_push', push)
redis.register_function('pushnode_webhook_claim', claim)
redis.register_function('pushnode_webhook_done', done)
redis.register_function('pushnode_webhook_retry', retry)
