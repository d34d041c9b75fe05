-- Shared by the scenario scripts of `python -m bench` (bench/runner/): request bodies and the report.
-- Each wrk thread loads its script (and so this file) into its own Lua state.
local common = {}

local CURRENCIES = {"USD", "EUR", "GBP", "XOF", "NGN", "KES"}
local COUNTRIES = {"US", "FR", "GB", "SN", "NG", "KE", "DE"}
local METHODS = {"card", "wallet", "bank_transfer", "mobile_money", "crypto"}

-- SIRA_RUN_SALT differs between runs, so a server's cache never holds a row of an earlier run.
common.salt = tonumber(os.getenv("SIRA_RUN_SALT") or "0") % 36500

function common.headers()
  wrk.headers["Content-Type"] = "application/json"
  local token = os.getenv("SIRA_TOKEN")
  if token and token ~= "" then
    wrk.headers["Authorization"] = "Bearer " .. token
  end
end

-- One payment event. `unique` (an integer unique within the run) makes the feature row unique:
-- amount_avg_30d carries it and account_age_days the run's salt (exact in float32 below 2^24).
-- Without it, the row is one of `hot` fixed rows (the cached scenario's hot set).
function common.event(event_id, unique, hot)
  local amount, avg, age, hour, weekend, currency, country, method, txns, cards, mismatch, logins, device
  if unique then
    amount = math.random(100, 500000) / 100
    avg, age = unique % 10000000, common.salt
    hour, weekend, txns, cards = math.random(0, 23), math.random(0, 1), math.random(0, 30), math.random(1, 4)
    mismatch, logins, device = math.random(0, 1), math.random(0, 3), math.random(0, 1)
    currency, country, method = CURRENCIES[math.random(#CURRENCIES)], COUNTRIES[math.random(#COUNTRIES)], METHODS[math.random(#METHODS)]
  else
    amount, avg, age, hour, weekend, txns, cards = 100 + hot, 120, 700, hot % 24, 0, 2, 1
    mismatch, logins, device = 0, 0, hot % 2
    currency, country, method = "USD", "US", METHODS[hot % #METHODS + 1]
  end
  return string.format('{"event_id":"%s","product":"fraud_score","payload":{"amount":%.2f,"currency":"%s","country":"%s","payment_method":"%s","features":{"hour_of_day":%d,"is_weekend":%d,"account_age_days":%d,"txn_count_24h":%d,"amount_avg_30d":%d,"distinct_cards_7d":%d,"ip_country_mismatch":%d,"failed_logins_24h":%d,"is_new_device":%d}}}',
    event_id, amount, currency, country, method, hour, weekend, age, txns, avg, cards, mismatch, logins, device)
end

-- Thread numbering: setup() runs in the main state, once per thread, before init().
local threads = 0
function common.setup(thread)
  thread:set("thread_index", threads)
  threads = threads + 1
end

-- The figures python reads back (bench/runner/wrk.py parse_wrk): one line, prefixed "JSON ".
function common.done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('JSON {"requests": %d, "duration_us": %d, "socket_errors": %d, "timeouts": %d, "non2xx": %d, "bytes": %d, "p50_us": %d, "p90_us": %d, "p95_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write, e.timeout, e.status, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(95), latency:percentile(99),
    latency.max, latency.mean))
end

return common
