// Open-loop load for `python -m bench` (bench/runner/k6.py): requests start at a fixed rate whatever
// the answers' latency (constant-arrival-rate), so a slow answer cannot hide the ones queued behind it.
// The request bodies are those of bench/wrk/common.lua. Environment:
//   BASE_URL, SCENARIO (uncached | cached | batch | mixed), RATE (requests/s), SECONDS, SIRA_TOKEN,
//   SIRA_RUN_SALT, SIRA_HOT_SET, SIRA_BATCH_SIZE, SUMMARY_PATH (where handleSummary writes its JSON),
//   SERVED_BY=1: count every answer by the model_id that made it (the swap scenario's timeline).
import http from 'k6/http';
import exec from 'k6/execution';
import { Counter } from 'k6/metrics';

const BASE = __ENV.BASE_URL;
const SCENARIO = __ENV.SCENARIO || 'uncached';
const RATE = parseInt(__ENV.RATE || '500', 10);
const SALT = parseInt(__ENV.SIRA_RUN_SALT || '0', 10) % 36500;
const HOT_SET = parseInt(__ENV.SIRA_HOT_SET || '64', 10);
const BATCH_SIZE = parseInt(__ENV.SIRA_BATCH_SIZE || '32', 10);
const SERVED_BY = __ENV.SERVED_BY === '1';
const HEADERS = { 'Content-Type': 'application/json' };
if (__ENV.SIRA_TOKEN) HEADERS.Authorization = `Bearer ${__ENV.SIRA_TOKEN}`;
const PLAIN = { headers: HEADERS };
const READ_BODY = { headers: HEADERS, responseType: 'text' };

const CURRENCIES = ['USD', 'EUR', 'GBP', 'XOF', 'NGN', 'KES'];
const COUNTRIES = ['US', 'FR', 'GB', 'SN', 'NG', 'KE', 'DE'];
const METHODS = ['card', 'wallet', 'bank_transfer', 'mobile_money', 'crypto'];

export const options = {
  discardResponseBodies: true,
  summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)'],
  scenarios: {
    load: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: `${__ENV.SECONDS || '10'}s`,
      preAllocatedVUs: Math.max(10, Math.ceil(RATE / 20)),
      maxVUs: Math.max(50, RATE),
    },
  },
};

const served = new Counter('sira_served');
const recentIds = [];

function pick(list) { return list[Math.floor(Math.random() * list.length)]; }
function randint(low, high) { return low + Math.floor(Math.random() * (high - low + 1)); }

// A feature row unique in the run (`unique` in amount_avg_30d, the salt in account_age_days), or
// one of the HOT_SET fixed rows: the same shapes as bench/wrk/common.lua.
function event(eventId, unique, hot) {
  let payload;
  if (unique !== null) {
    payload = {
      amount: randint(100, 500000) / 100, currency: pick(CURRENCIES), country: pick(COUNTRIES),
      payment_method: pick(METHODS),
      features: {
        hour_of_day: randint(0, 23), is_weekend: randint(0, 1), account_age_days: SALT,
        txn_count_24h: randint(0, 30), amount_avg_30d: unique % 10000000, distinct_cards_7d: randint(1, 4),
        ip_country_mismatch: randint(0, 1), failed_logins_24h: randint(0, 3), is_new_device: randint(0, 1),
      },
    };
  } else {
    payload = {
      amount: 100 + hot, currency: 'USD', country: 'US', payment_method: METHODS[hot % METHODS.length],
      features: {
        hour_of_day: hot % 24, is_weekend: 0, account_age_days: 700, txn_count_24h: 2, amount_avg_30d: 120,
        distinct_cards_7d: 1, ip_country_mismatch: 0, failed_logins_24h: 0, is_new_device: hot % 2,
      },
    };
  }
  return JSON.stringify({ event_id: eventId, product: 'fraud_score', payload });
}

function remember(response) {
  if (response.status !== 200) return;
  const id = response.json('prediction_id');
  if (SERVED_BY) served.add(1, { model_id: response.json('model_id') });
  if (SCENARIO === 'mixed') {
    if (recentIds.length < 1024) recentIds.push(id);
    else recentIds[randint(0, 1023)] = id;
  }
}

function score(body) {
  const keep = SERVED_BY || SCENARIO === 'mixed';
  const response = http.post(`${BASE}/v1/infer`, body, keep ? READ_BODY : PLAIN);
  if (keep) remember(response);
}

export default function () {
  const n = exec.scenario.iterationInTest + 1;
  const eventId = `k-${SCENARIO}-${SALT}-${n}`;
  if (SCENARIO === 'cached') {
    score(event(eventId, null, randint(0, HOT_SET - 1)));
  } else if (SCENARIO === 'batch') {
    const events = [];
    for (let i = 0; i < BATCH_SIZE; i += 1) {
      events.push(event(`${eventId}-${i}`, n * BATCH_SIZE + i, 0));
    }
    http.post(`${BASE}/v1/infer/batch`, `{"events":[${events.join(',')}]}`, PLAIN);
  } else if (SCENARIO === 'mixed') {
    const roll = randint(1, 100);
    if (roll <= 10 && recentIds.length > 0) {
      http.get(`${BASE}/v1/infer/${pick(recentIds)}`, PLAIN);
    } else if (roll <= 30) {
      score(event(eventId, null, randint(0, HOT_SET - 1)));
    } else {
      score(event(eventId, n, 0));
    }
  } else {
    score(event(eventId, n, 0));
  }
}

export function handleSummary(data) {
  const out = {};
  out[__ENV.SUMMARY_PATH || 'k6-summary.json'] = JSON.stringify(data);
  return out;
}
