//! Accepting TCP connections and handing each to its own task.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::Broker;
use crate::connection::{ConnectionContext, serve};

/// Accepts until shutdown. Failed accepts (usually descriptor exhaustion) back off exponentially instead of
/// spinning.
pub async fn serve_tcp(broker: Broker, listener: TcpListener, name: Arc<str>) {
    let shutdown = broker.shutdown_token();
    let mut backoff = Duration::from_millis(5);
    if let Ok(address) = listener.local_addr() {
        info!(listener = %name, %address, protocol = "tcp", "listening");
    }
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, remote_addr)) => {
                backoff = Duration::from_millis(5);
                let _ = stream.set_nodelay(true);
                let context = ConnectionContext {
                    listener: name.clone(),
                    remote_addr: Some(remote_addr),
                    peer: None,
                };
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
