-- Cached: unique event ids over a small hot set of feature rows (SIRA_HOT_SET, default 64): cache hits.
local common = dofile((os.getenv("SIRA_WRK_DIR") or "bench/wrk") .. "/common.lua")
local hot_set = tonumber(os.getenv("SIRA_HOT_SET") or "64")
local count = 0

setup = common.setup
done = common.done

function init(args)
  common.headers()
  wrk.method = "POST"
  math.randomseed(thread_index * 104729 + common.salt)
end

function request()
  count = count + 1
  local event_id = "c-" .. common.salt .. "-" .. thread_index .. "-" .. count
  return wrk.format(nil, nil, nil, common.event(event_id, nil, math.random(0, hot_set - 1)))
end
