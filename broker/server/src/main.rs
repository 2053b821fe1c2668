//! The `tollgate` command line.

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tollgate::{Config, Server, config};
use tollgate_builtins::password_file::{HashScheme, MOSQUITTO_PBKDF2_ITERATIONS, PasswordFile};
use tracing::{error, info, warn};

/// See the `mimalloc` feature in Cargo.toml for why the broker does not use the system allocator.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "An MQTT broker whose every connection and message passes through policy gates"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (embedded defaults: 127.0.0.1:1883, anonymous access because it is loopback).
    Run {
        /// A TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Listen on this address instead of the configured listeners (repeatable).
        #[arg(long)]
        listen: Vec<String>,
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
    /// Check a configuration file, list every problem with its key, and exit non-zero if there are any.
    CheckConfig { file: PathBuf },
    /// Create or update a Mosquitto-compatible password file.
    Passwd {
        /// Create the file, replacing any existing one.
        #[arg(short = 'c', long)]
        create: bool,
        /// Delete the user instead of setting a password.
        #[arg(short = 'D', long)]
        delete: bool,
        /// Hash scheme for new entries.
        #[arg(long, value_enum, default_value_t = Scheme::Argon2id)]
        scheme: Scheme,
        file: PathBuf,
        username: String,
        /// The password; read from standard input when omitted.
        password: Option<String>,
    },
    /// Development certificates: a CA, server certificates and client certificates (rcgen).
    Certs {
        #[command(subcommand)]
        action: CertsAction,
    },
    /// Work with policy plugins.
    Plugin {
        #[command(subcommand)]
        action: PluginAction,
    },
    /// Sign or verify a message in msg-auth's format, with the key in hand (for backends and scripts).
    Sig {
        // Boxed: a signing request is several times the size of every other command.
        #[command(subcommand)]
        action: Box<SigAction>,
    },
    /// Ask the running broker to reload (like SIGHUP) through its admin socket, and print what happened: exits
    /// non-zero when something did not reload (it keeps its previous version).
    Reload {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print the running broker's status (clients, sessions, messages, plugins and their health) as JSON, through
    /// its admin socket.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Time-boxed grants for vin-acl (a dealer tool may reach one VIN until a deadline): change the plugin's
    /// grants file, record the change in `<grants file>.audit.log`, and have the running broker re-read it
    /// through its admin socket.
    Grant {
        #[command(subcommand)]
        action: GrantAction,
    },
}

#[derive(Subcommand)]
enum GrantAction {
    /// Let WHO (a user name or client id) reach VIN through the plugin's `scope = "granted"` rules until a
    /// deadline. Replaces an existing grant for the same pair.
    Add {
        #[command(flatten)]
        target: GrantTarget,
        who: String,
        vin: String,
        /// When it ends: `2026-11-22T15:00:00Z`, or a duration from now (`+2h`, `90m`, `3days`).
        #[arg(long)]
        until: String,
        /// Why (a work order number), kept in the file and in the audit log.
        #[arg(long)]
        reason: Option<String>,
    },
    /// End WHO's grant for VIN now: the broker removes the subscriptions it allowed at its next recheck.
    Remove {
        #[command(flatten)]
        target: GrantTarget,
        who: String,
        vin: String,
    },
    /// Print the live grants (who, VIN, until, reason), one per line.
    List {
        #[command(flatten)]
        target: GrantTarget,
    },
}

#[derive(clap::Args)]
struct GrantTarget {
    /// The broker's configuration file: it names the plugin's grants file and the admin socket.
    #[arg(long, short)]
    config: PathBuf,
    /// The plugin whose `[plugins.files] grants` file holds the grants.
    #[arg(long, default_value = "vin-acl")]
    plugin: String,
}

#[derive(clap::Args)]
struct AdminArgs {
    /// The broker's configuration file, to find `runtime.admin_socket` in.
    #[arg(long, short, required_unless_present = "socket")]
    config: Option<PathBuf>,
    /// The admin socket itself.
    #[arg(long, conflicts_with = "config")]
    socket: Option<PathBuf>,
}

#[derive(clap::Args)]
struct SigMessage {
    /// The topic the message is published on.
    #[arg(long)]
    topic: String,
    /// The payload as text.
    #[arg(long, conflicts_with = "payload_file")]
    payload: Option<String>,
    /// The payload from a file (`-` for standard input).
    #[arg(long)]
    payload_file: Option<PathBuf>,
    /// The message was published with retain set.
    #[arg(long)]
    retain: bool,
    #[arg(long)]
    content_type: Option<String>,
    #[arg(long)]
    response_topic: Option<String>,
    /// Correlation data as hex.
    #[arg(long)]
    correlation_hex: Option<String>,
    /// The key: `hex:…`, `env:VAR` or `file:path`.
    #[arg(long)]
    secret: String,
    /// HKDF info template for per-identity keys, e.g. `vin-mac-v1:${sub}`.
    #[arg(long)]
    derive: Option<String>,
}

#[derive(Subcommand)]
enum SigAction {
    /// Check a signature; prints one JSON line and exits 0 when valid, 1 when not, 2 when unreadable.
    Verify {
        #[command(flatten)]
        message: SigMessage,
        /// The `x-sig` user property; without it the payload must be an envelope (`x-sig:<header>\n<payload>`).
        #[arg(long)]
        header: Option<String>,
    },
    /// Sign a message and print the `x-sig` header (or, with --envelope, the enveloped payload).
    Sign {
        #[command(flatten)]
        message: SigMessage,
        #[arg(long)]
        kid: String,
        /// The identity the message speaks for (a VIN).
        #[arg(long, default_value = "")]
        sub: String,
        /// The signer: a site or service id.
        #[arg(long, default_value = "")]
        iss: String,
        /// The counter; it must grow with every message from this signer (or use --nonce).
        #[arg(long)]
        ctr: Option<u64>,
        /// The MAC: hs256 (HMAC-SHA256) or cmac-aes128 (AES-128-CMAC, a 16-byte secret).
        #[arg(long, default_value = "hs256")]
        alg: String,
        /// A value this signer never repeats (letters, digits, '.', '_', ':' or '-'), for signers without a
        /// persistent counter; `random` draws 16 random bytes (32 hex digits).
        #[arg(long)]
        nonce: Option<String>,
        /// Expiry in seconds from now (0: none).
        #[arg(long, default_value_t = 0)]
        expires_in: u64,
        /// Print the payload wrapped in an envelope, for MQTT 3.1.1 links.
        #[arg(long)]
        envelope: bool,
    },
}

#[derive(Subcommand)]
enum PluginAction {
    /// Replay a JSON Lines file of hook events against one plugin, without a broker, printing each decision as
    /// a JSON line. Exits non-zero if an event is invalid or the plugin failed on one.
    Test {
        /// A `.wasm` or `.lua` file, or with --config the name of a `[[plugins]]` entry.
        plugin: String,
        /// The events, one JSON object per line (`-` for standard input).
        #[arg(long)]
        events: PathBuf,
        /// Take the plugin (path, limits, secrets, config) from this broker configuration.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// A plugin config value, `key=value` (repeatable; dotted keys make tables). Without --config only.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        settings: Vec<String>,
        /// A host-side HMAC secret, `id=hex:…|env:VAR|file:path` (repeatable). Without --config only.
        #[arg(long = "secret", value_name = "ID=SECRET")]
        secrets: Vec<String>,
    },
}

#[derive(Subcommand)]
enum CertsAction {
    /// Create a development CA (ca.pem, ca.key) and a server certificate (server.pem, server.key).
    Init {
        /// Directory for the files.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Host name or IP address the server certificate is valid for (repeatable; the first is its CN).
        #[arg(long = "host", default_values_t = ["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()])]
        hosts: Vec<String>,
        /// Validity of the server certificate in days (the CA gets four times as long).
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a client certificate signed by the CA in --dir.
    Client {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Subject common name, e.g. the vehicle's VIN.
        #[arg(long)]
        cn: String,
        /// URI subject alternative name, e.g. urn:vin:<VIN> (repeatable).
        #[arg(long = "san-uri")]
        san_uris: Vec<String>,
        /// Subject serialNumber attribute (for identity_from = "subject_serial").
        #[arg(long)]
        subject_serial: Option<String>,
        /// File name stem for <out>.pem and <out>.key (default: the CN).
        #[arg(long)]
        out: Option<String>,
        #[arg(long, default_value_t = 825)]
        days: u32,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum Scheme {
    /// argon2id (recommended)
    Argon2id,
    /// Mosquitto 2 `$7$` (PBKDF2-SHA512)
    Pbkdf2,
    /// Mosquitto 1.x `$6$` (salted SHA-512), for old tooling only
    Sha512,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, listen, log_format } => run(config.as_deref(), listen, log_format),
        Command::CheckConfig { file } => check_config(&file),
        Command::Passwd { create, delete, scheme, file, username, password } => {
            passwd(create, delete, scheme, &file, &username, password)
        }
        Command::Certs { action } => certs(action),
        Command::Plugin { action: PluginAction::Test { plugin, events, config, settings, secrets } } => {
            plugin_test(&plugin, &events, config.as_deref(), &settings, &secrets)
        }
        Command::Sig { action } => sig(*action),
        Command::Reload { admin } => admin_request(admin, AdminCommand::Reload),
        Command::Status { admin } => admin_request(admin, AdminCommand::Status),
        Command::Grant { action } => grant(action),
    }
}

fn grant(action: GrantAction) -> ExitCode {
    match grant_change(action) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}

fn grant_change(action: GrantAction) -> Result<ExitCode, String> {
    use tollgate::grants;
    let target = match &action {
        GrantAction::Add { target, .. } | GrantAction::Remove { target, .. } | GrantAction::List { target } => target,
    };
    let config = config::load(Some(&target.config)).map_err(|problems| {
        print_problems(&problems);
        format!("{}: not changed", target.config.display())
    })?;
    let plugin = config
        .plugins
        .iter()
        .find(|plugin| plugin.name == target.plugin)
        .ok_or_else(|| format!("{}: no plugin named {:?}", target.config.display(), target.plugin))?;
    let path = plugin.files.get("grants").ok_or_else(|| {
        format!(
            "{}: plugin {:?} has no grants file; add `grants = \"/etc/tollgate/vin-grants.txt\"` to its [plugins.files]",
            target.config.display(),
            target.plugin
        )
    })?;
    // Two operators changing grants at once must not lose one change: read, change and write under a lock.
    let _lock = grants::lock(path)?;
    let mut file = grants::read(path)?;
    let now = grants::now_seconds();
    let (audit_action, grant, change) = match action {
        GrantAction::List { .. } => {
            for grant in file.grants().filter(|grant| grant.until > now) {
                println!("{grant}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        GrantAction::Add { who, vin, until, reason, .. } => {
            let until = grants::parse_until(&until, std::time::SystemTime::now())
                .map_err(|error| format!("--until: {error}"))?;
            let grant = grants::Grant { who, vin: vin.to_ascii_uppercase(), until, reason };
            let change = file.add(grant.clone(), now)?;
            ("add", grant, change)
        }
        GrantAction::Remove { who, vin, .. } => {
            let change = file.remove(&who, &vin, now);
            let Some(removed) = change.replaced.clone() else {
                return Err(format!("{}: no grant for {who} {}", path.display(), vin.to_ascii_uppercase()));
            };
            ("remove", removed, change)
        }
    };
    grants::write(path, &file)?;
    grants::audit(path, audit_action, &grant, now)?;
    let verb = match (audit_action, &change.replaced) {
        ("add", Some(_)) => "replaced",
        ("add", None) => "added",
        _ => "removed",
    };
    println!("{verb}: {} {} in {}", grant.who, grant.vin, path.display());
    if change.expired > 0 {
        println!("dropped {} expired grant(s)", change.expired);
    }
    match config.runtime.admin_socket {
        Some(socket) => Ok(reload_through(&socket)),
        None => {
            println!("no runtime.admin_socket configured: send the broker SIGHUP to apply it");
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(unix)]
fn reload_through(socket: &Path) -> ExitCode {
    ask_broker(socket, AdminCommand::Reload, "the file is changed, but the broker did not apply it: ")
}

/// Sends `command` through the admin socket and prints the answer (an error after `failure_prefix`).
#[cfg(unix)]
fn ask_broker(socket: &Path, command: AdminCommand, failure_prefix: &str) -> ExitCode {
    let answer = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(tollgate::admin::request(socket, command)),
        Err(error) => Err(error.to_string()),
    };
    match answer {
        Ok(message) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{failure_prefix}{error}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(not(unix))]
fn reload_through(_socket: &Path) -> ExitCode {
    println!("no admin socket on this system: send the broker SIGHUP to apply it");
    ExitCode::SUCCESS
}

#[cfg(unix)]
use tollgate::admin::Command as AdminCommand;

#[cfg(not(unix))]
#[derive(Clone, Copy)]
enum AdminCommand {
    Reload,
    Status,
}

#[cfg(unix)]
fn admin_request(args: AdminArgs, command: AdminCommand) -> ExitCode {
    let AdminArgs { config: config_path, socket } = args;
    let config_path = config_path.as_deref();
    let socket = match (socket, config_path) {
        (Some(socket), _) => socket,
        (None, Some(path)) => match config::load(Some(path)) {
            Ok(config) => match config.runtime.admin_socket {
                Some(socket) => socket,
                None => {
                    eprintln!(
                        "{}: no runtime.admin_socket configured; set one (and restart), or send the broker SIGHUP",
                        path.display()
                    );
                    return ExitCode::FAILURE;
                }
            },
            Err(problems) => {
                print_problems(&problems);
                return ExitCode::FAILURE;
            }
        },
        (None, None) => {
            eprintln!("say where the broker is: --config FILE or --socket PATH");
            return ExitCode::FAILURE;
        }
    };
    ask_broker(&socket, command, "")
}

#[cfg(not(unix))]
fn admin_request(_args: AdminArgs, _command: AdminCommand) -> ExitCode {
    eprintln!("no admin socket on this system (SIGHUP reloads on Unix; $SYS carries the status)");
    ExitCode::FAILURE
}

fn sig_inputs(message: &SigMessage) -> Result<(tollgate::sig::MessageArgs, tollgate::sig::KeyArgs), String> {
    let payload = match (&message.payload, &message.payload_file) {
        (Some(text), _) => text.clone().into_bytes(),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes).map_err(|error| format!("stdin: {error}"))?;
            bytes
        }
        (None, Some(path)) => std::fs::read(path).map_err(|error| format!("{}: {error}", path.display()))?,
        (None, None) => Vec::new(),
    };
    let correlation_data = message
        .correlation_hex
        .as_deref()
        .map(|digits| hex::decode(digits).map_err(|error| format!("--correlation-hex: {error}")))
        .transpose()?;
    let secret =
        tollgate_plugin_host::spec::resolve_secret(&message.secret).map_err(|error| format!("--secret: {error}"))?;
    Ok((
        tollgate::sig::MessageArgs {
            topic: message.topic.clone(),
            payload,
            retain: message.retain,
            content_type: message.content_type.clone(),
            correlation_data,
            response_topic: message.response_topic.clone(),
        },
        tollgate::sig::KeyArgs { secret, derive: message.derive.clone() },
    ))
}

fn sig(action: SigAction) -> ExitCode {
    let (message, header, signing) = match action {
        SigAction::Verify { message, header } => (message, header, None),
        SigAction::Sign { message, kid, sub, iss, ctr, alg, nonce, expires_in, envelope } => {
            (message, None, Some((kid, sub, iss, ctr, alg, nonce, expires_in, envelope)))
        }
    };
    let (message, key) = match sig_inputs(&message) {
        Ok(inputs) => inputs,
        Err(error) => {
            eprintln!("tollgate sig: {error}");
            return ExitCode::from(2);
        }
    };
    let Some((kid, sub, iss, ctr, alg, nonce, expires_in, envelope)) = signing else {
        let verdict = tollgate::sig::verify(&message, header.as_deref(), &key);
        println!("{}", tollgate::sig::describe(&verdict));
        return match verdict {
            tollgate::sig::Verdict::Valid(_) => ExitCode::SUCCESS,
            tollgate::sig::Verdict::Invalid(_) => ExitCode::from(1),
            tollgate::sig::Verdict::Malformed(_) => ExitCode::from(2),
        };
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX));
    let exp = if expires_in == 0 { 0 } else { now.saturating_add(expires_in.saturating_mul(1000)) };
    let Some(alg) = tollgate_sig::Algorithm::from_name(&alg) else {
        eprintln!("tollgate sig: --alg {alg:?} is not hs256 or cmac-aes128");
        return ExitCode::from(2);
    };
    let nonce = match nonce.as_deref() {
        Some("random") => {
            let mut bytes = [0u8; 16];
            if let Err(error) = getrandom::fill(&mut bytes) {
                eprintln!("tollgate sig: no randomness for --nonce random: {error}");
                return ExitCode::from(2);
            }
            hex::encode(bytes)
        }
        other => other.unwrap_or_default().to_owned(),
    };
    let ctr = ctr.unwrap_or(0);
    let draft = tollgate_sig::Signature { alg, kid, sub, iss, ts: now, ctr, nonce, exp, ..Default::default() };
    match tollgate::sig::sign(&message, draft, &key) {
        Ok(signature) if envelope => {
            use std::io::Write;
            let _ = std::io::stdout().write_all(&tollgate_sig::envelope(&signature, &message.payload));
            ExitCode::SUCCESS
        }
        Ok(signature) => {
            println!("{}", signature.header());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("tollgate sig: {error}");
            ExitCode::from(2)
        }
    }
}

/// Builds the spec `plugin test` runs: from a configuration file, or from a path plus --set/--secret.
fn plugin_test_spec(
    plugin: &str,
    config_path: Option<&Path>,
    settings: &[String],
    secrets: &[String],
) -> Result<tollgate_plugin_host::PluginSpec, Vec<String>> {
    use tollgate_plugin_host::{PluginKind, PluginSpec};
    if let Some(path) = config_path {
        if !settings.is_empty() || !secrets.is_empty() {
            return Err(vec!["--set and --secret cannot be combined with --config".into()]);
        }
        let config = config::load(Some(path))
            .map_err(|problems| problems.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        let Some(index) = config.plugins.iter().position(|entry| entry.name == plugin) else {
            let names: Vec<&str> = config.plugins.iter().map(|entry| entry.name.as_str()).collect();
            return Err(vec![format!(
                "{} has no plugin named {plugin:?} (it has: {})",
                path.display(),
                names.join(", ")
            )]);
        };
        return config.plugins[index]
            .spec(index)
            .map_err(|problems| problems.iter().map(ToString::to_string).collect());
    }
    let path = PathBuf::from(plugin);
    let kind = match path.extension().and_then(|extension| extension.to_str()) {
        Some("wasm") => PluginKind::Wasm,
        Some("lua" | "luau") => PluginKind::Lua,
        _ => return Err(vec![format!("{plugin}: expected a .wasm or .lua file (or --config with a plugin name)")]),
    };
    let name = path.file_stem().and_then(|stem| stem.to_str()).unwrap_or("plugin").to_owned();
    let mut spec = PluginSpec::new(name, kind, path);
    let mut problems = Vec::new();
    for setting in settings {
        let Some((key, value)) = setting.split_once('=') else {
            problems.push(format!("--set {setting}: expected key=value"));
            continue;
        };
        // Dotted keys become nested tables, as in the configuration file.
        let parts: Vec<&str> = key.split('.').collect();
        insert_dotted(&mut spec.config, &parts, value);
    }
    for secret in secrets {
        match secret.split_once('=') {
            Some((id, spelling)) => match tollgate_plugin_host::spec::resolve_secret(spelling) {
                Ok(bytes) => {
                    spec.secrets.insert(id.to_owned(), bytes);
                }
                Err(message) => problems.push(format!("--secret {id}: {message}")),
            },
            None => problems.push(format!("--secret {secret}: expected id=secret")),
        }
    }
    if problems.is_empty() { Ok(spec) } else { Err(problems) }
}

/// `a.b.c = v` into nested tables; a scalar in the way is replaced by a table, as a later TOML key would.
fn insert_dotted(table: &mut serde_json::Map<String, serde_json::Value>, parts: &[&str], value: &str) {
    match parts {
        [] => {}
        [last] => {
            table.insert((*last).to_owned(), serde_json::Value::String(value.to_owned()));
        }
        [first, rest @ ..] => {
            let entry =
                table.entry((*first).to_owned()).or_insert_with(|| serde_json::Value::Object(Default::default()));
            if !entry.is_object() {
                *entry = serde_json::Value::Object(Default::default());
            }
            if let serde_json::Value::Object(inner) = entry {
                insert_dotted(inner, rest, value);
            }
        }
    }
}

fn plugin_test(
    plugin: &str,
    events: &Path,
    config_path: Option<&Path>,
    settings: &[String],
    secrets: &[String],
) -> ExitCode {
    let spec = match plugin_test_spec(plugin, config_path, settings, secrets) {
        Ok(spec) => spec,
        Err(problems) => {
            for problem in problems {
                eprintln!("{problem}");
            }
            return ExitCode::FAILURE;
        }
    };
    let input = if events == Path::new("-") {
        let mut text = String::new();
        match std::io::Read::read_to_string(&mut std::io::stdin(), &mut text) {
            Ok(_) => text,
            Err(error) => {
                eprintln!("cannot read events from standard input: {error}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        match std::fs::read_to_string(events) {
            Ok(text) => text,
            Err(error) => {
                eprintln!("cannot read {}: {error}", events.display());
                return ExitCode::FAILURE;
            }
        }
    };
    tollgate::init_logging("warn", false);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let plugin = match tollgate_plugin_host::LoadedPlugin::load(spec, None).await {
            Ok(plugin) => plugin,
            Err(error) => {
                eprintln!("{error}");
                return ExitCode::FAILURE;
            }
        };
        let mut out = std::io::stdout().lock();
        match tollgate_plugin_host::events::replay(&plugin.hook(), &input, &mut out).await {
            Ok(summary) if summary.invalid == 0 && summary.failed == 0 => ExitCode::SUCCESS,
            Ok(summary) => {
                eprintln!(
                    "{} event(s): {} invalid, {} failed",
                    summary.events + summary.invalid,
                    summary.invalid,
                    summary.failed
                );
                ExitCode::FAILURE
            }
            Err(error) => {
                eprintln!("cannot write the results: {error}");
                ExitCode::FAILURE
            }
        }
    })
}

fn certs(action: CertsAction) -> ExitCode {
    match action {
        CertsAction::Init { dir, hosts, days, force } => match tollgate::certs::init(&dir, &hosts, days, force) {
            Ok((ca, server)) => {
                println!("wrote {} and {} (the CA; keep the key private)", ca.certificate.display(), ca.key.display());
                println!(
                    "wrote {} and {} (for {})",
                    server.certificate.display(),
                    server.key.display(),
                    hosts.join(", ")
                );
                println!();
                println!("# TLS listener, client certificates optional:");
                println!("[[listeners]]");
                println!("bind = \"0.0.0.0:8883\"");
                println!("protocol = \"tls\"");
                println!("cert = \"{}\"", server.certificate.display());
                println!("key = \"{}\"", server.key.display());
                println!("client_ca = \"{}\"", ca.certificate.display());
                println!();
                println!(
                    "# then: mosquitto_sub -h {} -p 8883 --cafile {} -t '#' -v",
                    hosts[0],
                    ca.certificate.display()
                );
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("certs init: {error:#}");
                ExitCode::FAILURE
            }
        },
        CertsAction::Client { dir, cn, san_uris, subject_serial, out, days, force } => {
            let name = out.unwrap_or_else(|| cn.clone());
            let subject =
                tollgate::certs::ClientSubject { common_name: cn.clone(), san_uris: san_uris.clone(), subject_serial };
            match tollgate::certs::client(&dir, &subject, &name, days, force) {
                Ok(written) => {
                    println!("wrote {} and {} (CN={cn})", written.certificate.display(), written.key.display());
                    println!();
                    println!("# listener settings that make this certificate the MQTT user name:");
                    println!("require_client_cert = true");
                    println!("use_identity_as_username = true");
                    match san_uris.first().and_then(|uri| uri.rsplit_once(':')) {
                        Some((prefix, _)) => println!("identity_from = \"san_uri:{prefix}:\"   # or \"cn\""),
                        None => println!("identity_from = \"cn\""),
                    }
                    println!();
                    println!(
                        "# then: mosquitto_pub -p 8883 --cafile {} --cert {} --key {} -t vehicle/{cn}/status -m online",
                        dir.join(tollgate::certs::CA_CERT).display(),
                        written.certificate.display(),
                        written.key.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("certs client: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn print_problems(problems: &[config::ConfigProblem]) {
    eprintln!("configuration has {} problem(s):", problems.len());
    for problem in problems {
        eprintln!("  {problem}");
    }
}

fn check_config(file: &Path) -> ExitCode {
    match config::load(Some(file)) {
        Ok(config) => {
            // The file is valid; the plugins must also load (compile, start, accept their config).
            if !config.plugins.is_empty() {
                let problems = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime.block_on(tollgate::check_plugins(&config)),
                    Err(error) => vec![config::ConfigProblem { key: "plugins".into(), message: error.to_string() }],
                };
                if !problems.is_empty() {
                    print_problems(&problems);
                    return ExitCode::FAILURE;
                }
            }
            println!("{}: ok", file.display());
            ExitCode::SUCCESS
        }
        Err(problems) => {
            print_problems(&problems);
            ExitCode::FAILURE
        }
    }
}

fn run(config_path: Option<&Path>, listen: Vec<String>, log_format: Option<LogFormat>) -> ExitCode {
    let mut config: Config = match config::load(config_path) {
        Ok(config) => config,
        Err(problems) => {
            print_problems(&problems);
            return ExitCode::FAILURE;
        }
    };
    if !listen.is_empty() {
        config.listeners = listen.into_iter().map(config::ListenerConfig::tcp).collect();
        let mut problems = Vec::new();
        config::validate_listeners(&config, &mut problems);
        if !problems.is_empty() {
            print_problems(&problems);
            return ExitCode::FAILURE;
        }
    }
    let json = match log_format {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Human) => false,
        None => config.log.format == "json",
    };
    tollgate::init_logging(&config.log.level, json);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Installed before the listeners open, so a signal that arrives as soon as clients can connect is not
        // met by the default action (immediate exit, no goodbye).
        let signals = install_signals();
        #[cfg(unix)]
        let admin = match config.runtime.admin_socket.as_deref().map(tollgate::admin::AdminSocket::bind).transpose() {
            Ok(admin) => admin,
            Err(error) => {
                error!(%error, "admin socket not opened; broker not started");
                return ExitCode::FAILURE;
            }
        };
        #[cfg(not(unix))]
        let admin = ();
        let server = match Server::start(&config).await {
            Ok(server) => server,
            Err(error) => {
                error!(error = format!("{error:#}"), "broker did not start");
                return ExitCode::FAILURE;
            }
        };
        info!(version = env!("CARGO_PKG_VERSION"), "tollgate running");
        wait_for_signals(signals, admin, &server, config_path, &config).await;
        if server.shutdown().await { ExitCode::SUCCESS } else { ExitCode::FAILURE }
    })
}

#[cfg(unix)]
type Signals = Option<(
    tokio::signal::unix::Signal,
    tokio::signal::unix::Signal,
    tokio::signal::unix::Signal,
    tokio::signal::unix::Signal,
)>;

#[cfg(unix)]
fn install_signals() -> Signals {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
        signal(SignalKind::user_defined1()),
    ) {
        (Ok(terminate), Ok(interrupt), Ok(hangup), Ok(save)) => Some((terminate, interrupt, hangup, save)),
        _ => None,
    }
}

#[cfg(unix)]
async fn wait_for_signals(
    signals: Signals,
    admin: Option<tollgate::admin::AdminSocket>,
    server: &Server,
    config_path: Option<&Path>,
    running: &Config,
) {
    let Some((mut terminate, mut interrupt, mut hangup, mut save)) = signals else {
        warn!("cannot install signal handlers; stop with SIGKILL");
        std::future::pending::<()>().await;
        return;
    };
    let next_admin_request = async |admin: &Option<tollgate::admin::AdminSocket>| match admin {
        Some(admin) => admin.accept().await,
        None => std::future::pending().await,
    };
    // Signals and admin requests are served one at a time: two reloads never overlap.
    loop {
        tokio::select! {
            _ = terminate.recv() => return,
            _ = interrupt.recv() => return,
            _ = hangup.recv() => {
                let _ = reload_from_file(server, config_path, running).await;
            }
            // Mosquitto's SIGUSR1: write the state file now (before a planned power-off, a backup, an upgrade).
            _ = save.recv() => server.save_state("SIGUSR1").await,
            accepted = next_admin_request(&admin) => {
                let mut stream = match accepted {
                    Ok(stream) => stream,
                    Err(error) => {
                        warn!(%error, "admin socket: accept failed");
                        continue;
                    }
                };
                let result = match tollgate::admin::read_command(&mut stream).await {
                    Ok(tollgate::admin::Command::Reload) => {
                        info!("reload requested on the admin socket");
                        reload_from_file(server, config_path, running).await
                    }
                    Ok(tollgate::admin::Command::Status) => Ok(server.status().to_string()),
                    Err(error) => Err(error),
                };
                tollgate::admin::reply(&mut stream, &result).await;
            }
        }
    }
}

/// Re-reads the configuration file and reloads what SIGHUP reloads: listeners and limits need a restart, the
/// policy files and plugins do not. Logs the outcome and returns it for the admin socket.
#[cfg(unix)]
async fn reload_from_file(server: &Server, config_path: Option<&Path>, running: &Config) -> Result<String, String> {
    match config::load(config_path) {
        Ok(mut fresh) => {
            fresh.listeners = running.listeners.clone();
            match server.reload(&fresh).await {
                Ok(summary) => Ok(summary.to_string()),
                Err(error) => {
                    let error = format!("{error:#}");
                    error!(error, "reload incomplete: what failed keeps its previous version");
                    Err(error)
                }
            }
        }
        Err(problems) => {
            for problem in &problems {
                error!(%problem, "reload refused; keeping the previous policy");
            }
            let listed: Vec<String> = problems.iter().map(ToString::to_string).collect();
            Err(format!("reload refused, the previous policy stays: {}", listed.join("; ")))
        }
    }
}

#[cfg(not(unix))]
type Signals = ();

#[cfg(not(unix))]
fn install_signals() -> Signals {}

#[cfg(not(unix))]
async fn wait_for_signals(
    _signals: Signals,
    _admin: (),
    _server: &Server,
    _config_path: Option<&Path>,
    _running: &Config,
) {
    let _ = tokio::signal::ctrl_c().await;
}

fn passwd(
    create: bool,
    delete: bool,
    scheme: Scheme,
    file: &Path,
    username: &str,
    password: Option<String>,
) -> ExitCode {
    let mut passwords = if create {
        PasswordFile::new()
    } else {
        match std::fs::read_to_string(file) {
            Ok(text) => match PasswordFile::parse(&text) {
                Ok(passwords) => passwords,
                Err(errors) => {
                    for error in errors {
                        eprintln!("{}: {error}", file.display());
                    }
                    return ExitCode::FAILURE;
                }
            },
            Err(error) => {
                eprintln!("cannot read {}: {error} (use -c to create it)", file.display());
                return ExitCode::FAILURE;
            }
        }
    };
    if delete {
        if !passwords.remove(username) {
            eprintln!("user {username:?} is not in {}", file.display());
            return ExitCode::FAILURE;
        }
    } else {
        let password = match password {
            Some(password) => password,
            None => {
                if std::io::stdin().is_terminal() {
                    eprint!("password for {username}: ");
                }
                let mut line = String::new();
                if std::io::stdin().lock().read_line(&mut line).is_err() {
                    eprintln!("cannot read the password from standard input");
                    return ExitCode::FAILURE;
                }
                line.trim_end_matches(['\r', '\n']).to_owned()
            }
        };
        let scheme = match scheme {
            Scheme::Argon2id => HashScheme::Argon2id,
            Scheme::Pbkdf2 => HashScheme::Pbkdf2Sha512 { iterations: MOSQUITTO_PBKDF2_ITERATIONS },
            Scheme::Sha512 => HashScheme::Sha512,
        };
        if let Err(error) = passwords.set(username, &password, scheme) {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    }
    if let Err(error) = tollgate::write_private(file, &passwords.to_file_string()) {
        eprintln!("cannot write {}: {error}", file.display());
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
