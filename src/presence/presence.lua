#!lua name=pushnode_presence
--
-- Cluster-wide state of the Pusher front end, as a Redis Functions library: presence members,
-- and subscription counts (at the end). The node loads it at start and after reconnects;
-- nothing else needs to call it.
--
-- Presence: KEYS[1] is a channel's prefix, `pushnode:presence:{<app>:<channel>}`; every key
-- of the channel shares its hash tag, so in a Redis Cluster one channel lives in one slot:
--
--   <prefix>:nodes         sorted set: node id -> the time (ms) until which the node is alive
--   <prefix>:node:<node>   hash: user id (its JSON text) -> user info (JSON text), the users
--                          with a socket on that node
--
-- A user is a member while any live node holds it. A node's deadline in a channel is renewed
-- by its joins and by its repairs (every four TTLs) and lasts twelve TTLs: a backstop. Dead
-- nodes are found sooner through the node registry (`pushnode_presence_alive`, refreshed
-- every third of the TTL) and evicted from every channel they held
-- (`pushnode_presence_evict`). Any call on a channel also removes ("reaps") nodes past their
-- deadline there. Every function returns the users whose membership changed, so each change
-- is announced once, by the node whose call made it.
--
-- Times come from Redis (TIME), so the nodes' clocks do not matter.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function node_key(prefix, node)
  return prefix .. ':node:' .. node
end

local function live_nodes(prefix, now)
  return redis.call('ZRANGEBYSCORE', prefix .. ':nodes', now, '+inf')
end

-- Whether a live node other than `except` holds `user`.
local function held_elsewhere(prefix, user, except, now)
  for _, node in ipairs(live_nodes(prefix, now)) do
    if node ~= except and redis.call('HEXISTS', node_key(prefix, node), user) == 1 then
      return true
    end
  end
  return false
end

