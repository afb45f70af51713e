-- Shared by every script of the Redis ledger (prepended to each one).
--
-- Keys, all in one hash slot (the namespace is a hash tag, "{allowance}"):
--   KEYS[1] spent     HASH   ledger key -> committed amount
--   KEYS[2] reserved  HASH   ledger key -> amount held by live reservations
--   KEYS[3] names     ZSET   every ledger key with a counter (score 0, by name)
--   KEYS[4] res       HASH   reservation id -> "H" .. json (held), "E" (its
--                            lease expired), "C" (committed), "R" (released)
--   KEYS[5] leases    ZSET   held reservation id -> lease end (Unix seconds)
--   KEYS[6] settled   ZSET   settled or expired id -> when (purged after a day)
--   KEYS[7] markers   ZSET   once-only markers (score 0)
--   KEYS[8] calls     ZSET   the call log: call ts -> seq (16 hex) .. json row
--   KEYS[9] seq       STRING the call log's insertion counter
--
-- Amounts travel as decimal strings and are applied with HINCRBY, so Lua's
-- doubles never round them; comparisons use doubles (exact below 2^53).
local SPENT, RESERVED, NAMES, RES = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local LEASES, SETTLED, MARKERS, CALLS, SEQ = KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]

local function num(x)
  return string.format('%.17g', x)
end

-- The caller's clock when it passed one (tests), else the server's.
local function clock(given)
  if given ~= '' then
    return tonumber(given)
  end
  if redis.replicate_commands then
    redis.replicate_commands() -- Redis 5 and 6: replicate effects, not the script
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- A held record: "H" .. json array of strings {nonce, plan, key, amount, ...}.
local function items_of(value)
  return cjson.decode(string.sub(value, 2))
end

-- Give back a hold; reserved never goes below zero.
local function unhold(key, amount)
  if amount == '0' or redis.call('HEXISTS', RESERVED, key) == 0 then
    return
  end
  if redis.call('HINCRBY', RESERVED, key, '-' .. amount) < 0 then
    redis.call('HSET', RESERVED, key, '0')
  end
end

local function settle(id, status, now)
  redis.call('HSET', RES, id, status)
  redis.call('ZADD', SETTLED, num(now), id)
end

-- Expire every held reservation whose lease ended (expires_at <= now).
local function reap(now)
  local bound = num(now)
  local ids = redis.call('ZRANGEBYSCORE', LEASES, '-inf', bound)
  if #ids == 0 then
    return
  end
  for _, id in ipairs(ids) do
    local value = redis.call('HGET', RES, id)
    if value and string.sub(value, 1, 1) == 'H' then
      local items = items_of(value)
      for i = 3, #items, 2 do
        unhold(items[i], items[i + 1])
      end
      settle(id, 'E', now)
    end
  end
  redis.call('ZREMRANGEBYSCORE', LEASES, '-inf', bound)
end

-- Forget settled reservations older than keep seconds, a bounded batch a call.
local function purge(now, keep)
  local old = redis.call(
    'ZRANGEBYSCORE', SETTLED, '-inf', '(' .. num(now - keep), 'LIMIT', 0, 256)
  if #old > 0 then
    redis.call('HDEL', RES, unpack(old))
    redis.call('ZREM', SETTLED, unpack(old))
  end
end

-- Append a call to the log, keeping the newest cap calls.
local function log_call(ts, row, cap)
  if row == '' then
    return
  end
  local seq = redis.call('INCR', SEQ)
  redis.call('ZADD', CALLS, ts, string.format('%016x', seq) .. row)
  local count = redis.call('ZCARD', CALLS)
  if count > cap then
    redis.call('ZREMRANGEBYRANK', CALLS, 0, count - cap - 1)
  end
end

local function prefix_range(prefix)
  if prefix == '' then
    return '-', '+'
  end
  -- UTF-8 never contains the byte 0xFF: it bounds every key with the prefix.
  return '[' .. prefix, '(' .. prefix .. '\255'
end
