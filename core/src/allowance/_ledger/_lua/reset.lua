-- ARGV: prefix. Deletes the counters and markers whose key starts with it, and
-- those keys' holds from live reservations. The call log stays.
local prefix = ARGV[1]
local low, high = prefix_range(prefix)
local names = redis.call('ZRANGEBYLEX', NAMES, low, high)
for first = 1, #names, 1000 do
  local last = math.min(first + 999, #names)
  redis.call('HDEL', SPENT, unpack(names, first, last))
  redis.call('HDEL', RESERVED, unpack(names, first, last))
end
redis.call('ZREMRANGEBYLEX', NAMES, low, high)
redis.call('ZREMRANGEBYLEX', MARKERS, low, high)
local held = redis.call('ZRANGE', LEASES, 0, -1)
for _, id in ipairs(held) do
  local value = redis.call('HGET', RES, id)
  if value and string.sub(value, 1, 1) == 'H' then
    local items = items_of(value)
    local kept = {items[1], items[2]}
    for i = 3, #items, 2 do
      if string.sub(items[i], 1, #prefix) ~= prefix then
        kept[#kept + 1] = items[i]
        kept[#kept + 1] = items[i + 1]
      end
    end
    if #kept ~= #items then
      redis.call('HSET', RES, id, 'H' .. cjson.encode(kept))
    end
  end
end
return 1
