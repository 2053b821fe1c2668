//! The admin socket (`runtime.admin_socket`): a Unix-domain socket, readable and writable by the broker's user
//! only, where `tollgate reload` asks the running broker to reload and hears back what happened. SIGHUP does the
//! same reload but answers nobody; a script or an operator wants to know that a plugin refused to load.
//!
//! One request per connection, one line each way: the command (`reload` or `status`), then a JSON object with `ok`
//! and either `message` (for `status`, itself a JSON object as text) or `error`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// How long a client may take to send its command, and `tollgate reload` waits for the answer (a reload that
/// loads WebAssembly plugins compiles them, which takes seconds on small hardware).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(120);
const MAX_REQUEST: u64 = 256;

/// What a client can ask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Reload,
    /// What the broker is doing: clients, sessions, messages, plugins and their health, as one JSON object.
    Status,
}

impl Command {
    fn parse(line: &str) -> Result<Self, String> {
        match line.trim() {
            "reload" => Ok(Command::Reload),
            "status" => Ok(Command::Status),
            other => Err(format!("unknown command {other:?} (known: reload, status)")),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Command::Reload => "reload",
            Command::Status => "status",
        }
    }
}

/// The listening socket; the file is removed when it is dropped.
pub struct AdminSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl AdminSocket {
    /// Binds `path`, owner-only. A file left by a broker that is gone is replaced; a socket another broker
    /// still answers on is not.
    pub fn bind(path: &Path) -> Result<Self, String> {
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(format!("{}: another broker is answering on this admin socket", path.display()));
            }
            std::fs::remove_file(path).map_err(|error| format!("{}: cannot replace it: {error}", path.display()))?;
        }
        let listener = UnixListener::bind(path).map_err(|error| format!("{}: {error}", path.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            // Whoever can write to the socket can reload the broker's policy: the broker's own user only.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|error| format!("{}: cannot restrict it to its owner: {error}", path.display()))?;
        }
        Ok(Self { listener, path: path.to_owned() })
    }

    pub async fn accept(&self) -> std::io::Result<UnixStream> {
        self.listener.accept().await.map(|(stream, _)| stream)
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The broker's side: reads one command (bounded in size and time).
pub async fn read_command(stream: &mut UnixStream) -> Result<Command, String> {
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(&mut *stream, MAX_REQUEST));
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => Err("no command within 2 s".to_owned()),
        Ok(Err(error)) => Err(error.to_string()),
        // A client that connects and closes (a second broker probing whether this one is alive) sends nothing.
        Ok(Ok(0)) => Err("no command: the client closed the connection".to_owned()),
        Ok(Ok(_)) => Command::parse(&line),
    }
}

/// The broker's side: the answer, one JSON line. A client that went away is not an error worth reporting.
pub async fn reply(stream: &mut UnixStream, result: &Result<String, String>) {
    let answer = match result {
        Ok(message) => json!({ "ok": true, "message": message }),
        Err(error) => json!({ "ok": false, "error": error }),
    };
    let mut line = answer.to_string();
    line.push('\n');
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, stream.write_all(line.as_bytes())).await;
}

/// The client's side (`tollgate reload`): sends `command` and returns the broker's answer: `Ok(message)` when
/// it succeeded, `Err` with the broker's error or why it could not be asked.
pub async fn request(path: &Path, command: Command) -> Result<String, String> {
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|error| format!("cannot reach the broker at {}: {error}", path.display()))?;
    stream
        .write_all(format!("{}\n", command.as_str()).as_bytes())
        .await
        .map_err(|error| format!("cannot send the command: {error}"))?;
    let mut line = String::new();
    let mut reader = BufReader::new(stream);
    match tokio::time::timeout(REPLY_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => return Err(format!("no answer within {} s", REPLY_TIMEOUT.as_secs())),
        Ok(Err(error)) => return Err(format!("cannot read the answer: {error}")),
        Ok(Ok(_)) => {}
    }
    let answer: Value = serde_json::from_str(&line).map_err(|error| format!("unreadable answer {line:?}: {error}"))?;
    let text = |key: &str| answer.get(key).and_then(Value::as_str).unwrap_or_default().to_owned();
    if answer.get("ok").and_then(Value::as_bool) == Some(true) { Ok(text("message")) } else { Err(text("error")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_gets_its_answer_and_the_socket_is_private_and_cleaned_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("admin.sock");
        let socket = AdminSocket::bind(&path).expect("bind");
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).expect("socket").permissions().mode() & 0o777, 0o600);
        }
        assert!(AdminSocket::bind(&path).err().is_some_and(|error| error.contains("another broker")));
        // That probe connected and left without a command.
        let mut probe = socket.accept().await.expect("accept");
        assert!(read_command(&mut probe).await.is_err_and(|error| error.contains("no command")));
        let server = async {
            for answer in [Ok("reloaded".to_owned()), Err("plugin \"gate\": broken".to_owned())] {
                let mut stream = socket.accept().await.expect("accept");
                assert_eq!(read_command(&mut stream).await, Ok(Command::Reload));
                reply(&mut stream, &answer).await;
            }
        };
        let client = async {
            assert_eq!(request(&path, Command::Reload).await, Ok("reloaded".to_owned()));
            assert_eq!(request(&path, Command::Reload).await, Err("plugin \"gate\": broken".to_owned()));
        };
        tokio::join!(server, client);
        drop(socket);
        assert!(!path.exists());
        assert!(request(&path, Command::Reload).await.is_err_and(|error| error.contains("cannot reach")));
        // A file left behind by a broker that died is replaced.
        std::fs::write(&path, b"").expect("stale file");
        AdminSocket::bind(&path).expect("a stale file is replaced");
    }

    #[tokio::test]
    async fn commands_are_parsed_and_unknown_ones_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("admin.sock");
        let socket = AdminSocket::bind(&path).expect("bind");
        let mut client = UnixStream::connect(&path).await.expect("connect");
        client.write_all(b"shutdown\n").await.expect("send");
        let mut stream = socket.accept().await.expect("accept");
        assert!(read_command(&mut stream).await.is_err_and(|error| error.contains("unknown command")));
        let mut client = UnixStream::connect(&path).await.expect("connect");
        client.write_all(b"status\n").await.expect("send");
        let mut stream = socket.accept().await.expect("accept");
        assert_eq!(read_command(&mut stream).await, Ok(Command::Status));
    }
}
