//! Luau script plugins on mlua: a sandboxed state per instance (Luau's read-only globals, no io/os/require/
//! loadstring/debug), a heap cap, and a CPU budget enforced by the interrupt callback, which also yields to the
//! worker's other tasks every millisecond.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mlua::{Function, Lua, LuaOptions, LuaSerdeExt, LuaString, StdLib, Table, Value, VmState};
use tollgate_hooks::{
    AclDecision, AuthDecision, ClientInfo, ConnectRequest, DisconnectCause, Message, RouteDecision, RouteDirection,
    TransformDecision,
};
use tollgate_protocol::{ProtocolVersion, QoS, ReasonCode, UserProperty};

use crate::shared::{CallClient, Failure, MacAlgorithm, PluginShared, Pool};
use crate::spec::{HookKind, Limits, PluginSpec};
use crate::{AclRequest, LoadError, PublishRequest, Runtime};

const CPU_LIMIT_MESSAGE: &str = "tollgate: CPU time budget exhausted";

/// Globals a policy script must not reach. Luau has no io or bytecode loading to begin with.
const REMOVED_GLOBALS: [&str; 8] =
    ["require", "loadstring", "getfenv", "setfenv", "collectgarbage", "gcinfo", "debug", "os"];

/// A call's CPU budget in ticks of [`crate::ticker`]. Atomics rather than a lock: the interrupt reads it at every
/// function call and loop edge of the script. Only the thread running the instance touches it.
struct Budget {
    /// One call's budget; a batch gets it once for each of its messages.
    per_call: u64,
    limit: AtomicU64,
    used: AtomicU64,
    /// The tick the running slice began at, or [`NO_SLICE`].
    slice_start: AtomicU64,
    exhausted: AtomicBool,
}

const NO_SLICE: u64 = u64::MAX;

impl Budget {
    fn new(cpu_time: Duration) -> Self {
        Self {
            per_call: crate::ticker::budget_ticks(cpu_time),
            limit: AtomicU64::new(crate::ticker::budget_ticks(cpu_time)),
            used: AtomicU64::new(0),
            slice_start: AtomicU64::new(NO_SLICE),
            exhausted: AtomicBool::new(false),
        }
    }

    fn reset(&self) {
        self.reset_for(1);
    }

    /// A fresh budget for a call carrying `messages` messages.
    fn reset_for(&self, messages: usize) {
        let messages = u64::try_from(messages.max(1)).unwrap_or(u64::MAX);
        self.limit.store(self.per_call.saturating_mul(messages), Ordering::Relaxed);
        self.used.store(0, Ordering::Relaxed);
        self.slice_start.store(NO_SLICE, Ordering::Relaxed);
        self.exhausted.store(false, Ordering::Relaxed);
    }

    /// What the interrupt tells the VM: run on, yield (a tick has passed since the slice began: the caller lets
    /// the worker's other tasks run, and time suspended is not counted) or stop (the budget is spent).
    fn check(&self) -> Result<VmState, ()> {
        let now = crate::ticker::now();
        let mut start = self.slice_start.load(Ordering::Relaxed);
        if start == NO_SLICE {
            self.slice_start.store(now, Ordering::Relaxed);
            start = now;
        }
        let slice = now.saturating_sub(start);
        let used = self.used.load(Ordering::Relaxed);
        if used.saturating_add(slice) > self.limit.load(Ordering::Relaxed) {
            self.exhausted.store(true, Ordering::Relaxed);
            return Err(());
        }
        if slice >= 1 {
            self.used.store(used + slice, Ordering::Relaxed);
            self.slice_start.store(NO_SLICE, Ordering::Relaxed);
            return Ok(VmState::Yield);
        }
        Ok(VmState::Continue)
    }
}

struct Hooks {
    on_connect: Option<Function>,
    /// The script's `authorize_publish` (and `authorize_subscribe`) behind a Lua-side wrapper that builds the
    /// request table from plain arguments: a table built in the VM costs a fraction of one built field by field
    /// through the API, where every step is a protected call once a memory limit is set.
    authorize_publish: Option<Function>,
    /// The script's `authorize_publish` behind a Lua-side loop over a burst of PUBLISHes: one call into the VM
    /// decides them all. Their topics come as one string, with a string of 4-byte headers (QoS and retain, then
    /// the topic's length, big-endian), so that entering the call costs the same few API steps whatever the burst.
    authorize_publish_batch: Option<Function>,
    authorize_subscribe: Option<Function>,
    authorize_session: Option<Function>,
    /// The script's `on_publish` and `on_deliver` behind a Lua-side loop over a burst of messages (see
    /// [`TRANSFORM_BATCH_ENTRY`]); a single message is a burst of one.
    on_publish: Option<Function>,
    on_deliver: Option<Function>,
    route: Option<Function>,
    on_connected: Option<Function>,
    on_disconnected: Option<Function>,
}

const PUBLISH_ENTRY: &str = "local hook = ...\nreturn function(client, topic, qos, retain, kind)\n  return hook(client, { topic = topic, qos = qos, retain = retain, kind = kind })\nend";
/// Loaded before the script runs: Luau resolves a chunk's references to its library (`string.byte`, …) when the chunk
/// is loaded, so these are Luau's own whatever globals the script then defines. Called with the script's
/// `authorize_publish`. Common answers come back as one string of codes
/// (`n` abstain, `a` allow, `d` deny) and any other answer in a table beside it, so the host reads a burst's
/// decisions with one string rather than a table lookup and a string copy per message.
const PUBLISH_BATCH_ENTRY: &str = "return function(hook)
  return function(client, topics, headers, kind)
    local count = #headers // 4
    local codes = table.create(count)
    local others = nil
    local start = 1
    for i = 1, count do
      local flags, high, middle, low = string.byte(headers, 4 * i - 3, 4 * i)
      local stop = start + high * 65536 + middle * 256 + low
      local decision = hook(client, { topic = string.sub(topics, start, stop - 1), qos = flags % 4, retain = flags >= 4, kind = kind })
      start = stop
      if decision == nil or decision == 'ignore' then
        codes[i] = 'n'
      elseif decision == 'allow' or decision == true then
        codes[i] = 'a'
      elseif decision == 'deny' or decision == false then
        codes[i] = 'd'
      else
        codes[i] = '?'
        others = others or {}
        others[i] = decision
      end
    end
    return table.concat(codes), others
  end
