-- wrk script for POST /v1/allocate: a fresh caller per request (as a class of students starting a
-- lab would), the statuses counted per thread and summed at the end.
local counter = 0
local threads = {}
local run = os.getenv("WRK_RUN") or tostring(os.time())
local token = os.getenv("WRK_TOKEN") or "dev-track-token-NOT-FOR-PRODUCTION"
local prefix = os.getenv("WRK_PREFIX") or "lab"

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
end

function request()
  counter = counter + 1
  local headers = {
    ["Authorization"] = "Bearer " .. token,
    ["X-Instruqt-Sandbox-ID"] = "wrk-" .. run .. "-" .. id .. "-" .. counter,
    ["X-Sandbox-Name-Prefix"] = prefix,
  }
  return wrk.format("POST", "/v1/allocate", headers, "")
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      total[status] = (total[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(total) do
    table.insert(parts, status .. "=" .. n)
  end
  table.sort(parts)
  io.write(string.format("statuses %s\n", table.concat(parts, " ")))
  io.write(string.format("p50_ms %.1f p99_ms %.1f\n", latency:percentile(50) / 1000, latency:percentile(99) / 1000))
  io.write(string.format("created %d\n", total[201] or 0))
end
