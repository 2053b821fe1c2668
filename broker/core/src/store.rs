//! The session registry behind a store interface. The in-memory store is the only one today; a durable store
//! would persist the same operations.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::message::{ClientId, SessionId};
use crate::session::SessionRef;

/// The result of opening a session for a CONNECT.
pub struct OpenedSession {
    pub session: SessionRef,
    /// True when an existing session is resumed (CONNACK Session Present).
    pub resumed: bool,
    /// A session that the clean start discarded; the caller removes its subscriptions.
    pub discarded: Option<SessionRef>,
}

pub trait SessionStore: Send + Sync {
    /// Atomically finds or creates the session of `client_id`. With `clean_start`, any existing session is
    /// replaced by the one `create` makes.
    fn open(&self, client_id: &ClientId, clean_start: bool, create: &mut dyn FnMut() -> SessionRef) -> OpenedSession;
    fn get(&self, client_id: &ClientId) -> Option<SessionRef>;
    /// Removes the session only if it is still the one identified by `session` (not replaced meanwhile).
    fn remove_if_current(&self, client_id: &ClientId, session: SessionId) -> bool;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn all(&self) -> Vec<SessionRef>;
}

#[derive(Default)]
pub struct MemorySessionStore {
    sessions: Mutex<HashMap<ClientId, SessionRef>>,
}

impl MemorySessionStore {
    fn locked(&self) -> std::sync::MutexGuard<'_, HashMap<ClientId, SessionRef>> {
        self.sessions.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl SessionStore for MemorySessionStore {
    fn open(&self, client_id: &ClientId, clean_start: bool, create: &mut dyn FnMut() -> SessionRef) -> OpenedSession {
        let mut sessions = self.locked();
        match sessions.get(client_id) {
            Some(existing) if !clean_start => {
                OpenedSession { session: existing.clone(), resumed: true, discarded: None }
            }
            _ => {
                let session = create();
                let discarded = sessions.insert(client_id.clone(), session.clone());
                OpenedSession { session, resumed: false, discarded }
            }
        }
    }

    fn get(&self, client_id: &ClientId) -> Option<SessionRef> {
        self.locked().get(client_id).cloned()
    }

    fn remove_if_current(&self, client_id: &ClientId, session: SessionId) -> bool {
        let mut sessions = self.locked();
        if sessions.get(client_id).is_some_and(|current| current.id == session) {
            sessions.remove(client_id);
            true
        } else {
            false
        }
    }

    fn len(&self) -> usize {
        self.locked().len()
    }

    fn all(&self) -> Vec<SessionRef> {
        self.locked().values().cloned().collect()
    }
}