end";
/// Loaded before the script, like [`PUBLISH_BATCH_ENTRY`], and called with the script's `on_publish` (or
/// `on_deliver`): one call into the VM transforms a burst. Every value that crosses mlua's API costs a protected
/// call once a memory limit is set (a message table read back field by field cost more than the script itself), so
/// both ways go as strings. In: the topics, the payloads, and 8-byte headers (flags: QoS, retain 4, UTF-8 payload
/// 8; the topic's length in 3 bytes and the payload's in 4, big-endian); a message with other properties comes
/// ready-built in `prebuilt`. Out: a code per message (`k` unchanged, `d` dropped, `m` modified, `?` anything
/// else, which comes back in the table beside, for the host to read as the single call would), and the modified
/// messages packed one after the other (see `read_packed_message`). A table that does not pack (a field of the
/// wrong type) goes back in the table too, so its error is the single call's. The loop stops after a reject that
/// disconnects, as the WASM default does.
const TRANSFORM_BATCH_ENTRY: &str = "return function(hook)
  local function pack(m)
    if m.drop ~= nil or m.reject ~= nil then
      return nil
    end
    local qos, expiry = m.qos, m.message_expiry
    if type(m.topic) ~= 'string' or type(m.payload) ~= 'string' or type(qos) ~= 'number' or qos % 1 ~= 0 then
      return nil
    end
    if expiry ~= nil and (type(expiry) ~= 'number' or expiry % 1 ~= 0) then
      return nil
    end
    local content_type, response_topic, correlation = m.content_type, m.response_topic, m.correlation_data
    local present = (content_type ~= nil and 1 or 0) + (response_topic ~= nil and 2 or 0)
      + (correlation ~= nil and 4 or 0) + (expiry ~= nil and 8 or 0)
    local parts = { string.pack('>s2s4BBBB', m.topic, m.payload, qos, m.retain and 1 or 0, m.payload_is_utf8 and 1 or 0, present) }
    if content_type ~= nil then parts[#parts + 1] = string.pack('>s2', content_type) end
    if response_topic ~= nil then parts[#parts + 1] = string.pack('>s2', response_topic) end
    if correlation ~= nil then parts[#parts + 1] = string.pack('>s4', correlation) end
    if expiry ~= nil then parts[#parts + 1] = string.pack('>I4', expiry) end
    local properties = m.user_properties
    local count = properties == nil and 0 or #properties
    parts[#parts + 1] = string.pack('>I2', count)
    for j = 1, count do
      local property = properties[j]
      parts[#parts + 1] = string.pack('>s2s2', property[1], property[2])
    end
    return table.concat(parts)
  end
  return function(client, topics, payloads, headers, prebuilt)
    local count = #headers // 8
    local codes = table.create(count)
    local packed = {}
    local others = nil
    local topic_at, payload_at = 1, 1
    for i = 1, count do
      local flags, t1, t2, t3, p1, p2, p3, p4 = string.byte(headers, 8 * i - 7, 8 * i)
      local topic_end = topic_at + t1 * 65536 + t2 * 256 + t3
      local payload_end = payload_at + ((p1 * 256 + p2) * 256 + p3) * 256 + p4
      local message = prebuilt and prebuilt[i]
      if message == nil then
        message = {
          topic = string.sub(topics, topic_at, topic_end - 1),
          payload = string.sub(payloads, payload_at, payload_end - 1),
          qos = flags % 4,
          retain = flags % 8 >= 4,
          payload_is_utf8 = flags >= 8,
          user_properties = {},
        }
      end
      topic_at, payload_at = topic_end, payload_end
      local result = hook(client, message)
      local code = '?'
      if result == nil or result == 'unchanged' then
        code = 'k'
      elseif result == 'drop' then
        code = 'd'
      elseif type(result) == 'table' then
        local ok, bytes = pcall(pack, result)
        if ok and bytes ~= nil then
          code = 'm'
          packed[#packed + 1] = bytes
        end
      end
      codes[i] = code
      if code == '?' then
        others = others or {}
        others[i] = result
      end
      if type(result) == 'table' and result.reject ~= nil and result.disconnect then
        break
      end
    end
    return table.concat(codes), table.concat(packed), others
  end
end";
const SUBSCRIBE_ENTRY: &str = "local hook = ...\nreturn function(client, filter, qos, share_group)\n  return hook(client, { filter = filter, qos = qos, share_group = share_group })\nend";

/// Client tables kept per instance, so a connection's every publish does not rebuild its table. They are
/// read-only, so a script cannot change what the next call sees.
const CLIENT_CACHE_ENTRIES: usize = 256;

struct CachedClient {
    // Held so the pointers in the key stay unique while the entry lives.
    _client_id: Arc<str>,
    _username: Option<Arc<str>>,
    table: Table,
}

/// Boxed: it is moved into and out of every call.
type Instance = Box<InstanceState>;

struct InstanceState {
    lua: Lua,
    /// The coroutine every hook call runs in, reset before each call. Driving it by hand costs a fraction of
    /// mlua's `call_async` (which builds a new thread and closures per call) and still lets the interrupt yield.
    thread: mlua::Thread,
    hooks: Hooks,
    budget: Arc<Budget>,
    client: Arc<Mutex<CallClient>>,
    clients: std::collections::HashMap<(usize, usize), CachedClient, foldhash::fast::FixedState>,
    kind_publish: LuaString,
    kind_will: LuaString,
}

/// The algorithm a script names in `tollgate.mac` and `tollgate.verify_mac`.
fn mac_algorithm(name: &str) -> mlua::Result<MacAlgorithm> {
    MacAlgorithm::from_name(name).ok_or_else(|| mlua::Error::runtime(format!("unknown MAC algorithm {name:?}")))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One loaded Lua plugin.
pub struct LuaPlugin {
    shared: Arc<PluginShared>,
    source: Arc<str>,
    chunk_name: String,
    config: serde_json::Value,
    limits: Limits,
    pool: Pool<Instance>,
    hooks: Vec<HookKind>,
    authorizes_publishes: bool,
}

impl LuaPlugin {
    pub(crate) async fn load(spec: &PluginSpec, previous: Option<&PluginShared>) -> Result<Self, LoadError> {
        let fail = |reason: String| LoadError { plugin: spec.name.clone(), reason };
        crate::ticker::start().map_err(fail)?;
        let source = std::fs::read_to_string(&spec.path)
            .map_err(|error| fail(format!("cannot read {}: {error}", spec.path.display())))?;
        let shared = PluginShared::for_spec(spec, previous).map_err(fail)?;
        let mut plugin = LuaPlugin {
            shared,
            source: source.into(),
            chunk_name: format!("@{}", spec.path.display()),
            config: serde_json::Value::Object(spec.config_with_files().map_err(fail)?),
            limits: spec.limits,
            pool: Pool::new(spec.limits.max_instances),
            hooks: Vec::new(),
            authorizes_publishes: false,
        };
        let instance = plugin.instantiate().await.map_err(|failure| fail(failure.to_string()))?;
        let hooks = &instance.hooks;
        plugin.authorizes_publishes = hooks.authorize_publish.is_some();
        plugin.hooks = [
            (HookKind::Authenticate, hooks.on_connect.is_some()),
            (
                HookKind::Authorize,
                hooks.authorize_publish.is_some()
                    || hooks.authorize_subscribe.is_some()
                    || hooks.authorize_session.is_some(),
            ),
            (HookKind::Transform, hooks.on_publish.is_some()),
            (HookKind::Deliver, hooks.on_deliver.is_some()),
            (HookKind::Route, hooks.route.is_some()),
            (HookKind::Session, hooks.on_connected.is_some() || hooks.on_disconnected.is_some()),
        ]
        .into_iter()
        .filter_map(|(hook, present)| present.then_some(hook))
        .collect();
        if plugin.hooks.is_empty() {
            return Err(fail(
                "defines none of on_connect, authorize_publish, authorize_subscribe, authorize_session, on_publish, \
                 on_deliver, route, on_connected, on_disconnected"
                    .to_owned(),
            ));
        }
        tracing::info!(plugin = %spec.name, hooks = ?plugin.hooks, "Lua plugin loaded");
        plugin.pool.put(instance);
        Ok(plugin)
    }

    /// Whether bursts of PUBLISHes can be authorized in one call: the script has `authorize_publish`.
    pub(crate) fn batches_authorization(&self) -> bool {
        self.authorizes_publishes
    }

    fn classify(&self, budget: &Budget, error: mlua::Error) -> Failure {
        if budget.exhausted.load(Ordering::Relaxed) || error.to_string().contains(CPU_LIMIT_MESSAGE) {
            return Failure::CpuLimit(u64::try_from(self.limits.cpu_time.as_millis()).unwrap_or(u64::MAX));
        }
        if is_memory_error(&error) {
            return Failure::OutOfMemory(self.limits.memory_bytes);
        }
        Failure::Script(error.to_string())
    }

    async fn instantiate(&self) -> Result<Instance, Failure> {
        self.shared.metrics.instances_created.fetch_add(1, Ordering::Relaxed);
        let budget = Arc::new(Budget::new(self.limits.cpu_time));
        let client = Arc::new(Mutex::new(CallClient::default()));
        let lua = self.new_state(budget.clone(), client.clone()).map_err(|error| self.classify(&budget, error))?;
        let run = async {
            let batch_entry: Function = lua.load(PUBLISH_BATCH_ENTRY).set_name("=tollgate").call(())?;
            let transform_batch_entry: Function = lua.load(TRANSFORM_BATCH_ENTRY).set_name("=tollgate").call(())?;
            lua.load(&*self.source).set_name(self.chunk_name.clone()).exec_async().await?;
            let globals = lua.globals();
            let wrap = |source: &str, hook: Option<Function>| -> mlua::Result<Option<Function>> {
                hook.map(|hook| lua.load(source).set_name("=tollgate").call::<Function>(hook)).transpose()
            };
            let hooks = Hooks {
                on_connect: globals.get("on_connect")?,
                authorize_publish: wrap(PUBLISH_ENTRY, globals.get("authorize_publish")?)?,
                authorize_publish_batch: globals
                    .get::<Option<Function>>("authorize_publish")?
                    .map(|hook| batch_entry.call::<Function>(hook))
                    .transpose()?,
                authorize_subscribe: wrap(SUBSCRIBE_ENTRY, globals.get("authorize_subscribe")?)?,
                authorize_session: globals.get("authorize_session")?,
                on_publish: globals
                    .get::<Option<Function>>("on_publish")?
                    .map(|hook| transform_batch_entry.call::<Function>(hook))
                    .transpose()?,
                on_deliver: globals
                    .get::<Option<Function>>("on_deliver")?
                    .map(|hook| transform_batch_entry.call::<Function>(hook))
                    .transpose()?,
                route: globals.get("route")?,
                on_connected: globals.get("on_connected")?,
                on_disconnected: globals.get("on_disconnected")?,
            };
            if let Some(init) = globals.get::<Option<Function>>("init")? {
                let config = lua.to_value(&self.config)?;
                init.call_async::<()>(config).await?;
            }
            let thread = lua.create_thread(lua.create_function(|_, ()| Ok(()))?)?;
            Ok::<_, mlua::Error>((hooks, thread, lua.create_string("publish")?, lua.create_string("will")?))
        };
        budget.reset();
        let (hooks, thread, kind_publish, kind_will) = run.await.map_err(|error| self.classify(&budget, error))?;
        Ok(Box::new(InstanceState {
            lua,
            thread,
            hooks,
            budget,
            client,
            clients: std::collections::HashMap::default(),
            kind_publish,
            kind_will,
        }))
    }

    fn new_state(&self, budget: Arc<Budget>, client: Arc<Mutex<CallClient>>) -> mlua::Result<Lua> {
        let libraries = StdLib::COROUTINE
            | StdLib::TABLE
            | StdLib::STRING
            | StdLib::UTF8
            | StdLib::BIT
            | StdLib::MATH
            | StdLib::BUFFER;
        let lua = Lua::new_with(libraries, LuaOptions::default())?;
        let globals = lua.globals();
        for name in REMOVED_GLOBALS {
            globals.raw_set(name, Value::Nil)?;
        }
        let host = lua.create_table()?;
        let plugin: Arc<str> = self.shared.name.clone();
        host.raw_set(
            "log",
            lua.create_function(move |_, (level, message): (String, String)| {
                let plugin = &*plugin;
                match level.as_str() {
                    "trace" => tracing::trace!(plugin, "{message}"),
                    "debug" => tracing::debug!(plugin, "{message}"),
                    "warn" => tracing::warn!(plugin, "{message}"),
                    "error" => tracing::error!(plugin, "{message}"),
                    _ => tracing::info!(plugin, "{message}"),
                }
                Ok(())
            })?,
        )?;
        let plugin: Arc<str> = self.shared.name.clone();
        globals.raw_set(
            "print",
            lua.create_function(move |_, values: mlua::Variadic<Value>| {
                let text: Vec<String> = values.iter().map(|value| value.to_string().unwrap_or_default()).collect();
                tracing::info!(plugin = &*plugin, "{}", text.join("\t"));
                Ok(())
            })?,
        )?;
        host.raw_set("now_ms", lua.create_function(|_, ()| Ok(crate::now_ms()))?)?;
        host.raw_set(
            "client_attribute",
            lua.create_function(move |_, key: String| Ok(lock(&client).attribute(&key)))?,
        )?;
        let shared = self.shared.clone();
        host.raw_set(
            "kv_get",
            lua.create_function(move |lua, key: String| match shared.kv_get(&key) {
                Some(value) => Ok(Value::String(lua.create_string(value)?)),
                None => Ok(Value::Nil),
            })?,
        )?;
        let shared = self.shared.clone();
        host.raw_set(
            "kv_set",
            lua.create_function(move |_, (key, value): (String, LuaString)| {
                shared.kv_set(key, value.as_bytes().to_vec()).map_err(mlua::Error::runtime)
            })?,
        )?;
        let shared = self.shared.clone();
        host.raw_set(
            "kv_delete",
            lua.create_function(move |_, key: String| {
                shared.kv_delete(&key);
                Ok(())
            })?,
        )?;
        let shared = self.shared.clone();
        host.raw_set(
            "kv_set_durable",
            lua.create_function(move |_, (key, value): (String, LuaString)| {
                shared.kv_set_durable(key, value.as_bytes().to_vec()).map_err(mlua::Error::runtime)
            })?,
        )?;
        let shared = self.shared.clone();
        host.raw_set(
            "kv_add",
            lua.create_function(move |_, (key, delta, durable): (String, Option<u64>, Option<bool>)| {
                shared.kv_add(&key, delta.unwrap_or(1), durable.unwrap_or(false)).map_err(mlua::Error::runtime)
            })?,
        )?;
        let shared = self.shared.clone();
        host.raw_set(
            "kv_compare_and_set",
            lua.create_function(
                move |_, (key, expected, value, durable): (String, Option<LuaString>, LuaString, Option<bool>)| {
                    let expected = expected.as_ref().map(LuaString::as_bytes);
                    shared
                        .kv_compare_and_set(
                            &key,
                            expected.as_deref(),
                            value.as_bytes().to_vec(),
                            durable.unwrap_or(false),
                        )
                        .map_err(mlua::Error::runtime)
                },
            )?,
        )?;
        let shared = self.shared.clone();
        host.raw_set(
            "gauge_add",
            lua.create_function(move |_, (name, delta): (String, i64)| {
                shared.gauge_add(&name, delta);
                Ok(())
            })?,
        )?;
        let shared = self.shared.clone();
        host.raw_set(
            "gauge_set",
            lua.create_function(move |_, (name, value): (String, i64)| {
                shared.gauge_set(&name, value);
                Ok(())
            })?,
        )?;
        let shared = self.shared.clone();
        host.raw_set(
            "counter_add",
            lua.create_function(move |_, (name, delta): (String, Option<u64>)| {
                shared.counter_add(&name, delta.unwrap_or(1));
                Ok(())
            })?,
        )?;
        let shared = self.shared.clone();
        host.raw_set(
            "hmac_sha256",
            lua.create_function(move |lua, (key_id, data): (String, LuaString)| {
                let tag = shared.hmac_sha256(&key_id, &data.as_bytes()).map_err(mlua::Error::runtime)?;
                lua.create_string(tag)
            })?,
        )?;
        let shared = self.shared.clone();
        host.raw_set(
            "hmac_sha256_derived",
            lua.create_function(move |lua, (key_id, info, data): (String, LuaString, LuaString)| {
                let tag = shared
                    .hmac_sha256_derived(&key_id, &info.as_bytes(), &data.as_bytes())
                    .map_err(mlua::Error::runtime)?;
                lua.create_string(tag)
            })?,
        )?;
        let shared = self.shared.clone();
        host.raw_set(
            "verify_hmac_sha256",
            lua.create_function(
                move |_, (key_id, derive_info, data, tag): (String, Option<LuaString>, LuaString, LuaString)| {
                    let info = derive_info.map(|info| info.as_bytes().to_vec());
                    shared
                        .verify_hmac_sha256(&key_id, info.as_deref(), &data.as_bytes(), &tag.as_bytes())
                        .map_err(mlua::Error::runtime)
                },
            )?,
        )?;
        let shared = self.shared.clone();
        host.raw_set(
            "mac",
            lua.create_function(
                move |lua, (alg, key_id, data, info): (String, String, LuaString, Option<LuaString>)| {
                    let alg = mac_algorithm(&alg)?;
                    let info = info.map(|info| info.as_bytes().to_vec());
                    let tag = shared
                        .mac_tag(alg, &key_id, info.as_deref(), &data.as_bytes())
                        .map_err(mlua::Error::runtime)?;
                    lua.create_string(tag)
                },
            )?,
        )?;
        let shared = self.shared.clone();
        host.raw_set(
            "verify_mac",
            lua.create_function(
                move |_, (alg, key_id, data, tag, info): (String, String, LuaString, LuaString, Option<LuaString>)| {
                    let alg = mac_algorithm(&alg)?;
                    let info = info.map(|info| info.as_bytes().to_vec());
                    shared
                        .verify_mac(alg, &key_id, info.as_deref(), &data.as_bytes(), &tag.as_bytes())
                        .map_err(mlua::Error::runtime)
                },
            )?,
        )?;
        let shared = self.shared.clone();
        host.raw_set(
            "kv_claim",
            lua.create_function(move |_, (key, ttl_ms): (String, u64)| Ok(shared.kv_claim(&key, ttl_ms)))?,
        )?;
        host.raw_set("clock_synchronized", lua.create_function(|_, ()| Ok(crate::clock::synchronized()))?)?;
        host.raw_set(
            "sha256",
            lua.create_function(|lua, data: LuaString| lua.create_string(PluginShared::sha256(&data.as_bytes())))?,
        )?;
        host.raw_set("hex", lua.create_function(|_, data: LuaString| Ok(hex::encode(data.as_bytes())))?)?;
        globals.raw_set("tollgate", host)?;
        lua.set_memory_limit(self.limits.memory_bytes)?;
        lua.set_interrupt(move |_| budget.check().map_err(|()| mlua::Error::runtime(CPU_LIMIT_MESSAGE)));
        // Read-only built-ins and a private global table for the script.
        lua.sandbox(true)?;
        Ok(lua)
    }

    /// `on_publish` (inbound) or `on_deliver` (a subscriber's copy) for one message: a burst of one.
    async fn transform_with(
        &self,
        client: &ClientInfo,
        message: &mut Message,
        outbound: bool,
    ) -> Result<TransformDecision, Failure> {
        let mut decisions = self.transform_burst(client, std::slice::from_mut(message), outbound).await?;
        match (decisions.pop(), decisions.is_empty()) {
            (Some(decision), true) => Ok(decision),
            _ => Err(Failure::BadAnswer("not one answer for one message".to_owned())),
        }
    }

    /// A burst of one client's messages through `on_publish` in one call into the VM.
    pub(crate) async fn transform_batch(
        &self,
        client: &ClientInfo,
        messages: &mut [Message],
    ) -> Result<Vec<TransformDecision>, Failure> {
        self.transform_burst(client, messages, false).await
    }

    /// Messages through the script's `on_publish` (or `on_deliver`) in one call into the VM (see
    /// [`TRANSFORM_BATCH_ENTRY`]). Every answer is checked before any is applied, so a bad answer leaves all the
    /// messages as they were; the burst then gets the failure policy, as a failed WASM `on-publish-batch` does.
    async fn transform_burst(
        &self,
        client: &ClientInfo,
        messages: &mut [Message],
        outbound: bool,
    ) -> Result<Vec<TransformDecision>, Failure> {
        let name = if outbound { "on_deliver" } else { "on_publish" };
        let mut topics = Vec::with_capacity(messages.iter().map(|message| message.topic.len()).sum());
        let mut payloads = Vec::with_capacity(messages.iter().map(|message| message.payload.len()).sum());
        let mut headers = Vec::with_capacity(8 * messages.len());
        for message in messages.iter() {
            let flags = message.qos as u8
                | (u8::from(message.retain) << 2)
                | (u8::from(message.payload_format_indicator == Some(1)) << 3);
            push_topic_header(&mut headers, flags, &message.topic)?;
            let payload_length = u32::try_from(message.payload.len())
                .map_err(|_| Failure::BadAnswer("a payload longer than 4 GiB".to_owned()))?;
            headers.extend_from_slice(&payload_length.to_be_bytes());
            topics.extend_from_slice(message.topic.as_bytes());
            payloads.extend_from_slice(&message.payload);
        }
        let count = messages.len();
        let drafts: &[Message] = messages;
        let answers = self
            .with_instance(CallClient::of(client), count, |mut instance| async move {
                let result = async {
                    let client = instance.client_table(client)?;
                    let function = if outbound { &instance.hooks.on_deliver } else { &instance.hooks.on_publish };
                    let Some(function) = function else {
                        return Ok(Ok(vec![(TransformDecision::Keep, None); count]));
                    };
                    let lua = &instance.lua;
                    let prebuilt = if drafts.iter().any(has_rare_fields) {
                        let table = lua.create_table()?;
                        for (index, draft) in drafts.iter().enumerate().filter(|(_, draft)| has_rare_fields(draft)) {
                            table.raw_set(index + 1, message_table(lua, draft)?)?;
                        }
                        Some(table)
                    } else {
                        None
                    };
                    let args = (
                        client,
                        lua.create_string(&topics)?,
                        lua.create_string(&payloads)?,
                        lua.create_string(&headers)?,
                        prebuilt,
                    );
                    let (codes, packed, others): (LuaString, LuaString, Option<Table>) =
                        instance.call(function, args).await?;
                    let (codes, packed) = (codes.as_bytes(), packed.as_bytes());
                    let mut packed: &[u8] = &packed;
                    let mut answers = Vec::with_capacity(codes.len());
                    for (index, code) in codes.iter().enumerate() {
                        let Some(draft) = drafts.get(index) else {
                            return Ok(Err(format!("{name} answered {} results for {count} messages", codes.len())));
                        };
                        let answer = match (code, &others) {
                            (b'k', _) => Ok((TransformDecision::Keep, None)),
                            (b'd', _) => Ok((TransformDecision::Drop { reason: "dropped by plugin".into() }, None)),
                            (b'm', _) => read_packed_message(&mut packed, draft)
                                .map(|modified| (TransformDecision::Modified, Some(modified))),
                            (_, Some(others)) => transform_answer(name, others.raw_get(index + 1)?, draft)?,
                            (_, None) => Err(format!("no answer for message {}", index + 1)),
                        };
                        match answer {
                            Ok(answer) => answers.push(answer),
                            Err(error) => return Ok(Err(error)),
                        }
                    }
                    Ok(Ok(answers))
                }
                .await;
                (instance, result)
            })
            .await?
            .map_err(Failure::BadAnswer)?;
        let stopped_early = matches!(answers.last(), Some((TransformDecision::Reject { disconnect: true, .. }, _)));
        if answers.len() > count || (answers.len() < count && !stopped_early) {
            return Err(Failure::BadAnswer(format!("{name} answered {} results for {count} messages", answers.len())));
        }
        Ok(answers
            .into_iter()
            .zip(messages.iter_mut())
            .map(|((decision, modified), message)| {
                if let Some(modified) = modified {
                    *message = modified;
                }
                decision
            })
            .collect())
    }

    /// Whether bursts go through `on_publish` in one call: the script has `on_publish`.
    pub(crate) fn batches_inbound(&self) -> bool {
        self.hooks.contains(&HookKind::Transform)
    }

    async fn with_instance<R, F, Fut>(&self, client: CallClient, messages: usize, call: F) -> Result<R, Failure>
    where
        F: FnOnce(Instance) -> Fut,
        Fut: Future<Output = (Instance, mlua::Result<R>)>,
    {
        let mut lease = self.pool.lease().await;
        let instance = match lease.take_idle() {
            Some(instance) => instance,
            // Boxed: building an instance is rare and its future is large, which every call's future would
            // otherwise carry (and copy) inline.
            None => Box::pin(self.instantiate()).await?,
        };
        *lock(&instance.client) = client;
        instance.budget.reset_for(messages);
        let (instance, result) = call(instance).await;
        match result {
            Ok(value) => {
                *lock(&instance.client) = CallClient::default();
                lease.put_back(instance);
                Ok(value)
            }
            Err(error) => Err(self.classify(&instance.budget, error)),
        }
    }
}

impl InstanceState {
    fn client_table(&mut self, client: &ClientInfo) -> mlua::Result<Table> {
        let key = (
            Arc::as_ptr(&client.client_id).cast::<u8>() as usize,
            client.username.as_ref().map_or(0, |name| Arc::as_ptr(name).cast::<u8>() as usize),
        );
        if let Some(cached) = self.clients.get(&key) {
            return Ok(cached.table.clone());
        }
        if self.clients.len() >= CLIENT_CACHE_ENTRIES {
            self.clients.clear();
        }
        let table = client_table(&self.lua, client)?;
        table.set_readonly(true);
        let cached = CachedClient {
            _client_id: client.client_id.clone(),
            _username: client.username.clone(),
            table: table.clone(),
        };
        self.clients.insert(key, cached);
        Ok(table)
    }

    /// Runs `function` in the instance's coroutine. Each time the interrupt yields (every millisecond of guest
    /// time), the coroutine is suspended and this task yields to the worker's other tasks before resuming it.
    async fn call<R: mlua::FromLuaMulti>(&self, function: &Function, args: impl mlua::IntoLuaMulti) -> mlua::Result<R> {
        self.thread.reset(function.clone())?;
        let mut values = self.thread.resume::<mlua::MultiValue>(args)?;
        while self.thread.status() == mlua::thread::ThreadStatus::Resumable {
            tokio::task::yield_now().await;
            values = self.thread.resume::<mlua::MultiValue>(())?;
        }
        R::from_lua_multi(values, &self.lua)
    }
}

fn is_memory_error(error: &mlua::Error) -> bool {
    match error {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. } => is_memory_error(cause),
        mlua::Error::WithContext { cause, .. } => is_memory_error(cause),
        _ => false,
    }
}

fn protocol_name(protocol: ProtocolVersion) -> &'static str {
    match protocol {
        ProtocolVersion::V31 => "3.1",
        ProtocolVersion::V311 => "3.1.1",
        ProtocolVersion::V5 => "5",
    }
}

fn client_table(lua: &Lua, client: &ClientInfo) -> mlua::Result<Table> {
    let table = lua.create_table_with_capacity(0, 4)?;
    table.raw_set("client_id", &*client.client_id)?;
    table.raw_set("username", client.username.as_deref())?;
    table.raw_set("protocol", protocol_name(client.protocol))?;
    table.raw_set("listener", &*client.listener)?;
    Ok(table)
}

fn message_table(lua: &Lua, message: &Message) -> mlua::Result<Table> {
    let table = lua.create_table_with_capacity(0, 10)?;
    table.raw_set("topic", &*message.topic)?;
    table.raw_set("payload", lua.create_string(&message.payload)?)?;
    table.raw_set("qos", message.qos as u8)?;
    table.raw_set("retain", message.retain)?;
    let properties = lua.create_table_with_capacity(message.user_properties.len(), 0)?;
    for property in &message.user_properties {
        properties.push(lua.create_sequence_from([property.key.as_str(), property.value.as_str()])?)?;
    }
    table.raw_set("user_properties", properties)?;
    table.raw_set("content_type", message.content_type.as_deref())?;
    table.raw_set("payload_is_utf8", message.payload_format_indicator == Some(1))?;
    table.raw_set("response_topic", message.response_topic.as_deref())?;
    if let Some(data) = &message.correlation_data {
        table.raw_set("correlation_data", lua.create_string(data)?)?;
    }
    table.raw_set("message_expiry", message.message_expiry_interval)?;
    Ok(table)
}

fn read_message(table: &Table, target: &mut Message) -> Result<(), String> {
    let bad = |field: &str, error: mlua::Error| format!("message.{field}: {error}");
    let topic: String = table.get("topic").map_err(|error| bad("topic", error))?;
    crate::check_topic(&topic)?;
    let payload: LuaString = table.get("payload").map_err(|error| bad("payload", error))?;
    let qos: u8 = table.get("qos").map_err(|error| bad("qos", error))?;
    let qos = QoS::from_u8(qos).ok_or_else(|| format!("message.qos: {qos} is not 0, 1 or 2"))?;
    let retain: bool = table.get("retain").map_err(|error| bad("retain", error))?;
    let mut user_properties = Vec::new();
    if let Some(list) = table.get::<Option<Table>>("user_properties").map_err(|error| bad("user_properties", error))? {
        for entry in list.sequence_values::<Table>() {
            let entry = entry.map_err(|error| bad("user_properties", error))?;
            let key: String = entry.get(1).map_err(|error| bad("user_properties[i][1]", error))?;
            let value: String = entry.get(2).map_err(|error| bad("user_properties[i][2]", error))?;
            user_properties.push(UserProperty { key, value });
        }
    }
    target.topic = topic.into();
    target.payload = bytes::Bytes::copy_from_slice(&payload.as_bytes());
    target.qos = qos;
    target.retain = retain;
    target.user_properties = user_properties;
    target.content_type = table.get("content_type").map_err(|error| bad("content_type", error))?;
    let utf8: Option<bool> = table.get("payload_is_utf8").map_err(|error| bad("payload_is_utf8", error))?;
    target.payload_format_indicator = utf8.unwrap_or(false).then_some(1);
    target.response_topic = table.get("response_topic").map_err(|error| bad("response_topic", error))?;
    let correlation: Option<LuaString> =
        table.get("correlation_data").map_err(|error| bad("correlation_data", error))?;
    target.correlation_data = correlation.map(|data| bytes::Bytes::copy_from_slice(&data.as_bytes()));
    target.message_expiry_interval = table.get("message_expiry").map_err(|error| bad("message_expiry", error))?;
    Ok(())
}

/// What a script's `on_publish` or `on_deliver` answered about `draft`: the decision, and the message it becomes
/// when modified. `Err` inside: an answer the contract does not know.
type TransformAnswer = Result<(TransformDecision, Option<Message>), String>;

fn transform_answer(name: &str, value: Value, draft: &Message) -> mlua::Result<TransformAnswer> {
    Ok(match value {
        Value::Nil => Ok((TransformDecision::Keep, None)),
        Value::String(_) => match string_of(&value).as_deref() {
            Some("unchanged") => Ok((TransformDecision::Keep, None)),
            Some("drop") => Ok((TransformDecision::Drop { reason: "dropped by plugin".into() }, None)),
            other => Err(format!("{name} returned {other:?}; expected nil, \"drop\" or a message")),
        },
        Value::Table(table) => {
            if let Some(reason) = table.get::<Option<String>>("drop")? {
                Ok((TransformDecision::Drop { reason }, None))
            } else if let Some(reason) = table.get::<Option<String>>("reject")? {
                let message = table.get::<Option<String>>("reason")?.unwrap_or_default();
                let disconnect = table.get::<Option<bool>>("disconnect")?.unwrap_or(false);
                deny_reason(&reason).map(|reason| (TransformDecision::Reject { reason, message, disconnect }, None))
            } else {
                let mut modified = draft.clone();
                read_message(&table, &mut modified).map(|()| (TransformDecision::Modified, Some(modified)))
            }
        }
        other => Err(format!("{name} returned a value of type {}", other.type_name())),
    })
}

/// The 4 bytes both burst loops read first for each message: its flags, then its topic's length in 3 bytes,
/// big-endian.
fn push_topic_header(headers: &mut Vec<u8>, flags: u8, topic: &str) -> Result<(), Failure> {
    let length = u32::try_from(topic.len())
        .ok()
        .filter(|length| *length < 1 << 24)
        .ok_or_else(|| Failure::BadAnswer("a topic longer than 16 MiB".to_owned()))?;
    let [_, high, middle, low] = length.to_be_bytes();
    headers.extend_from_slice(&[flags, high, middle, low]);
    Ok(())
}

/// Takes `length` bytes off the front of `input`.
fn take<'a>(input: &mut &'a [u8], length: usize, what: &str) -> Result<&'a [u8], String> {
    if input.len() < length {
        return Err(format!("a modified message ends inside its {what}"));
    }
    let (taken, rest) = input.split_at(length);
    *input = rest;
    Ok(taken)
}

fn take_number(input: &mut &[u8], bytes: usize, what: &str) -> Result<u32, String> {
    Ok(take(input, bytes, what)?.iter().fold(0, |number, byte| number << 8 | u32::from(*byte)))
}

/// A length-prefixed field (`s2` or `s4` in `string.pack`).
fn take_field<'a>(input: &mut &'a [u8], prefix: usize, what: &str) -> Result<&'a [u8], String> {
    let length = take_number(input, prefix, what)? as usize;
    take(input, length, what)
}

fn take_text(input: &mut &[u8], what: &str) -> Result<String, String> {
    let bytes = take_field(input, 2, what)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| format!("message.{what} is not UTF-8"))
}

/// One modified message as the burst loop packed it (`>s2s4BBBB`: topic, payload, QoS, retain, UTF-8 payload, which
/// optional fields follow; then content type `s2`, response topic `s2`, correlation data `s4`, expiry `I4` as
/// present; then the user properties, a count `I2` and `s2s2` pairs), checked as `read_message` checks a table.
/// Fields the script left as they were keep their buffers.
fn read_packed_message(input: &mut &[u8], draft: &Message) -> Result<Message, String> {
    let topic = take_field(input, 2, "topic")?;
    let topic = std::str::from_utf8(topic).map_err(|_| "message.topic is not UTF-8".to_owned())?;
    crate::check_topic(topic)?;
    let payload = take_field(input, 4, "payload")?;
    let [qos, retain, utf8, present] = <[u8; 4]>::try_from(take(input, 4, "flags")?).unwrap_or_default();
    let qos = QoS::from_u8(qos).ok_or_else(|| format!("message.qos: {qos} is not 0, 1 or 2"))?;
    let content_type = if present & 1 != 0 { Some(take_text(input, "content_type")?) } else { None };
    let response_topic = if present & 2 != 0 { Some(take_text(input, "response_topic")?) } else { None };
    let correlation_data = if present & 4 != 0 {
        Some(bytes::Bytes::copy_from_slice(take_field(input, 4, "correlation_data")?))
    } else {
        None
    };
    let message_expiry_interval = if present & 8 != 0 { Some(take_number(input, 4, "message_expiry")?) } else { None };
    let count = take_number(input, 2, "user_properties")?;
    let user_properties = (0..count)
        .map(|_| {
            Ok(UserProperty { key: take_text(input, "user_properties")?, value: take_text(input, "user_properties")? })
        })
        .collect::<Result<_, String>>()?;
    Ok(Message {
        topic: if *draft.topic == *topic { draft.topic.clone() } else { topic.into() },
        payload: if draft.payload == payload { draft.payload.clone() } else { bytes::Bytes::copy_from_slice(payload) },
        qos,
        retain: retain != 0,
        user_properties,
        content_type,
        payload_format_indicator: (utf8 != 0).then_some(1),
        response_topic,
        correlation_data,
        message_expiry_interval,
    })
}

/// Whether a message needs a table built through the API: it carries a property the burst loop's strings do not.
fn has_rare_fields(message: &Message) -> bool {
    !message.user_properties.is_empty()
        || message.content_type.is_some()
        || message.response_topic.is_some()
        || message.correlation_data.is_some()
        || message.message_expiry_interval.is_some()
}

fn deny_reason(name: &str) -> Result<ReasonCode, String> {
    Ok(match name {
        "bad_credentials" => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
        "not_authorized" => ReasonCode::NOT_AUTHORIZED,
        "banned" => ReasonCode::BANNED,
        "server_busy" => ReasonCode::SERVER_BUSY,
        "bad_auth_method" => ReasonCode::BAD_AUTHENTICATION_METHOD,
        "quota_exceeded" => ReasonCode::QUOTA_EXCEEDED,
        "payload_format_invalid" => ReasonCode::PAYLOAD_FORMAT_INVALID,
        "topic_name_invalid" => ReasonCode::TOPIC_NAME_INVALID,
        "client_id_invalid" => ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
        other => return Err(format!("unknown deny reason {other:?}")),
    })
}

fn string_of(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => text.to_str().ok().map(|text| text.to_owned()),
        _ => None,
    }
}

