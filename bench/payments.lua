-- wrk script of `make bench`: every request a payment with its own Idempotency-Key.
--
-- The request comes from the environment the bench sets, so one script serves every target:
--   BENCH_PATH     the path (/v1/payments, or the emulator's /v1/payment_intents)
--   BENCH_BODY     the body, sent as is
--   BENCH_HEADERS  "Name: value" lines (auth, content type)
--   BENCH_KEY      the key prefix, unique per run, so no key is ever replayed
-- Keys are <prefix>-<thread>-<n>. `done` prints one machine-readable line (BENCH_RESULT {...})
-- with the counts and latency percentiles in microseconds.

local path = os.getenv("BENCH_PATH") or "/"
local body = os.getenv("BENCH_BODY") or ""
local prefix = os.getenv("BENCH_KEY") or "bench"
local headers = {}
for line in (os.getenv("BENCH_HEADERS") or ""):gmatch("[^\n]+") do
  local name, value = line:match("^([^:]+):%s*(.*)$")
  if name then headers[name] = value end
end

local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("bench_thread", threads)
end

local n = 0
function request()
  n = n + 1
  headers["Idempotency-Key"] = prefix .. "-" .. tostring(bench_thread) .. "-" .. n
  return wrk.format("POST", path, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
