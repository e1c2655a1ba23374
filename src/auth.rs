//! Principals, roles and API keys: who may call what.
//!
//! A principal has a name and a set of roles. Callers prove who they are with an API key
//! (`tvk_<id>_<secret>`; the vault stores the id and a hash of the secret only) or, with
//! mutual TLS, a verified certificate identity bound to a principal. Lookups go through
//! [`Authenticator`], which keeps an in-memory snapshot of the clients table and refreshes it
//! when the database changes, so `clients revoke` takes effect on a running server within a
//! second.

/// What a principal may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Tokenize, TokenizeBatch, GetTokenInfo.
    Tokenize,
    /// Detokenize, DetokenizeBatch, GetTokenInfo.
    Detokenize,
    /// GetTokenInfo.
    Info,
    /// DeleteToken.
    Delete,
    /// The detokenizing forward proxy (`src/proxy`), on the routes that list the principal.
    Proxy,
    /// Every `AdminService` method (issue 16).
    Admin,
    /// `AdminService`: key versions (list, rotate, rewrap, retire, revoke) and `Check`.
    KeysAdmin,
    /// `AdminService`: client principals (list, add, revoke).
    ClientsAdmin,
    /// `AdminService`: read-only audit access (verify, export, tail).
    Auditor,
}

impl Role {
    pub const ALL: [Role; 9] = [
        Role::Tokenize,
        Role::Detokenize,
        Role::Info,
        Role::Delete,
        Role::Proxy,
        Role::Admin,
        Role::KeysAdmin,
        Role::ClientsAdmin,
        Role::Auditor,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Role::Tokenize => "tokenize",
            Role::Detokenize => "detokenize",
            Role::Info => "info",
            Role::Delete => "delete",
            Role::Proxy => "proxy",
            Role::Admin => "admin",
            Role::KeysAdmin => "keys-admin",
            Role::ClientsAdmin => "clients-admin",
            Role::Auditor => "auditor",
        }
    }
    /// The roles of `AdminService`: only an `admin` may grant them.
    pub fn is_admin(self) -> bool {
        matches!(
            self,
            Role::Admin | Role::KeysAdmin | Role::ClientsAdmin | Role::Auditor
        )
    }
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.iter().copied().find(|r| r.name() == s.trim())
    }
}
