-- Message transform: stamps every inbound message with a `received-at` user property (milliseconds since the Unix
-- epoch, as decimal text) and moves topics from an old prefix to a new one: legacy/... becomes site/... by default.
--
--   [plugins.config]
--   from = "legacy/"   # the prefix to replace
--   to = "site/"       # what replaces it (may be empty)
--
-- Authorization runs before transforms: a client needs the right to publish on the topic it sends (legacy/...),
-- not on the rewritten one.

local from = "legacy/"
local to = "site/"

function init(config)
  if config.from ~= nil then
    from = config.from
  end
  if config.to ~= nil then
    to = config.to
  end
  if type(from) ~= "string" or from == "" then
    error("config.from must be a non-empty string")
  end
  if type(to) ~= "string" then
    error("config.to must be a string")
  end
  if string.find(to, "[+#]") then
    error("config.to must not contain the wildcards + or #")
  end
end

function on_publish(client, msg)
  -- tollgate.now_ms() is a Luau number (a double); %.0f prints it without a fraction or exponent.
  table.insert(msg.user_properties, { "received-at", string.format("%.0f", tollgate.now_ms()) })
  if string.sub(msg.topic, 1, #from) == from then
    local topic = to .. string.sub(msg.topic, #from + 1)
    -- legacy/ alone with an empty `to` would leave no topic at all: keep the original then.
    if topic ~= "" then
      msg.topic = topic
    end
  end
  return msg
end