fn connect_decision(value: Value) -> Result<AuthDecision, String> {
    match value {
        Value::Nil => Ok(AuthDecision::Abstain),
        Value::Boolean(true) => Ok(AuthDecision::allow()),
        Value::Boolean(false) => Ok(AuthDecision::deny(ReasonCode::NOT_AUTHORIZED)),
        Value::String(_) => match string_of(&value).as_deref() {
            Some("allow") => Ok(AuthDecision::allow()),
            Some("deny") => Ok(AuthDecision::deny(ReasonCode::NOT_AUTHORIZED)),
            Some("ignore") => Ok(AuthDecision::Abstain),
            other => Err(format!("on_connect returned {other:?}; expected \"allow\", \"deny\", \"ignore\" or a table")),
        },
        Value::Table(table) => {
            if let Some(reason) = table.get::<Option<String>>("deny").map_err(|error| error.to_string())? {
                return Ok(AuthDecision::Deny { reason: deny_reason(&reason)?, message: None });
            }
            if let Some(data) = table.get::<Option<LuaString>>("challenge").map_err(|error| error.to_string())? {
                return Ok(AuthDecision::Continue { data: Some(bytes::Bytes::copy_from_slice(&data.as_bytes())) });
            }
            if table.get::<Option<bool>>("allow").map_err(|error| error.to_string())? == Some(true) {
                let mut attributes = std::collections::BTreeMap::new();
                if let Some(map) = table.get::<Option<Table>>("attributes").map_err(|error| error.to_string())? {
                    for pair in map.pairs::<String, String>() {
                        let (key, value) = pair.map_err(|error| format!("attributes: {error}"))?;
                        attributes.insert(key, value);
                    }
                }
                return Ok(AuthDecision::Allow { attributes });
            }
            Err("on_connect returned a table without allow, deny or challenge".to_owned())
        }
        other => Err(format!("on_connect returned a value of type {}", other.type_name())),
    }
}

