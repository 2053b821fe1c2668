//! Accepting TCP connections and handing each to its own task.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tracing::{info, warn};

use crate::Broker;
use crate::connection::{ConnectionContext, serve};

/// Accepts until shutdown. Failed accepts (usually descriptor exhaustion) back off exponentially instead of
/// spinning. With `workers`, connections are dealt round-robin to those runtimes (see [`Workers`]); without,
/// they run on the accepting runtime.
pub async fn serve_tcp(broker: Broker, listener: TcpListener, name: Arc<str>, workers: Option<Workers>) {
    let mut next_worker = 0usize;
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
                let context = ConnectionContext { listener: name.clone(), remote_addr: Some(remote_addr), peer: None };
                match &workers {
                    None => {
                        broker.spawn(serve(broker.clone(), stream, context));
                    }
                    Some(workers) => {
                        let handle = &workers.handles[next_worker % workers.handles.len()];
                        next_worker = next_worker.wrapping_add(1);
                        // A tokio socket belongs to the runtime that registered it; move it across as a std one.
                        let Ok(std_stream) = stream.into_std() else { continue };
                        let connection_broker = broker.clone();
                        broker.spawn_on(handle, async move {
                            if let Ok(stream) = TcpStream::from_std(std_stream) {
                                serve(connection_broker, stream, context).await;
                            }
                        });
                    }
                }
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

/// Connection runtimes: one single-threaded runtime per core, each owning the connections dealt to it.
///
/// Why not one multi-threaded runtime: its scheduler runs the most recently woken task first (the LIFO slot), so
/// when two clients' packets arrive in the same readiness batch the later one is often applied first. MQTT does not
/// order packets across connections, but clients written against single-threaded brokers (and the Paho
/// conformance suite) expect a SUBSCRIBE that arrived first to be in place for a PUBLISH that arrived after it.
/// Current-thread runtimes run ready tasks in arrival order, and connections do not migrate between cores.
#[derive(Clone)]
pub struct Workers {
    pub handles: Arc<[Handle]>,
}
