//! The domain types that both the vault and the store speak: time, who is asking, key
//! states and policy, clients. They sit below both (the store persists them, the vault
//! decides with them), so neither layer names the other's module for them; `vault`
//! re-exports them for everything above.

use std::time::Duration;

use crate::auth::Role;

/// Microseconds since the Unix epoch, UTC. The one time representation of the domain.
pub type Micros = i64;

/// The system clock (negative before 1970). The vault's own decisions use its `vault::Clock`.
pub fn now_micros() -> Micros {
    let now = std::time::SystemTime::now();
    match now.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_micros())
            .map(|m| -m)
            .unwrap_or(i64::MIN),
    }
}

/// How long a data-key version may be used before the vault rotates it.
#[derive(Clone, Debug)]
pub struct KeyPolicy {
    /// Encryptions per version; well under the 2^32 bound of NIST SP 800-38D for random nonces.
    pub max_encryptions: u64,
    pub max_age: Option<Duration>,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        KeyPolicy {
            max_encryptions: 1 << 30,
            max_age: Some(Duration::from_secs(90 * 86400)),
        }
    }
}

/// Who is asking, for authorisation and the audit trail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub principal: String,
    /// Peer address, or "cli" / "local" for admin commands.
    pub peer: String,
    /// The client's named reuse group, if an admin gave it one (see [`Caller::reuse_scope`]).
    pub reuse_group: Option<String>,
}

impl Caller {
    pub fn new(principal: impl Into<String>, peer: impl Into<String>) -> Caller {
        Caller {
            principal: principal.into(),
            peer: peer.into(),
            reuse_group: None,
        }
    }
    pub fn with_reuse_group(mut self, group: Option<String>) -> Caller {
        self.reuse_group = group;
        self
    }
    /// Whose `reuse_existing` tokens this caller may find: its own, or its reuse group's.
    /// Principal names and group names live in different namespaces.
    pub fn reuse_scope(&self) -> String {
        match &self.reuse_group {
            Some(group) => format!("group:{group}"),
            None => format!("principal:{}", self.principal),
        }
    }
    /// An admin command run from the CLI by the local OS user.
    pub fn cli() -> Caller {
        // Attribute admin actions to the OS account that ran them, even without $USER
        // (cron, containers): fall back to the numeric uid.
        let user = std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            // SAFETY: getuid has no preconditions and cannot fail.
            .unwrap_or_else(|_| format!("uid-{}", unsafe { libc::getuid() }));
        Caller {
            principal: format!("cli:{user}"),
            peer: "local".into(),
            reuse_group: None,
        }
    }
}

/// State of a data-key version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    Active,
    DecryptOnly,
    Retired,
}

#[derive(Clone, Debug)]
pub struct KeyVersionInfo {
    pub version: u32,
    pub state: KeyState,
    pub created_at: Micros,
    pub encryptions: u64,
    pub max_encryptions: u64,
    pub rows: u64,
}

#[derive(Clone, Debug)]
pub struct ClientInfo {
    pub name: String,
    pub roles: Vec<Role>,
    pub cert_identity: Option<String>,
    /// Own detokenize limit in reveals per second; None = the server-wide default.
    pub detokenize_rate: Option<f64>,
    /// Own `reuse_existing` budget in lookups per second; None = the server-wide default.
    pub reuse_rate: Option<f64>,
    /// Named reuse group: clients of one group find each other's `reuse_existing` tokens.
    pub reuse_group: Option<String>,
    pub created_at: Micros,
    pub revoked_at: Option<Micros>,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::DecryptOnly => "decrypt_only",
            KeyState::Retired => "retired",
        }
    }
    pub fn parse(s: &str) -> Option<KeyState> {
        match s {
            "active" => Some(KeyState::Active),
            "decrypt_only" => Some(KeyState::DecryptOnly),
            "retired" => Some(KeyState::Retired),
            _ => None,
        }
    }
}
