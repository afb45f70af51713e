-- ARGV: keys. Returns spent and reserved of each, in one consistent read.
local out = {}
if #ARGV == 0 then
  return out
end
local spent = redis.call('HMGET', SPENT, unpack(ARGV))
local reserved = redis.call('HMGET', RESERVED, unpack(ARGV))
for i = 1, #ARGV do
  out[2 * i - 1] = spent[i] or '0'
  out[2 * i] = reserved[i] or '0'
end
return out
