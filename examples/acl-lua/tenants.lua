-- Tenant isolation: a client whose user name is U may publish and subscribe only under tenants/U/#.
--
-- * Clients without a user name, or with one that contains "/", "+" or "#", are refused at CONNECT and denied
--   every publish and subscribe (a user name "+" would otherwise turn the prefix into tenants/+/...).
-- * A publish (or a will) is allowed on tenants/U and on any topic below it.
-- * A subscription is allowed when its filter is tenants/U, tenants/U/# or anything below tenants/U/, wildcards
--   included (tenants/U/+/temp); filters such as #, tenants/# or tenants/+/x are denied.
--
-- The decisions depend on nothing but the user name and the topic, so the broker may cache them
-- (cache_decisions = true in broker.toml). This plugin checks no password: pair it with a password_file or an
-- authentication plugin.

local PREFIX = "tenants/"

-- The tenant a client belongs to, or nil when it has no usable user name.
local function tenant_of(username)
  if username == nil or username == "" then
    return nil
  end
  -- Compared as plain text below, so only the MQTT separator and wildcards need refusing.
  if string.find(username, "[/+#]") then
    return nil
  end
  return username
end

local function starts_with(text, prefix)
  return string.sub(text, 1, #prefix) == prefix
end

-- True when `name` (a topic or a filter) is tenants/<tenant> or lies below it.
local function inside(name, tenant)
  local root = PREFIX .. tenant
  return name == root or starts_with(name, root .. "/")
end

function on_connect(info)
  if tenant_of(info.username) == nil then
    tollgate.log("info", "refused " .. info.client_id .. ": no usable tenant user name")
    return { deny = "not_authorized" }
  end
  -- Not this plugin's decision: the rest of the chain (password file, anonymous access) authenticates.
  return nil
end

-- A topic (publish) or filter (subscribe) must lie inside the client's tenant.
local function decide(client, topic)
  local tenant = tenant_of(client.username)
  if tenant ~= nil and inside(topic, tenant) then
    return "allow"
  end
  return "deny"
end

function authorize_publish(client, request)
  return decide(client, request.topic)
end

function authorize_subscribe(client, request)
  return decide(client, request.filter)
end
