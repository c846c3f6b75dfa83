-- wrk script for bench.py. Every request gets a unique tag <prefix><thread>-<n>, used as its
-- email (u<tag>@example.com), its q and its X-Request-ID, so bench.py can match each line in
-- log.txt to a request. Ids echoed in 200 responses go to <acks><thread>.txt; a thread stops
-- after <limit> responses, so the run is bounded in requests as well as by -d.
-- Arguments after "--": route prefix, tag prefix, acks path prefix, limit per thread.

local next_thread = 0

function setup(thread)
  thread:set("thread_id", next_thread)
  next_thread = next_thread + 1
end

function init(args)
  route, prefix, limit = args[1], args[2] .. thread_id .. "-", tonumber(args[4])
  acks = io.open(args[3] .. thread_id .. ".txt", "w")
  sent, answered = 0, 0
end

function request()
  sent = sent + 1
  local tag = prefix .. sent
  return wrk.format("POST", route .. "u" .. tag .. "@example.com?q=" .. tag,
                    { ["X-Request-ID"] = tag, ["Content-Length"] = "0" })
end

function response(status, headers, body)
  answered = answered + 1
  if status == 200 and headers["x-request-id"] then
    acks:write(headers["x-request-id"], "\n")
  end
  if answered >= limit then
    acks:flush()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "errors": %d, "non_2xx": %d, ' ..
    '"p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
