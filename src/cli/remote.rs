//! `--addr` on the admin commands: with it (or `TOKENVAULT_ADDR`) a command talks to a
//! running server's `tokenvault.v1.AdminService` as an authenticated admin principal (a
//! client certificate, `--tls-cert/--tls-key`, and/or `TOKENVAULT_API_KEY`), and never opens
//! the database or reads the master key. Without it the command works locally, as the
//! break-glass path for an operator on the vault's host. Both modes compute the same domain
//! result and hand it to the same renderer, so their output is identical.

use clap::Args;

use super::client::{channel, TlsArgs};
use super::common::CliError;
use crate::grpc::client::{admin_with_auth, AdminClient, BearerAuth};

/// Where the admin service is, and who we are there. (No `Debug`: it holds the API key.)
#[derive(Args, Clone, Default)]
pub struct RemoteArgs {
    /// Administer the server at this address (`https://host:port`) over gRPC instead of
    /// opening the database; without it the command runs locally (break-glass).
    #[arg(long = "addr", env = "TOKENVAULT_ADDR", value_name = "URL")]
    pub addr: Option<String>,
    /// API key of the admin principal (with --addr). Prefer TOKENVAULT_API_KEY; servers
    /// normally require a client certificate for admin calls as well or instead.
    #[arg(
        long,
        env = "TOKENVAULT_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<String>,
    #[command(flatten)]
    pub tls: TlsArgs,
}

impl RemoteArgs {
    /// True when the command is to run against a server.
    pub fn remote(&self) -> bool {
        self.addr.as_deref().is_some_and(|a| !a.trim().is_empty())
    }

    /// A connected admin client, or None for local mode.
    pub async fn client(&self) -> Result<Option<AdminClient>, CliError> {
        let Some(addr) = self.addr.as_deref().filter(|a| !a.trim().is_empty()) else {
            return Ok(None);
        };
        let key = self.api_key.as_deref().filter(|k| !k.trim().is_empty());
        if key.is_none() && self.tls.tls_cert.is_none() {
            return Err(CliError::Usage(
                "--addr needs credentials: a client certificate (--tls-cert/--tls-key) bound \
                 to an admin principal, and/or TOKENVAULT_API_KEY"
                    .into(),
            ));
        }
        let auth = BearerAuth::new(key).map_err(|e| CliError::Usage(e.into()))?;
        Ok(Some(admin_with_auth(channel(addr, &self.tls).await?, auth)))
    }
}

impl std::fmt::Debug for RemoteArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteArgs")
            .field("addr", &self.addr)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .finish()
    }
}
