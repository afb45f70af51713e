-- ARGV: now ('' = server time), reservation id, record ts, record row ('' =
--   none), call log cap, n, then n (key, amount) pairs.
-- Returns 1 when it charged, 0 when the reservation was settled already.
local id = ARGV[2]
local value = redis.call('HGET', RES, id)
local now = clock(ARGV[1])
if value then
  local status = string.sub(value, 1, 1)
  if status == 'H' then
    local items = items_of(value)
    for i = 3, #items, 2 do
      unhold(items[i], items[i + 1])
    end
    redis.call('ZREM', LEASES, id)
  elseif status ~= 'E' then
    return 0 -- committed or released already: a repeat changes nothing
  end
end
-- Unknown ids (purged, or never reserved here) are charged too.
settle(id, 'C', now)
local n = tonumber(ARGV[6])
for i = 0, n - 1 do
  local key, amount = ARGV[7 + 2 * i], ARGV[8 + 2 * i]
  redis.call('HINCRBY', SPENT, key, amount)
  redis.call('ZADD', NAMES, 0, key)
end
log_call(ARGV[3], ARGV[4], tonumber(ARGV[5]))
return 1
