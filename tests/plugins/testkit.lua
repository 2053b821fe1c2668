-- Tollgate's Lua test plugin: the same behaviour table as tests/plugins/testkit-wasm (see its lib.rs).
local strict = false

function init(config)
  if config.fail_init then
    error("asked to fail")
  end
  strict = config.mode == "strict"
end

local function starts(text, prefix)
  return string.sub(text, 1, #prefix) == prefix
end

local function misbehave(topic)
  if starts(topic, "loop/") then
    local n = 0
    while true do n = n + 1 end
  end
  if starts(topic, "oom/") then
    local hoard = {}
    while true do table.insert(hoard, string.rep("x", 1024 * 1024)) end
  end
  if starts(topic, "trap/") then
    error("testkit asked to fail on " .. topic)
  end
  local millis = string.match(topic, "^slow/(%d+)")
  if millis then
    local until_ms = tollgate.now_ms() + tonumber(millis)
    while tollgate.now_ms() < until_ms do end
  end
end

function on_connect(info)
  if info.username == "blocked" then return "deny" end
  if info.username == "loop" then misbehave("loop/") end
  return nil
end

function authorize_publish(client, request)
  misbehave(request.topic)
  if starts(request.topic, "deny/") then return "deny" end
  if starts(request.topic, "quota/") then return { deny = "quota_exceeded" } end
  if strict and not starts(request.topic, "allowed/") then return "deny" end
  return nil
end

-- In strict mode, a recheck ends the sessions of clients whose id starts with `seen-revoked`.
function authorize_session(client)
  if strict and starts(client.client_id, "seen-revoked") then return "deny" end
  return nil
end

function authorize_subscribe(client, request)
  if starts(request.filter, "capped/") then return { max_qos = 0 } end
  if starts(request.filter, "deny/") then return "deny" end
  return nil
end

function on_publish(client, msg)
  misbehave(msg.topic)
  -- gauge/<name>/<value> sets that gauge.
  local gauge, value = string.match(msg.topic, "^gauge/([^/]+)/(-?%d+)$")
  if gauge then
    tollgate.gauge_set(gauge, tonumber(value))
    return nil
  end
  -- once/<rest> passes the first time in a minute and is dropped after (a de-duplicating claim).
  if starts(msg.topic, "once/") then
    if tollgate.kv_claim(msg.topic, 60000) then return nil end
    return { drop = "seen already" }
  end
  if starts(msg.topic, "upper/") then
    msg.payload = string.upper(msg.payload)
    return msg
  end
  if starts(msg.topic, "drop/") then return { drop = "testkit drops drop/ topics" } end
  if starts(msg.topic, "sign/") then
    table.insert(msg.user_properties, { "sig", tollgate.hex(tollgate.hmac_sha256("k1", msg.payload)) })
    return msg
  end
  local rest = string.match(msg.topic, "^rewrite/(.*)$")
  if rest then
    msg.topic = "rewritten/" .. rest
    return msg
  end
  if starts(msg.topic, "refuse/") or starts(msg.topic, "cut/") then
    return { reject = "not_authorized", reason = "testkit refuses", disconnect = starts(msg.topic, "cut/") }
  end
  if starts(msg.topic, "batch/") then
    table.insert(msg.user_properties, { "batch", "1" })
    return msg
  end
  return nil
end

-- Each subscriber's copy: on per/ topics a subscriber whose id starts with "blind" gets nothing, the others a
-- copy addressed to them; per/trap/..., per/loop/... misbehave like the other hooks.
function on_deliver(subscriber, msg)
  if not starts(msg.topic, "per/") then return nil end
  misbehave(string.sub(msg.topic, 5))
  if starts(subscriber.client_id, "blind") then return { drop = "not for this subscriber" } end
  table.insert(msg.user_properties, { "to", subscriber.client_id })
  return msg
end

-- Clients whose id starts with `seen-` are counted: `connected`, `disconnected/<cause>`, and the gauge `online`.
-- `seen-trap` makes both session calls fail after counting.
function on_connected(client)
  if not starts(client.client_id, "seen-") then return end
  tollgate.counter_add("connected", 1)
  tollgate.gauge_add("online", 1)
  if client.client_id == "seen-trap" then error("testkit asked to fail on connect") end
end

function on_disconnected(client, cause)
  if not starts(client.client_id, "seen-") then return end
  tollgate.counter_add("disconnected/" .. cause, 1)
  tollgate.gauge_add("online", -1)
  if client.client_id == "seen-trap" then error("testkit asked to fail on disconnect") end
end

function route(direction, bridge, msg)
  if starts(msg.topic, "local/") then return "drop" end
  if direction == "ingress" and starts(msg.topic, "outbound-only/") then return "drop" end
  local rest = string.match(msg.topic, "^bridge/(.*)$")
  if rest then return { rewrite = "remote/" .. rest } end
  return nil
end
