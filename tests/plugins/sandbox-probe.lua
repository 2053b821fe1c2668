-- Reports which dangerous globals a script can reach; the plugin-host tests expect all of them to be nil.
local reachable = {}
for _, name in ipairs({ "io", "os", "require", "loadstring", "load", "dofile", "loadfile", "debug", "getfenv", "setfenv", "collectgarbage", "package" }) do
  if _G[name] ~= nil then table.insert(reachable, name) end
end

function authorize_publish(client, request)
  if request.topic == "probe" then
    if #reachable > 0 then error("reachable: " .. table.concat(reachable, ",")) end
    -- Built-in libraries are read-only: changing one must fail.
    local ok = pcall(function() string.upper = nil end)
    if ok then error("string library is writable") end
    local ok2 = pcall(function() tollgate.now_ms = nil end)
    if ok2 then error("tollgate table is writable") end
    return "allow"
  end
  return nil
end
