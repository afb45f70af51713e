-- ARGV: record ts, record row, call log cap.
log_call(ARGV[1], ARGV[2], tonumber(ARGV[3]))
return 1
