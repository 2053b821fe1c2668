-- Tenant isolation: a client whose user name is U may publish and subscribe only under tenants/U/#.
--
-- * Clients without a user name, or with one that contains "/", "+" or "#", are refused at CONNECT and denied
--   every publish and subscribe (a user name "+" would otherwise turn the prefix into tenants/+/...).
-- * A publish (or a will) is allowed on tenants/U and on any topic below it.
-- * A subscription is allowed when its filter is tenants/U, tenants/U/# or anything below tenants/U/, wildcards
--   included (tenants/U/+/temp); filters such as #, tenants/# or tenants/+/x are denied.
--
-- * With `max_connections` in [plugins.config], a tenant may hold at most that many connections at once; one
--   more is refused at CONNECT with "quota exceeded". A client reconnecting under a client id that is still
--   connected is let in: its new connection takes the old one over, so the count does not grow.
--
-- The ACL decisions depend on nothing but the user name and the topic, so the broker may cache them
-- (cache_decisions = true in broker.toml). This plugin checks no password: pair it with a password_file or an
-- authentication plugin.

local PREFIX = "tenants/"
local max_connections = nil

function init(config)
  if config.max_connections ~= nil then
    max_connections = tonumber(config.max_connections)
    if max_connections == nil or max_connections < 1 or max_connections % 1 ~= 0 then
      error("max_connections must be a whole number of at least 1, not " .. tostring(config.max_connections))
    end
  end
end

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

-- Live connections are counted in the plugin's key-value table, which every instance of the plugin shares (the
-- broker runs one per worker thread): per tenant, and per client id so that a takeover can be recognised.
local function tenant_key(tenant) return "live/" .. tenant end
local function client_key(tenant, client_id) return "live/" .. tenant .. "/" .. client_id end

local function count(key)
  return tonumber(tollgate.kv_get(key) or "0")
end

-- Adds `delta` to the count under `key`. Another instance may be counting the same key at the same moment, so
-- the update is a compare-and-set, tried again when the value changed under it. A count that falls to 0 is
-- removed when `forget` is set (a client id's: there may be many over time, and the table holds 65,536 keys).
local function add(key, delta, forget)
  for _ = 1, 100 do
    local current = tollgate.kv_get(key)
    local next = math.max(0, tonumber(current or "0") + delta)
    if tollgate.kv_compare_and_set(key, current, tostring(next)) then
      if next == 0 and forget then
        -- Not atomic with the write above: a takeover counted in between is lost, which only means that this
        -- client id is not recognised as connected by the next on_connect.
        tollgate.kv_delete(key)
      end
      return
    end
  end
  tollgate.log("warn", "could not update " .. key .. " after 100 tries")
end

function on_connect(info)
  local tenant = tenant_of(info.username)
  if tenant == nil then
    tollgate.log("info", "refused " .. info.client_id .. ": no usable tenant user name")
    return { deny = "not_authorized" }
  end
  if max_connections ~= nil and count(tenant_key(tenant)) >= max_connections
      and count(client_key(tenant, info.client_id)) == 0 then
    tollgate.log("info", "refused " .. info.client_id .. ": tenant " .. tenant .. " has "
      .. max_connections .. " connections already")
    return { deny = "quota_exceeded" }
  end
  -- Not this plugin's decision: the rest of the chain (password file, anonymous access) authenticates.
  return nil
end

-- The session hook: told once a connection is accepted and again when it ends, whatever ended it. Counting here
-- rather than in on_connect means a connection that another hook refuses after this one is never counted.
-- Two clients connecting at the same moment may both pass on_connect before either is counted: the limit can be
-- exceeded by the number of simultaneous CONNECTs, never drift.
function on_connected(client)
  local tenant = tenant_of(client.username)
  if tenant == nil then return end
  add(tenant_key(tenant), 1, false)
  add(client_key(tenant, client.client_id), 1, false)
end

function on_disconnected(client, cause)
  local tenant = tenant_of(client.username)
  if tenant == nil then return end
  add(tenant_key(tenant), -1, false)
  add(client_key(tenant, client.client_id), -1, true)
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
