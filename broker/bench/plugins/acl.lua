-- The benchmark's Lua ACL, called on every publish (decisions are not cached): a client may publish only under
-- the first-level prefixes in `allowed`.
local allowed = {
  bench = true,
  fanin = true,
  fanout = true,
}

function authorize_publish(client, request)
  local topic = request.topic
  local slash = string.find(topic, "/", 1, true)
  if slash and allowed[string.sub(topic, 1, slash - 1)] then
    return "allow"
  end
  return "deny"
end
