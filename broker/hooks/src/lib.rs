//! The hook contract: the four points where policy meets the broker.
//!
//! | hook | trait | called on |
//! |---|---|---|
//! | authentication | [`Authenticator`] | CONNECT, and each v5 AUTH exchange |
//! | authorization | [`Authorizer`] | PUBLISH, SUBSCRIBE (per filter), the will at CONNECT, each delivery |
//! | transform | [`Transformer`] | an inbound PUBLISH after authorization; optionally each outbound copy |
//! | bridge route | [`BridgeRouter`] | a message crossing a bridge, in either direction |
//! | session | [`SessionObserver`] | a connection accepted (after CONNACK) and its end; told, not asked |
//!
//! Each hook returns a typed decision, never a `bool`, and may abstain to let the next hook in the [`HookChain`]
//! decide. The chain bounds every call with a timeout and applies the hook's [`FailurePolicy`] when a hook
//! fails or runs out of time. This crate knows nothing of WASM or Lua and does no I/O; the timer used for
//! timeouts is handed in by the runtime, so the crate does not depend on tokio.

mod cache;
pub mod chain;
mod decision;
mod types;

pub use cache::AclCache;
pub use chain::{AuthFallback, AuthOutcome, FailureObserver, FailurePolicy, HookChain, HookSlot, Sleeper};
pub use decision::*;
pub use types::*;

pub use tollgate_protocol::{ProtocolVersion, QoS, ReasonCode};

use async_trait::async_trait;

/// Why a hook could not give a decision. The chain turns this into the hook's failure policy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    #[error("hook {hook} timed out after {millis} ms")]
    Timeout { hook: String, millis: u64 },
    #[error("hook {hook} failed: {reason}")]
    Failed { hook: String, reason: String },
}

/// Decides whether a connection may proceed.
#[async_trait]
pub trait Authenticator: Send + Sync {
    fn name(&self) -> &str;

    async fn authenticate(&self, request: &ConnectRequest) -> Result<AuthDecision, HookError>;

    /// One step of an MQTT 5 enhanced-authentication exchange (an AUTH packet from the client). Hooks that do
    /// not implement enhanced authentication abstain.
    async fn continue_auth(&self, _request: &ConnectRequest, _step: &AuthStep) -> Result<AuthDecision, HookError> {
        Ok(AuthDecision::Abstain)
    }
}

/// Decides what an authenticated client may do.
#[async_trait]
pub trait Authorizer: Send + Sync {
    fn name(&self) -> &str;

