-- ARGV: now ('' = server time), lease seconds, reservation id, nonce,
--   purge-after seconds, n, n keys, plan count, then per plan: item count and
--   (key, amount, limit, gate or '') per item, folded per key by the caller.
-- Returns {plan (-1 none, -2 id already known), spent and reserved of each key}.
local now = clock(ARGV[1])
local lease, id, nonce = tonumber(ARGV[2]), ARGV[3], ARGV[4]
reap(now)
purge(now, tonumber(ARGV[5]))

local n = tonumber(ARGV[6])
local keys = {}
for i = 1, n do
  keys[i] = ARGV[6 + i]
end
local spent, reserved = {}, {}
if n > 0 then
  spent = redis.call('HMGET', SPENT, unpack(keys))
  reserved = redis.call('HMGET', RESERVED, unpack(keys))
end
local used, out = {}, {0}
for i = 1, n do
  local s, r = tonumber(spent[i] or '0'), tonumber(reserved[i] or '0')
  used[keys[i]] = s + r
  out[2 * i] = s
  out[2 * i + 1] = r
end

local existing = redis.call('HGET', RES, id)
if existing and string.sub(existing, 1, 1) == 'H' then
  local items = items_of(existing)
  if items[1] == nonce then
    -- This very reserve, retried by the client after a lost reply: report
    -- what it admitted, and the state before its hold.
    local held = {}
    for i = 3, #items, 2 do
      held[items[i]] = tonumber(items[i + 1])
    end
    for i = 1, n do
      out[2 * i + 1] = out[2 * i + 1] - (held[keys[i]] or 0)
    end
    out[1] = tonumber(items[2])
    return out
  end
end

local pos = 7 + n
local plans = tonumber(ARGV[pos])
pos = pos + 1
local chosen, start, count = -1, 0, 0
for p = 0, plans - 1 do
  local m = tonumber(ARGV[pos])
  local first = pos + 1
  local fits = true
  for j = 0, m - 1 do
    local at = first + 4 * j
    local u = used[ARGV[at]]
    if u + tonumber(ARGV[at + 1]) > tonumber(ARGV[at + 2]) then
      fits = false
      break
    end
    local gate = ARGV[at + 3]
    if gate ~= '' and u > tonumber(gate) then
      fits = false
      break
    end
  end
  if fits then
    chosen, start, count = p, first, m
    break
  end
  pos = first + 4 * m
end
if chosen < 0 then
  out[1] = -1
  return out
end
if existing then
  out[1] = -2
  return out
end

local items = {nonce, tostring(chosen)}
for j = 0, count - 1 do
  local at = start + 4 * j
  local key, amount = ARGV[at], ARGV[at + 1]
  redis.call('HINCRBY', RESERVED, key, amount)
  redis.call('ZADD', NAMES, 0, key)
  items[#items + 1] = key
  items[#items + 1] = amount
end
redis.call('HSET', RES, id, 'H' .. cjson.encode(items))
redis.call('ZADD', LEASES, num(now + lease), id)
out[1] = chosen
return out
