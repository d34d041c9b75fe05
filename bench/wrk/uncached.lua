-- Uncached: every POST /v1/infer has its own event id and a feature row never seen before (a cache miss).
local common = dofile((os.getenv("SIRA_WRK_DIR") or "bench/wrk") .. "/common.lua")
local count = 0

setup = common.setup
done = common.done

function init(args)
  common.headers()
  wrk.method = "POST"
  math.randomseed(thread_index * 7919 + common.salt)
end

function request()
  count = count + 1
  local unique = thread_index * 1000000 + count
  return wrk.format(nil, nil, nil, common.event("u-" .. common.salt .. "-" .. unique, unique))
end