fn acl_decision(function: &str, value: Value) -> Result<AclDecision, String> {
    match value {
        Value::Nil => Ok(AclDecision::Abstain),
        Value::Boolean(true) => Ok(AclDecision::Allow),
        Value::Boolean(false) => Ok(AclDecision::Deny(ReasonCode::NOT_AUTHORIZED)),
        Value::String(_) => match string_of(&value).as_deref() {
            Some("allow") => Ok(AclDecision::Allow),
            Some("deny") => Ok(AclDecision::Deny(ReasonCode::NOT_AUTHORIZED)),
            Some("ignore") => Ok(AclDecision::Abstain),
            other => Err(format!("{function} returned {other:?}; expected \"allow\", \"deny\", \"ignore\" or a table")),
        },
        Value::Table(table) => {
            if let Some(reason) = table.get::<Option<String>>("deny").map_err(|error| error.to_string())? {
                return Ok(AclDecision::Deny(deny_reason(&reason)?));
            }
            if let Some(qos) = table.get::<Option<u8>>("max_qos").map_err(|error| error.to_string())? {
                let qos = QoS::from_u8(qos).ok_or_else(|| format!("max_qos {qos} is not 0, 1 or 2"))?;
                return Ok(AclDecision::AllowMaxQos(qos));
            }
            Err(format!("{function} returned a table without deny or max_qos"))
        }
        other => Err(format!("{function} returned a value of type {}", other.type_name())),
    }
}

