-- ARGV: prefix. Returns {key, spent, reserved, ...} for every counter whose key
-- starts with the prefix, in byte order.
local low, high = prefix_range(ARGV[1])
local names = redis.call('ZRANGEBYLEX', NAMES, low, high)
local out = {}
for first = 1, #names, 1000 do
  local last = math.min(first + 999, #names)
  local spent = redis.call('HMGET', SPENT, unpack(names, first, last))
  local reserved = redis.call('HMGET', RESERVED, unpack(names, first, last))
  for i = first, last do
    out[#out + 1] = names[i]
    out[#out + 1] = spent[i - first + 1] or '0'
    out[#out + 1] = reserved[i - first + 1] or '0'
  end
end
return out
