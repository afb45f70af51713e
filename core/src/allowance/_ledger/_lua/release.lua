-- ARGV: now ('' = server time), reservation id, record ts, record row ('' =
--   none), call log cap. Returns 1 when it released, 0 otherwise.
local id = ARGV[2]
local value = redis.call('HGET', RES, id)
if not value then
  return 0 -- unknown: nothing to release, nothing logged
end
local status = string.sub(value, 1, 1)
if status == 'H' then
  local items = items_of(value)
  for i = 3, #items, 2 do
    unhold(items[i], items[i + 1])
  end
  redis.call('ZREM', LEASES, id)
elseif status ~= 'E' then
  return 0
end
settle(id, 'R', clock(ARGV[1]))
log_call(ARGV[3], ARGV[4], tonumber(ARGV[5]))
return 1