impl Runtime for LuaPlugin {
    fn shared(&self) -> &Arc<PluginShared> {
        &self.shared
    }

    fn provided_hooks(&self) -> Vec<HookKind> {
        self.hooks.clone()
    }

    async fn authenticate(&self, request: &ConnectRequest) -> Result<AuthDecision, Failure> {
        let request = request.clone();
        let client = CallClient { attributes: Default::default(), peer: request.peer.clone() };
        let decision = self
            .with_instance(client, 1, |instance| async move {
                let result = async {
                    let Some(function) = &instance.hooks.on_connect else { return Ok(Ok(AuthDecision::Abstain)) };
                    let lua = &instance.lua;
                    let info = lua.create_table()?;
                    info.raw_set("client_id", &*request.client_id)?;
                    info.raw_set("username", request.username.as_deref())?;
                    info.raw_set("username_from_certificate", request.username_from_certificate)?;
                    if let Some(password) = &request.password {
                        info.raw_set("password", lua.create_string(password)?)?;
                    }
                    info.raw_set("protocol", protocol_name(request.protocol))?;
                    info.raw_set("remote_addr", request.remote_addr.map(|address| address.to_string()))?;
                    info.raw_set("listener", &*request.listener)?;
                    if let Some(peer) = &request.peer {
                        let cert = lua.create_table()?;
                        cert.raw_set("subject", peer.subject.as_str())?;
                        cert.raw_set("common_name", peer.common_name.as_deref())?;
                        cert.raw_set("subject_serial_number", peer.subject_serial_number.as_deref())?;
                        cert.raw_set(
                            "organizational_units",
                            lua.create_sequence_from(peer.organizational_units.iter().map(String::as_str))?,
                        )?;
                        cert.raw_set("san_uris", lua.create_sequence_from(peer.san_uri.iter().map(String::as_str))?)?;
                        cert.raw_set("san_dns", lua.create_sequence_from(peer.san_dns.iter().map(String::as_str))?)?;
                        cert.raw_set("serial", peer.serial.as_str())?;
                        cert.raw_set("fingerprint_sha256", peer.fingerprint_sha256.as_str())?;
                        info.raw_set("cert", cert)?;
                    }
                    info.raw_set("auth_method", request.authentication_method.as_deref())?;
                    if let Some(data) = &request.authentication_data {
                        info.raw_set("auth_data", lua.create_string(data)?)?;
                    }
                    let value: Value = instance.call(function, info).await?;
                    Ok(connect_decision(value))
                }
                .await;
                (instance, result)
            })
            .await?;
        decision.map_err(Failure::BadAnswer)
    }

