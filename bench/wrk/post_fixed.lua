-- One fixed infer request, POSTed over keep-alive connections (used by bench/worker_classes.py).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
if os.getenv("SIRA_TOKEN") then
  wrk.headers["Authorization"] = "Bearer " .. os.getenv("SIRA_TOKEN")
end
wrk.body = [[{"event_id": "bench-fixed-1", "product": "fraud_score", "payload": {"amount": 150.5, "currency": "USD", "country": "US", "payment_method": "card", "features": {"hour_of_day": 14, "is_weekend": 0, "account_age_days": 700, "txn_count_24h": 2, "amount_avg_30d": 120.0}}}]]

done = function(summary, latency, requests)
  io.write(string.format("JSON {\"requests\": %d, \"duration_us\": %d, \"errors\": %d, \"non2xx\": %d, \"p50_us\": %d, \"p99_us\": %d}\n",
    summary.requests, summary.duration, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(99)))
end
