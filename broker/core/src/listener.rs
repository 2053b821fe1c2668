//! Accepting TCP connections and handing each to its own task.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::warn;

use crate::Broker;
use crate::connection::{ConnectionContext, serve};

/// Accepts until shutdown and serves each connection on the runtime this runs on. Failed accepts (usually
/// descriptor exhaustion) back off exponentially instead of spinning.
///
/// The server runs one of these per listener on every connection runtime, all accepting from the same socket, so a
/// connection is served by the thread that accepted it: no hand-off between threads on connect (see
/// `ARCHITECTURE.md`, "Runtimes").
pub async fn serve_tcp(broker: Broker, listener: TcpListener, name: Arc<str>) {
    let shutdown = broker.shutdown_token();
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, remote_addr)) => {
                backoff = Duration::from_millis(5);
                let _ = stream.set_nodelay(true);
                let context = ConnectionContext { listener: name.clone(), remote_addr: Some(remote_addr), peer: None };
                broker.spawn(serve(broker.clone(), stream, context));
            }
            Err(error) => {
                warn!(listener = %name, %error, ?backoff, "accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
