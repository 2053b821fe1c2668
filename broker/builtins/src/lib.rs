//! Native implementations of the hook contract that ship inside the broker: the anonymous-access switch, a
//! Mosquitto-compatible `password_file` and a Mosquitto-compatible `acl_file`. File contents arrive as text; the
//! server crate does the reading.

pub mod acl_file;
pub mod password_file;

use async_trait::async_trait;
use tollgate_hooks::ReasonCode;
use tollgate_hooks::{
    AclDecision, Action, AuthDecision, Authenticator, Authorizer, ClientInfo, ConnectRequest, HookError,
};

/// The lines of a Mosquitto-style file that carry content, numbered from 1: blank lines and `#` comments are
/// skipped, surrounding whitespace trimmed. Editors on Windows may prepend a BOM; left in, it would silently become
/// part of the first word, so it is dropped.
pub(crate) fn content_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    text.lines()
        .enumerate()
        .map(|(index, raw)| (index + 1, raw.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
}

use acl_file::{Access, AclFile, AclVerdict};
use password_file::{PasswordCheck, PasswordFile};

/// Decides connections without a user name: allowed or refused by one switch. Clients with a user name are left
/// to the next authenticator.
pub struct AnonymousAccess {
    pub allow: bool,
}

#[async_trait]
impl Authenticator for AnonymousAccess {
    fn name(&self) -> &str {
        "anonymous"
    }

    async fn authenticate(&self, request: &ConnectRequest) -> Result<AuthDecision, HookError> {
        Ok(match (&request.username, self.allow) {
            (Some(_), _) => AuthDecision::Abstain,
            (None, true) => AuthDecision::allow(),
            (None, false) => AuthDecision::deny(ReasonCode::NOT_AUTHORIZED),
        })
    }
}

/// Allows clients whose user name is the identity of their verified client certificate
/// (`use_identity_as_username`, as Mosquitto does: the certificate is the credential). Others are left to the
/// next authenticator.
pub struct CertificateIdentityAuth;

#[async_trait]
impl Authenticator for CertificateIdentityAuth {
    fn name(&self) -> &str {
        "certificate_identity"
    }

    async fn authenticate(&self, request: &ConnectRequest) -> Result<AuthDecision, HookError> {
        Ok(if request.username_from_certificate && request.peer.is_some() {
            AuthDecision::allow()
        } else {
            AuthDecision::Abstain
        })
    }
}

/// Checks user name and password against a Mosquitto password file.
pub struct PasswordFileAuth {
    file: PasswordFile,
}

impl PasswordFileAuth {
    pub fn new(file: PasswordFile) -> Self {
        Self { file }
    }
}

#[async_trait]
impl Authenticator for PasswordFileAuth {
    fn name(&self) -> &str {
        "password_file"
    }

    async fn authenticate(&self, request: &ConnectRequest) -> Result<AuthDecision, HookError> {
        let Some(username) = &request.username else {
            return Ok(AuthDecision::Abstain);
        };
        let password = request.password.as_deref().unwrap_or_default();
        Ok(match self.file.verify(username, password) {
            PasswordCheck::Match => AuthDecision::allow(),
            PasswordCheck::Mismatch | PasswordCheck::UnknownUser => {
                AuthDecision::deny(ReasonCode::BAD_USER_NAME_OR_PASSWORD)
            }
        })
    }
}

/// Authorizes with a Mosquitto ACL file. The file is authoritative: what it does not allow is denied.
pub struct AclFileAuthorizer {
    file: AclFile,
}

impl AclFileAuthorizer {
    pub fn new(file: AclFile) -> Self {
        Self { file }
    }
}

#[async_trait]
impl Authorizer for AclFileAuthorizer {
    fn name(&self) -> &str {
        "acl_file"
    }

    async fn authorize(&self, client: &ClientInfo, action: &Action<'_>) -> Result<AclDecision, HookError> {
        let (topic, access) = match *action {
            Action::Publish { topic, .. } | Action::Will { topic, .. } => (topic, Access::Write),
            // The group prefix is already stripped: rules are written against the inner filter.
            Action::Subscribe { filter, .. } => (filter, Access::Subscribe),
            Action::ReceiveRetained { topic } | Action::Receive { topic } => (topic, Access::Read),
            // The file has no notion of revoking a client; its rules apply to each action.
            Action::Session => return Ok(AclDecision::Abstain),
        };
        let verdict = self.file.check(&client.client_id, client.username.as_deref(), topic, access);
        // A refused subscription is answered 0x80 rather than 0x87: both are legal in a v5 SUBACK, 0x80 is the
        // only failure code 3.1.1 knows, and the Eclipse Paho conformance client accepts only 0x80 there.
        // Refused publishes keep 0x87, which is what tells a v5 publisher it lacks permission.
        let denial = match access {
            Access::Subscribe => ReasonCode::UNSPECIFIED_ERROR,
            Access::Read | Access::Write => ReasonCode::NOT_AUTHORIZED,
        };
        Ok(match verdict {
            AclVerdict::Allow => AclDecision::Allow,
            AclVerdict::Deny => AclDecision::Deny(denial),
        })
    }
}
