-- What crosses the site's bridge to the cloud. The topic a route hook sees is the one the message will have on
-- arrival: the cloud's topic going out (egress), the site's topic coming in (ingress).
--
--   [plugins.config]
--   commands = ["lock", "unlock"]   # the commands the cloud may send to cars on this site
--
-- Out: every mapped message, except diagnostics (a `debug` topic level), which stay on site.
-- In: only cmd/<vin>/<command> with an allowed command; anything else is dropped and counted.

local allowed = {}

function init(config)
  if type(config.commands) ~= "table" then
    error("config.commands must be a list of command names")
  end
  for _, name in ipairs(config.commands) do
    if type(name) ~= "string" or string.find(name, "[/+#]") then
      error("config.commands: " .. tostring(name) .. " is not a single topic level")
    end
    allowed[name] = true
  end
end

local function has_level(topic, level)
  for part in string.gmatch(topic, "[^/]+") do
    if part == level then
      return true
    end
  end
  return false
end

function route(direction, bridge, msg)
  if direction == "egress" then
    if has_level(msg.topic, "debug") then
      tollgate.counter_add("kept_on_site")
      return "drop"
    end
    return nil
  end
  local command = string.match(msg.topic, "^cmd/[^/]+/([^/]+)$")
  if command and allowed[command] then
    return nil
  end
  tollgate.counter_add("commands_refused")
  tollgate.log("warn", "bridge " .. bridge .. ": command refused on " .. msg.topic)
  return "drop"
end