    async fn authorize(&self, client: &ClientInfo, request: AclRequest<'_>) -> Result<AclDecision, Failure> {
        let decision = self
            .with_instance(CallClient::of(client), 1, |mut instance| async move {
                let result = async {
                    let client = instance.client_table(client)?;
                    let (name, value): (&str, Value) = match request {
                        AclRequest::Publish { topic, qos, retain, will } => {
                            let Some(function) = &instance.hooks.authorize_publish else {
                                return Ok(Ok(AclDecision::Abstain));
                            };
                            let kind = if will { &instance.kind_will } else { &instance.kind_publish };
                            let args = (client, topic, qos as u8, retain, kind);
                            ("authorize_publish", instance.call(function, args).await?)
                        }
                        AclRequest::Subscribe { filter, qos, share_group } => {
                            let Some(function) = &instance.hooks.authorize_subscribe else {
                                return Ok(Ok(AclDecision::Abstain));
                            };
                            let args = (client, filter, qos as u8, share_group);
                            ("authorize_subscribe", instance.call(function, args).await?)
                        }
                        AclRequest::Session => {
                            let Some(function) = &instance.hooks.authorize_session else {
                                return Ok(Ok(AclDecision::Abstain));
                            };
                            ("authorize_session", instance.call(function, client).await?)
                        }
                    };
                    Ok(acl_decision(name, value))
                }
                .await;
                (instance, result)
            })
            .await?;
        decision.map_err(Failure::BadAnswer)
    }

