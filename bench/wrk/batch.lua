-- Batch: POST /v1/infer/batch with SIRA_BATCH_SIZE (default 32) unique events in each request.
local common = dofile((os.getenv("SIRA_WRK_DIR") or "bench/wrk") .. "/common.lua")
local batch_size = tonumber(os.getenv("SIRA_BATCH_SIZE") or "32")
local count = 0

setup = common.setup
done = common.done

function init(args)
  common.headers()
  wrk.method = "POST"
  wrk.path = "/v1/infer/batch"
  math.randomseed(thread_index * 15485863 + common.salt)
end

function request()
  local events = {}
  for i = 1, batch_size do
    count = count + 1
    local unique = thread_index * 1000000 + count
    events[i] = common.event("b-" .. common.salt .. "-" .. unique, unique)
  end
  return wrk.format(nil, nil, nil, '{"events":[' .. table.concat(events, ",") .. ']}')
end