-- Removes the nodes past their deadline; returns the users no live node holds any more.
local function reap(prefix, now)
  local dead = redis.call('ZRANGEBYSCORE', prefix .. ':nodes', '-inf', '(' .. now)
  local candidates, seen = {}, {}
  for _, node in ipairs(dead) do
    for _, user in ipairs(redis.call('HKEYS', node_key(prefix, node))) do
      if not seen[user] then
        seen[user] = true
        candidates[#candidates + 1] = user
      end
    end
    redis.call('DEL', node_key(prefix, node))
    redis.call('ZREM', prefix .. ':nodes', node)
  end
  local gone = {}
  for _, user in ipairs(candidates) do
    if not held_elsewhere(prefix, user, nil, now) then
      gone[#gone + 1] = user
    end
  end
  return gone
end

-- Distinct members held by live nodes.
local function member_count(prefix, now)
  local seen, n = {}, 0
  for _, node in ipairs(live_nodes(prefix, now)) do
    for _, user in ipairs(redis.call('HKEYS', node_key(prefix, node))) do
      if not seen[user] then
        seen[user] = true
        n = n + 1
      end
    end
  end
  return n
end

-- Keeps the channel's keys while any node uses them; left alone, they go after 4 TTLs.
local function touch(prefix, node, now, ttl)
  redis.call('ZADD', prefix .. ':nodes', now + ttl, node)
  redis.call('PEXPIRE', prefix .. ':nodes', ttl * 4)
  redis.call('PEXPIRE', node_key(prefix, node), ttl * 4)
end

-- FCALL pushnode_presence_join 1 <prefix> <node> <user> <info> <ttl ms> <max members>
-- Returns {status, gone}: status 1 when the user became a member (announce it), 0 when it
-- already was one, -1 when the channel is full (nothing was changed).
local function join(keys, args)
  local prefix, node, user, info = keys[1], args[1], args[2], args[3]
  local ttl, max = tonumber(args[4]), tonumber(args[5])
  local now = now_ms()
  local gone = reap(prefix, now)
  local here = redis.call('HEXISTS', node_key(prefix, node), user) == 1
  local new = not here and not held_elsewhere(prefix, user, node, now)
  if new and member_count(prefix, now) >= max then
    return {-1, gone}
  end
  redis.call('HSET', node_key(prefix, node), user, info)
  touch(prefix, node, now, ttl)
  return {new and 1 or 0, gone}
end

-- FCALL pushnode_presence_leave 1 <prefix> <node> <user>
-- Returns {1 when the user is no member any more (announce it) else 0, gone}.
local function leave(keys, args)
  local prefix, node, user = keys[1], args[1], args[2]
  local now = now_ms()
  local gone = reap(prefix, now)
  local removed = redis.call('HDEL', node_key(prefix, node), user) == 1
  if redis.call('HLEN', node_key(prefix, node)) == 0 then
    redis.call('ZREM', prefix .. ':nodes', node)
  end
  if removed and not held_elsewhere(prefix, user, node, now) then
    return {1, gone}
  end
  return {0, gone}
end

-- FCALL pushnode_presence_sync 1 <prefix> <node> <ttl ms> [<user> <info>]...
-- Makes the node's hash exactly the given users (the node's own truth) and refreshes its
-- deadline. Returns {added (user, info pairs), removed users, gone}: what joins and leaves
-- that did not reach Redis in time (a dropped command, an outage) changed, and what reaping
-- removed.
local function sync(keys, args)
  local prefix, node, ttl = keys[1], args[1], tonumber(args[2])
  local now = now_ms()
  local gone = reap(prefix, now)
  local key = node_key(prefix, node)
  local wanted = {}
  for i = 3, #args, 2 do
    wanted[args[i]] = args[i + 1]
  end
  local added, removed = {}, {}
  for _, user in ipairs(redis.call('HKEYS', key)) do
    if wanted[user] == nil then
      redis.call('HDEL', key, user)
      if not held_elsewhere(prefix, user, node, now) then
        removed[#removed + 1] = user
      end
    end
  end
  for user, info in pairs(wanted) do
    if redis.call('HSETNX', key, user, info) == 1 and not held_elsewhere(prefix, user, node, now) then
      added[#added + 1] = user
      added[#added + 1] = info
    end
  end
  if next(wanted) == nil then
    redis.call('DEL', key)
    redis.call('ZREM', prefix .. ':nodes', node)
  else
    touch(prefix, node, now, ttl)
  end
  return {added, removed, gone}
end

-- FCALL_RO-safe in effect (it may reap): pushnode_presence_members 1 <prefix>
-- Returns {members (user, info pairs, each user once), gone}.
local function members(keys, args)
  local prefix = keys[1]
  local now = now_ms()
  local gone = reap(prefix, now)
  local seen, out = {}, {}
  for _, node in ipairs(live_nodes(prefix, now)) do
    local pairs_ = redis.call('HGETALL', node_key(prefix, node))
    for i = 1, #pairs_, 2 do
      if not seen[pairs_[i]] then
        seen[pairs_[i]] = true
        out[#out + 1] = pairs_[i]
        out[#out + 1] = pairs_[i + 1]
      end
    end
  end
  return {out, gone}
end

redis.register_function('pushnode_presence_join', join)
redis.register_function('pushnode_presence_leave', leave)
redis.register_function('pushnode_presence_sync', sync)
redis.register_function('pushnode_presence_members', members)

-- ---- Subscription counts per Pusher channel, for the HTTP API's channel queries ----
--
-- KEYS[1] is an app's prefix, `pushnode:counts:{<app>}`:
--   <prefix>:nodes         sorted set: node id -> the time (ms) until which its counts hold
--   <prefix>:node:<node>   hash: channel -> sockets subscribed on that node
-- Each node rewrites its hash when its counts change and refreshes its deadline every second;
-- a dead node's counts stop counting at its deadline.

-- FCALL pushnode_counts_put 1 <prefix> <node> <ttl ms> <replace 0|1> [<channel> <count>]...
local function counts_put(keys, args)
  local prefix, node, ttl, replace = keys[1], args[1], tonumber(args[2]), args[3] == '1'
  local now = now_ms()
  local key = node_key(prefix, node)
  if replace then
    redis.call('DEL', key)
    for i = 4, #args, 2 do
      redis.call('HSET', key, args[i], args[i + 1])
    end
  end
  redis.call('ZADD', prefix .. ':nodes', now + ttl, node)
  redis.call('ZREMRANGEBYSCORE', prefix .. ':nodes', '-inf', '(' .. now)
  redis.call('PEXPIRE', key, ttl)
  redis.call('PEXPIRE', prefix .. ':nodes', ttl * 4)
  return 1
end

-- FCALL pushnode_counts_get 1 <prefix> [<channel>]
-- Returns the sum over live nodes: for one channel its count, else {channel, count, ...}.
local function counts_get(keys, args)
  local prefix, channel = keys[1], args[1]
  local now = now_ms()
  if channel then
    local total = 0
    for _, node in ipairs(live_nodes(prefix, now)) do
      total = total + (tonumber(redis.call('HGET', node_key(prefix, node), channel)) or 0)
    end
    return total
  end
  local totals, order = {}, {}
  for _, node in ipairs(live_nodes(prefix, now)) do
    local flat = redis.call('HGETALL', node_key(prefix, node))
    for i = 1, #flat, 2 do
      if totals[flat[i]] == nil then
        totals[flat[i]] = 0
        order[#order + 1] = flat[i]
      end
      totals[flat[i]] = totals[flat[i]] + tonumber(flat[i + 1])
    end
  end
  local out = {}
  for _, ch in ipairs(order) do
    out[#out + 1] = ch
    out[#out + 1] = totals[ch]
  end
  return out
end

redis.register_function('pushnode_counts_put', counts_put)
redis.register_function{function_name = 'pushnode_counts_get', callback = counts_get, flags = {'no-writes'}}

-- ---- Nodes, for reaping channels no live node touches any more ----
--
-- FCALL pushnode_presence_alive 1 <registry> <node> <ttl ms>
-- KEYS[1] is `pushnode:presence:nodes` (or `pushnode:occupancy:nodes`): node -> deadline (ms).
-- Refreshes the caller's deadline; returns the nodes past theirs (dead: their channels are to
-- be reaped by the caller, from the set of channels each node keeps beside the registry).
local function alive(keys, args)
  local now = now_ms()
  redis.call('ZADD', keys[1], now + tonumber(args[2]), args[1])
  return redis.call('ZRANGEBYSCORE', keys[1], '-inf', '(' .. now)
end

-- FCALL pushnode_presence_evict 1 <channel prefix> <node>
-- Removes a node the registry found dead from one channel, whatever its deadline there (a join
-- may have pushed that past the registry's), and returns the users nobody holds any more.
local function evict(keys, args)
  redis.call('ZADD', keys[1] .. ':nodes', 'XX', 0, args[1])
  return reap(keys[1], now_ms())
end

redis.register_function('pushnode_presence_alive', alive)
redis.register_function('pushnode_presence_evict', evict)