    async fn authorize_publish_batch(
        &self,
        client: &ClientInfo,
        requests: &[PublishRequest<'_>],
    ) -> Result<Vec<AclDecision>, Failure> {
        let mut topics = Vec::with_capacity(requests.iter().map(|request| request.topic.len()).sum());
        let mut headers = Vec::with_capacity(4 * requests.len());
        for request in requests {
            push_topic_header(&mut headers, request.qos as u8 | (u8::from(request.retain) << 2), request.topic)?;
            topics.extend_from_slice(request.topic.as_bytes());
        }
        let count = requests.len();
        let decisions = self
            .with_instance(CallClient::of(client), count, |mut instance| async move {
                let result = async {
                    let client = instance.client_table(client)?;
                    let Some(function) = &instance.hooks.authorize_publish_batch else {
                        return Ok(Ok(vec![AclDecision::Abstain; count]));
                    };
                    let topics = instance.lua.create_string(&topics)?;
                    let headers = instance.lua.create_string(&headers)?;
                    let args = (client, topics, headers, &instance.kind_publish);
                    let (codes, others): (LuaString, Option<Table>) = instance.call(function, args).await?;
                    let codes = codes.as_bytes();
                    if codes.len() != count {
                        return Ok(Err(format!("{} decisions for {count} publishes", codes.len())));
                    }
                    let mut decisions = Vec::with_capacity(count);
                    for (index, code) in codes.iter().enumerate() {
                        decisions.push(match (code, &others) {
                            (b'n', _) => AclDecision::Abstain,
                            (b'a', _) => AclDecision::Allow,
                            (b'd', _) => AclDecision::Deny(ReasonCode::NOT_AUTHORIZED),
                            (_, Some(others)) => match acl_decision("authorize_publish", others.raw_get(index + 1)?) {
                                Ok(decision) => decision,
                                Err(error) => return Ok(Err(error)),
                            },
                            (_, None) => return Ok(Err(format!("no decision for publish {}", index + 1))),
                        });
                    }
                    Ok(Ok(decisions))
                }
                .await;
                (instance, result)
            })
            .await?;
        decisions.map_err(Failure::BadAnswer)
    }

    async fn transform(&self, client: &ClientInfo, message: &mut Message) -> Result<TransformDecision, Failure> {
        self.transform_with(client, message, false).await
    }

    async fn deliver(&self, subscriber: &ClientInfo, message: &mut Message) -> Result<TransformDecision, Failure> {
        self.transform_with(subscriber, message, true).await
    }

    async fn session_event(&self, client: &ClientInfo, cause: Option<DisconnectCause>) -> Result<(), Failure> {
        self.with_instance(CallClient::of(client), 1, |mut instance| async move {
            let result = async {
                let hook = if cause.is_some() { &instance.hooks.on_disconnected } else { &instance.hooks.on_connected };
                let Some(function) = hook.clone() else { return Ok(()) };
                let client = instance.client_table(client)?;
                // What the hook returns is not read: it is told, not asked.
                let _: Value = match cause {
                    Some(cause) => instance.call(&function, (client, cause.as_str())).await?,
                    None => instance.call(&function, client).await?,
                };
                Ok::<_, mlua::Error>(())
            }
            .await;
            (instance, result)
        })
        .await
    }

    async fn route(
        &self,
        direction: RouteDirection,
        bridge: &str,
        message: &Message,
    ) -> Result<RouteDecision, Failure> {
        let draft = message.clone();
        let bridge = bridge.to_owned();
        let decision = self
            .with_instance(CallClient::default(), 1, |instance| async move {
                let result = async {
                    let Some(function) = &instance.hooks.route else { return Ok(Ok(RouteDecision::Abstain)) };
                    let lua = &instance.lua;
                    let direction = match direction {
                        RouteDirection::Egress => "egress",
                        RouteDirection::Ingress => "ingress",
                    };
                    let value: Value =
                        instance.call(function, (direction, bridge, message_table(lua, &draft)?)).await?;
                    Ok(match value {
                        Value::Nil => Ok(RouteDecision::Abstain),
                        Value::String(_) => match string_of(&value).as_deref() {
                            Some("forward") => Ok(RouteDecision::Forward),
                            Some("drop") => Ok(RouteDecision::Drop),
                            Some("ignore") => Ok(RouteDecision::Abstain),
                            other => Err(format!("route returned {other:?}")),
                        },
                        Value::Table(table) => match table.get::<Option<String>>("rewrite")? {
                            Some(topic) => crate::check_topic(&topic).map(|()| RouteDecision::Rewrite { topic }),
                            None => Err("route returned a table without rewrite".to_owned()),
                        },
                        other => Err(format!("route returned a value of type {}", other.type_name())),
                    })
                }
                .await;
                (instance, result)
            })
            .await?;
        decision.map_err(Failure::BadAnswer)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A message packed as the burst loop's `pack` does.
    fn packed(message: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        let field = |out: &mut Vec<u8>, bytes: &[u8], prefix: usize| {
            out.extend_from_slice(&(bytes.len() as u32).to_be_bytes()[4 - prefix..]);
            out.extend_from_slice(bytes);
        };
        field(&mut out, message.topic.as_bytes(), 2);
        field(&mut out, &message.payload, 4);
        let present = u8::from(message.content_type.is_some())
            | u8::from(message.response_topic.is_some()) << 1
            | u8::from(message.correlation_data.is_some()) << 2
            | u8::from(message.message_expiry_interval.is_some()) << 3;
        let utf8 = u8::from(message.payload_format_indicator == Some(1));
        out.extend_from_slice(&[message.qos as u8, u8::from(message.retain), utf8, present]);
        if let Some(content_type) = &message.content_type {
            field(&mut out, content_type.as_bytes(), 2);
        }
        if let Some(response_topic) = &message.response_topic {
            field(&mut out, response_topic.as_bytes(), 2);
        }
        if let Some(correlation) = &message.correlation_data {
            field(&mut out, correlation, 4);
        }
        if let Some(expiry) = message.message_expiry_interval {
            out.extend_from_slice(&expiry.to_be_bytes());
        }
        out.extend_from_slice(&(message.user_properties.len() as u16).to_be_bytes());
        for property in &message.user_properties {
            field(&mut out, property.key.as_bytes(), 2);
            field(&mut out, property.value.as_bytes(), 2);
        }
        out
    }

    fn a_message() -> impl Strategy<Value = Message> {
        (
            "[a-z/]{1,20}",
            proptest::collection::vec(any::<u8>(), 0..64),
            0u8..3,
            any::<bool>(),
            proptest::option::of("[ -~]{0,8}"),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
            proptest::option::of(any::<u32>()),
            proptest::collection::vec(("[ -~]{0,6}", "\\PC{0,6}"), 0..4),
        )
            .prop_map(|(topic, payload, qos, retain, content_type, correlation, expiry, properties)| Message {
                topic: topic.into(),
                payload: payload.into(),
                qos: QoS::from_u8(qos).unwrap_or(QoS::AtMostOnce),
                retain,
                content_type,
                correlation_data: correlation.map(Into::into),
                message_expiry_interval: expiry,
                user_properties: properties.into_iter().map(|(key, value)| UserProperty { key, value }).collect(),
                ..Message::default()
            })
    }

    proptest! {
        /// The host reads what the VM hands back: any bytes get an answer or an error, never a panic.
        #[test]
        fn any_bytes_are_read_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut input = &bytes[..];
            let _ = read_packed_message(&mut input, &Message::default());
        }

        /// A packed message reads back whole; cut anywhere short, it is refused.
        #[test]
        fn packed_messages_round_trip_and_truncations_fail(message in a_message(), cut in any::<prop::sample::Index>()) {
            let bytes = packed(&message);
            let mut input = &bytes[..];
            let read = read_packed_message(&mut input, &Message::default());
            prop_assert_eq!(read.as_ref(), Ok(&message));
            prop_assert!(input.is_empty());
            let short = &bytes[..cut.index(bytes.len())];
            prop_assert!(read_packed_message(&mut &short[..], &Message::default()).is_err());
        }
    }
}
