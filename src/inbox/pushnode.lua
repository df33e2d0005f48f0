#!lua name=pushnode
--
-- pushnode's inbox as a Redis Functions library. The node loads it at start (and again if a
-- restarted Redis lost it); applications may call it too, to persist and publish with one
-- command and no HTTP:
--
--   FCALL pushnode_notify 1 pushnode:inbox:{42} push:message:42 PUBLISH '{"title":"Hi"}' '' '' 200 2592000000 86400000
--
-- KEYS[1] is the user's inbox stream, `<inbox.key_prefix>{<user>}`. The keys derived from it
-- (`…:unread`, `…:idem:<key>`) share its hash tag, so in a Redis Cluster everything of one
-- user, and its `{user}` channel, lives in one slot.
--
-- Layout: the stream holds the retained notifications (fields ts, event, data; the stream id
-- is the notification id, ordered per user); the sorted set `…:unread` holds the unread ids
-- (score = the id's millisecond part). Invariant: unread ⊆ stream, so the unread count never
-- disagrees with the inbox. Every function keeps it in one atomic step.

local function parse_id(id)
  local ms, seq = string.match(id or '', '^(%d+)%-(%d+)$')
  if not ms then return nil end
  return tonumber(ms), tonumber(seq)
end

-- Whether stream id a < b.
local function before(a, b)
  local ams, aseq = parse_id(a)
  local bms, bseq = parse_id(b)
  return ams < bms or (ams == bms and aseq < bseq)
end

-- Removes unread ids at or below `id` (inclusive) or strictly below it.
local function drop_unread_upto(unread, id, inclusive)
  local ms = parse_id(id)
  redis.call('ZREMRANGEBYSCORE', unread, '-inf', '(' .. string.format('%.0f', ms))
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', unread, ms, ms)) do
    if before(member, id) or (inclusive and member == id) then
      redis.call('ZREM', unread, member)
    end
  end
end

-- Keeps unread ⊆ stream after trimming.
local function prune_unread(stream, unread)
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  if #first == 0 then
    redis.call('DEL', unread)
  else
    drop_unread_upto(unread, first[1][1], false)
  end
end

local function envelope(id, ts, event, data, unread)
  local parts = { '{"pushnode":1,"id":"', id, '","ts":', ts, ',"persisted":true' }
  if unread then
    table.insert(parts, ',"unread":' .. unread)
  end
  if event ~= '' then
    table.insert(parts, ',"event":' .. cjson.encode(event))
  end
  table.insert(parts, ',"data":' .. data .. '}')
  return table.concat(parts)
end

-- pushnode_notify KEYS[1]=stream; ARGV: channel, publish command (PUBLISH|SPUBLISH), data
-- (JSON), event ('' for none), idempotency key ('' for none), max per user, ttl ms (0 = none),
-- idempotency ttl ms. Returns {id, unread, duplicate (0|1)}.
local function notify(keys, args)
  local stream = keys[1]
  local unread = stream .. ':unread'
  local channel, command, data, event, idem = args[1], args[2], args[3], args[4] or '', args[5] or ''
  local max_len, ttl_ms, idem_ttl = tonumber(args[6]), tonumber(args[7]), tonumber(args[8])
  if command ~= 'PUBLISH' and command ~= 'SPUBLISH' then
    return redis.error_reply('publish command must be PUBLISH or SPUBLISH')
  end
  if not data or data == '' or not max_len or max_len < 1 or not ttl_ms or not idem_ttl then
    return redis.error_reply('usage: channel command data event idem max_len ttl_ms idem_ttl_ms')
  end
  local idem_key = stream .. ':idem:' .. idem
  if idem ~= '' then
    local previous = redis.call('GET', idem_key)
    if previous then
      return { previous, redis.call('ZCARD', unread), 1 }
    end
  end
  local now = redis.call('TIME')
  local ts = string.format('%.0f', tonumber(now[1]) * 1000000 + tonumber(now[2]))
  local id = redis.call('XADD', stream, 'MAXLEN', max_len, '*', 'ts', ts, 'event', event, 'data', data)
  redis.call('ZADD', unread, (parse_id(id)), id)
  if ttl_ms > 0 then
    local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
    redis.call('XTRIM', stream, 'MINID', string.format('%.0f', now_ms - ttl_ms))
    redis.call('PEXPIRE', stream, ttl_ms)
    redis.call('PEXPIRE', unread, ttl_ms)
  end
  prune_unread(stream, unread)
  local count = redis.call('ZCARD', unread)
  if idem ~= '' then
    redis.call('SET', idem_key, id, 'PX', idem_ttl)
  end
  redis.call(command, channel, envelope(id, ts, event, data, count))
  return { id, count, 0 }
end

-- pushnode_read KEYS[1]=stream; ARGV: channel, publish command, mode (all|upto|ids), ids...
-- Publishes the new unread count to every session of the user. Returns the count.
local function read(keys, args)
  local stream = keys[1]
  local unread = stream .. ':unread'
  local channel, command, mode = args[1], args[2], args[3]
  if command ~= 'PUBLISH' and command ~= 'SPUBLISH' then
    return redis.error_reply('publish command must be PUBLISH or SPUBLISH')
  end
  if mode == 'all' then
    redis.call('DEL', unread)
  elseif mode == 'upto' then
    if not parse_id(args[4]) then return redis.error_reply('bad id') end
    drop_unread_upto(unread, args[4], true)
  elseif mode == 'ids' then
    for i = 4, #args do
      redis.call('ZREM', unread, args[i])
    end
  else
    return redis.error_reply('mode must be all, upto or ids')
  end
  local count = redis.call('ZCARD', unread)
  redis.call(command, channel, '{"pushnode":1,"type":"unread","unread":' .. count .. '}')
  return count
end

-- pushnode_list KEYS[1]=stream; ARGV: after id ('' = from the oldest), limit, unread only
-- (1|0). Returns {{id, ts, event, data, unread (0|1)}, ...} in id order.
local function list(keys, args)
  local stream = keys[1]
  local unread = stream .. ':unread'
  local after, limit, unread_only = args[1] or '', tonumber(args[2]) or 100, args[3] == '1'
  if after ~= '' and not parse_id(after) then return redis.error_reply('bad id') end
  local out = {}
  if unread_only then
    -- Scores are the ids' milliseconds: start at `after`'s, and parse every id once (not
    -- in each comparison) to order ties within one millisecond by sequence.
    local from = after == '' and '-inf' or string.format('%.0f', (parse_id(after)))
    local keyed = {}
    for _, id in ipairs(redis.call('ZRANGE', unread, from, '+inf', 'BYSCORE')) do
      local ms, seq = parse_id(id)
      table.insert(keyed, { ms, seq, id })
    end
    table.sort(keyed, function(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end)
    for _, k in ipairs(keyed) do
      local id = k[3]
      if #out >= limit then break end
      if after == '' or before(after, id) then
        local entry = redis.call('XRANGE', stream, id, id)
        if #entry == 1 then
          local f = entry[1][2]
          table.insert(out, { id, f[2], f[4], f[6], 1 })
        end
      end
    end
  else
    local start = after == '' and '-' or ('(' .. after)
    for _, entry in ipairs(redis.call('XRANGE', stream, start, '+', 'COUNT', limit)) do
      local f = entry[2]
      local is_unread = redis.call('ZSCORE', unread, entry[1]) and 1 or 0
      table.insert(out, { entry[1], f[2], f[4], f[6], is_unread })
    end
  end
  return out
end

-- pushnode_state KEYS[1]=stream. Returns {unread count, newest id or ''}.
local function state(keys)
  local newest = redis.call('XREVRANGE', keys[1], '+', '-', 'COUNT', 1)
  return { redis.call('ZCARD', keys[1] .. ':unread'), #newest == 1 and newest[1][1] or '' }
end

redis.register_function('pushnode_notify', notify)
redis.register_function('pushnode_read', read)
redis.register_function{ function_name = 'pushnode_list', callback = list, flags = { 'no-writes' } }
redis.register_function{ function_name = 'pushnode_state', callback = state, flags = { 'no-writes' } }
