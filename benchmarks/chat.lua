-- wrk script for the benchmark: POST chat.completions bodies, rotating over a file of bodies.
--   wrk -t1 -c32 -d10s -s benchmarks/chat.lua http://127.0.0.1:8101 -- /tmp/bodies.jsonl
-- Each body is one line of the file (written by bench_workload.write_bodies). `done` prints one
-- JSON line that bench_http.py reads: requests, duration, errors and latency percentiles.

local threads = {}
local counter = 0

function setup(thread)
  -- A distinct starting offset per thread, so threads do not send the same body in lockstep.
  thread:set("tid", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

local bodies = {}
local idx = 0
local headers = {
  ["Content-Type"] = "application/json",
  ["Authorization"] = "Bearer sk-bench-0123456789abcdef0123456789abcdef",
}

function init(args)
  for line in io.lines(args[1]) do
    bodies[#bodies + 1] = line
  end
  idx = ((tid or 0) * 997) % #bodies
end

function request()
  idx = idx % #bodies + 1
  return wrk.format("POST", "/v1/chat/completions", headers, bodies[idx])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nWRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "errors_connect": %d,'
      .. ' "errors_read": %d, "errors_write": %d, "errors_status": %d, "errors_timeout": %d,'
      .. ' "p50_us": %d, "p90_us": %d, "p99_us": %d, "mean_us": %.1f, "max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
