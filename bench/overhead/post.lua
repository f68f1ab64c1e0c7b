-- wrk script for the overhead bench: POST a small non-streaming chat completion and print
-- the latency distribution (microseconds) and error counts as one JSON line prefixed WRKJSON.
-- WRK_BODY replaces the body; WRK_AUTH, if set, is sent as the Authorization header.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
if os.getenv("WRK_AUTH") then
  wrk.headers["Authorization"] = os.getenv("WRK_AUTH")
end
wrk.body = os.getenv("WRK_BODY")
  or '{"model":"bench","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p999":%d,"min":%d,"max":%d,' ..
    '"mean":%.2f,"stdev":%.2f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.min, latency.max,
    latency.mean, latency.stdev))
end
