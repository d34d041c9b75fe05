-- Mixed: 70% uncached scoring, 20% cached scoring, 10% GET /v1/infer/{id} of a prediction answered
-- earlier in the run (ids are read from this thread's responses; before the first, it scores).
local common = dofile((os.getenv("SIRA_WRK_DIR") or "bench/wrk") .. "/common.lua")
local hot_set = tonumber(os.getenv("SIRA_HOT_SET") or "64")
local count = 0
local ids, kept, next_slot = {}, 0, 1
local KEEP = 1024

setup = common.setup
done = common.done

function init(args)
  common.headers()
  math.randomseed(thread_index * 32452843 + common.salt)
end

function request()
  count = count + 1
  local roll = math.random(100)
  if roll <= 10 and kept > 0 then
    return wrk.format("GET", "/v1/infer/" .. ids[math.random(kept)], nil, nil)
  end
  local unique = thread_index * 1000000 + count
  local event_id = "m-" .. common.salt .. "-" .. unique
  if roll <= 30 then
    return wrk.format("POST", "/v1/infer", nil, common.event(event_id, nil, math.random(0, hot_set - 1)))
  end
  return wrk.format("POST", "/v1/infer", nil, common.event(event_id, unique))
end

function response(status, headers, body)
  local id = status == 200 and body:match('"prediction_id":"([0-9a-f%-]+)"')
  if id then
    ids[next_slot] = id
    next_slot = next_slot % KEEP + 1
    if kept < KEEP then kept = kept + 1 end
  end
end