    async fn authorize(&self, client: &ClientInfo, action: &Action<'_>) -> Result<AclDecision, HookError>;

    /// Whether a decision depends only on the client and the action, so the connection may cache it until the
    /// chain's generation changes (a reload). Hooks that look at payloads or time return false.
    fn cacheable(&self) -> bool {
        true
    }

    /// Whether the hook ever decides a read ([`Action::is_read`]). One that always abstains on reads returns
    /// false: the connection then skips the check on every delivered message when no hook in the chain reads.
    fn checks_reads(&self) -> bool {
        true
    }

    /// Whether [`Authorizer::authorize_batch`] costs less than one [`Authorizer::authorize`] per action (a plugin
    /// whose every call crosses a sandbox boundary). Connections gather bursts of PUBLISHes for the chain only when
    /// some hook says so.
    fn authorizes_in_batches(&self) -> bool {
        false
    }

    /// The actions of one client's burst, in arrival order: exactly one decision per action, each as
    /// [`Authorizer::authorize`] would give it. On an error the hook's failure policy applies to every action.
    async fn authorize_batch(
        &self,
        client: &ClientInfo,
        actions: &[Action<'_>],
    ) -> Result<Vec<AclDecision>, HookError> {
        authorize_one_by_one(self, client, actions).await
    }
}

/// [`Authorizer::authorize_batch`] as one [`Authorizer::authorize`] call per action: its default, and the fallback of
/// a hook that takes batches only of some actions.
pub async fn authorize_one_by_one<A: Authorizer + ?Sized>(
    hook: &A,
    client: &ClientInfo,
    actions: &[Action<'_>],
) -> Result<Vec<AclDecision>, HookError> {
    let mut decisions = Vec::with_capacity(actions.len());
    for action in actions {
        decisions.push(hook.authorize(client, action).await?);
    }
    Ok(decisions)
}

/// Rewrites or drops messages.
#[async_trait]
pub trait Transformer: Send + Sync {
    fn name(&self) -> &str;

    /// Runs once per inbound PUBLISH, after authorization and before routing.
    async fn transform_inbound(
        &self,
        client: &ClientInfo,
        message: &mut Message,
    ) -> Result<TransformDecision, HookError>;

    /// Whether [`Transformer::transform_inbound_batch`] costs less than one [`Transformer::transform_inbound`] per
    /// message (a plugin whose every call crosses a sandbox boundary). The chain batches only such hooks.
    fn transforms_in_batches(&self) -> bool {
        false
    }

    /// A burst of one client's inbound messages, in arrival order: one decision per message, or fewer when the last
    /// is a [`TransformDecision::Reject`] with `disconnect` (the later messages are then discarded unseen). A message
    /// is changed only when its decision is [`TransformDecision::Modified`]; on an error, none is.
    async fn transform_inbound_batch(
        &self,
        client: &ClientInfo,
        messages: &mut [Message],
    ) -> Result<Vec<TransformDecision>, HookError> {
        transform_one_by_one(self, client, messages).await
    }

    /// Runs once per subscriber copy when [`Transformer::transforms_outbound`] is true.
    async fn transform_outbound(
        &self,
        _subscriber: &ClientInfo,
        _message: &mut Message,
    ) -> Result<TransformDecision, HookError> {
        Ok(TransformDecision::Keep)
    }

    /// Lets the router skip the per-subscriber call entirely when no hook wants it.
    fn transforms_outbound(&self) -> bool {
        false
    }
}

/// [`Transformer::transform_inbound_batch`] as one [`Transformer::transform_inbound`] call per message, under the
/// same contract: its default, and the fallback of a hook that takes batches only in some configurations.
pub async fn transform_one_by_one<T: Transformer + ?Sized>(
    hook: &T,
    client: &ClientInfo,
    messages: &mut [Message],
) -> Result<Vec<TransformDecision>, HookError> {
    let originals = messages.to_vec();
    let mut decisions = Vec::with_capacity(messages.len());
    for index in 0..messages.len() {
        match hook.transform_inbound(client, &mut messages[index]).await {
            Ok(decision) => {
                if !matches!(decision, TransformDecision::Modified) {
                    messages[index] = originals[index].clone();
                }
                let stop = matches!(decision, TransformDecision::Reject { disconnect: true, .. });
                decisions.push(decision);
                if stop {
                    break;
                }
            }
            Err(error) => {
                messages.clone_from_slice(&originals);
                return Err(error);
            }
        }
    }
    Ok(decisions)
}

/// Told when a connection is accepted and when it ends: presence, connection limits, audit. It decides nothing; a
/// failure is the observer's own (counted and logged by whoever runs it) and changes nothing for the client.
#[async_trait]
pub trait SessionObserver: Send + Sync {
    fn name(&self) -> &str;

    /// After CONNACK accepted the client, before its first packet is handled.
    async fn connected(&self, client: &ClientInfo) -> Result<(), HookError>;

    /// Once for each [`SessionObserver::connected`], after it, when that connection ends.
    async fn disconnected(&self, client: &ClientInfo, cause: DisconnectCause) -> Result<(), HookError>;
}

/// Chooses what crosses a bridge and under which topic.
#[async_trait]
pub trait BridgeRouter: Send + Sync {
    fn name(&self) -> &str;

    async fn route(
        &self,
        direction: RouteDirection,
        bridge: &str,
        message: &Message,
    ) -> Result<RouteDecision, HookError>;
}
