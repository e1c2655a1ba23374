//! `tokenvault clients add|list|revoke`: principals and their API keys.

use clap::Subcommand;

use super::common::{format_time, print_table, CliError, VaultArgs};
use super::remote::RemoteArgs;
use crate::auth::Role;
use crate::grpc::pb;
use crate::ratelimit::Rate;
use crate::vault::{Caller, ClientInfo, ClientLimits};

#[derive(Subcommand, Debug)]
pub enum ClientsCommand {
    /// Create a principal and print its API key (shown only this once).
    Add {
        #[command(flatten)]
        vault: VaultArgs,
        #[command(flatten)]
        remote: RemoteArgs,
        /// Principal name.
        name: String,
        /// Comma-separated roles: tokenize, detokenize, info, delete; for AdminService:
        /// admin, keys-admin, clients-admin, auditor.
        #[arg(long, value_delimiter = ',', required = true, value_parser = parse_role)]
        roles: Vec<Role>,
        /// Certificate identity (URI or DNS SAN) bound to this principal for mutual TLS.
        #[arg(long, value_name = "ID")]
        cert_identity: Option<String>,
        /// This client's own detokenize limit, e.g. 100/s or 6000/m (default: the server's
        /// --detokenize-rate). Items of a batch count one by one.
        #[arg(long, value_name = "RATE", value_parser = Rate::parse)]
        detokenize_rate: Option<Rate>,
        /// This client's own budget of `reuse_existing` lookups, e.g. 500/s (default: the
        /// server's --reuse-rate, 100/s). Every item counts, hits and misses alike.
        #[arg(long, value_name = "RATE", value_parser = Rate::parse)]
        reuse_rate: Option<Rate>,
        /// Share `reuse_existing` tokens with the other clients of this named group (default:
        /// only tokens this client created). Every member can then learn whether a card it
        /// holds was tokenized by any other member: put only clients in one group that may
        /// know each other's cards.
        #[arg(long, value_name = "NAME")]
        reuse_group: Option<String>,
    },
    /// List principals.
    List {
        #[command(flatten)]
        vault: VaultArgs,
        #[command(flatten)]
        remote: RemoteArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a principal; a running server refuses its key within about a second.
    Revoke {
        #[command(flatten)]
        vault: VaultArgs,
        #[command(flatten)]
        remote: RemoteArgs,
        /// Principal name.
        name: String,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| {
        let names: Vec<&str> = Role::ALL.iter().map(|r| r.name()).collect();
        format!("unknown role; expected one of {}", names.join(", "))
    })
}

fn role_names(roles: &[Role]) -> String {
    roles.iter().map(|r| r.name()).collect::<Vec<_>>().join(",")
}

pub async fn run(cmd: ClientsCommand) -> Result<(), CliError> {
    match cmd {
        ClientsCommand::Add {
            vault,
            remote,
            name,
            mut roles,
            cert_identity,
            detokenize_rate,
            reuse_rate,
            reuse_group,
        } => {
            roles.sort();
            roles.dedup();
            let limits = ClientLimits {
                detokenize_rate: detokenize_rate.map(|r| r.per_second),
                reuse_rate: reuse_rate.map(|r| r.per_second),
                reuse_group,
            };
            let key = match remote.client().await? {
                Some(mut admin) => {
                    let req = pb::AddClientRequest {
                        name: name.clone(),
                        roles: roles.iter().map(|r| r.name().to_owned()).collect(),
                        cert_identity: cert_identity.clone().unwrap_or_default(),
                        detokenize_rate: limits.detokenize_rate.unwrap_or(0.0),
                        reuse_rate: limits.reuse_rate.unwrap_or(0.0),
                        reuse_group: limits.reuse_group.clone().unwrap_or_default(),
                    };
                    let r = admin.add_client(req).await?.into_inner();
                    if !r.pending_request_id.is_empty() {
                        super::admin::print_pending(&r.pending_request_id, false);
                        return Ok(());
                    }
                    r.api_key
                }
                None => {
                    let vault = vault.open()?;
                    let key = vault
                        .add_client_with(
                            &Caller::cli(),
                            &name,
                            &roles,
                            cert_identity.as_deref(),
                            limits,
                        )
                        .await;
                    vault.close().await;
                    key?
                }
            };
            // The key alone on stdout, so scripts can capture it; the advice on stderr.
            println!("{key}");
            eprintln!(
                "API key for {name} ({}): store it now, it cannot be shown again",
                role_names(&roles)
            );
            Ok(())
        }
        ClientsCommand::List {
            vault,
            remote,
            json,
        } => {
            let clients = match remote.client().await? {
                Some(mut admin) => admin
                    .list_clients(pb::ListClientsRequest {})
                    .await?
                    .into_inner()
                    .clients
                    .into_iter()
                    .map(ClientInfo::try_from)
                    .collect::<Result<Vec<_>, _>>()?,
                None => {
                    let vault = vault.open()?;
                    let clients = vault.list_clients().await;
                    vault.close().await;
                    clients?
                }
            };
            render_clients(&clients, json);
            Ok(())
        }
        ClientsCommand::Revoke {
            vault,
            remote,
            name,
        } => {
            let revoked = match remote.client().await? {
                Some(mut admin) => {
                    admin
                        .revoke_client(pb::RevokeClientRequest { name: name.clone() })
                        .await?
                        .into_inner()
                        .revoked
                }
                None => {
                    let vault = vault.open()?;
                    let revoked = vault.revoke_client(&Caller::cli(), &name).await;
                    vault.close().await;
                    revoked?
                }
            };
            if revoked {
                println!("revoked {name}");
                Ok(())
            } else {
                Err(CliError::Other(format!("no live client named {name}")))
            }
        }
    }
}

/// `clients list` output, the same in local and remote mode.
pub fn render_clients(clients: &[ClientInfo], json: bool) {
    if json {
        let out: Vec<serde_json::Value> = clients
            .iter()
            .map(|c| {
                serde_json::json!({
                    "name": c.name,
                    "roles": c.roles.iter().map(|r| r.name()).collect::<Vec<_>>(),
                    "cert_identity": c.cert_identity,
                    "detokenize_rate": c.detokenize_rate,
                    "reuse_rate": c.reuse_rate,
                    "reuse_group": c.reuse_group,
                    "created_at": format_time(c.created_at),
                    "revoked_at": c.revoked_at.map(format_time),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(out));
    } else {
        let rows: Vec<Vec<String>> = clients
            .iter()
            .map(|c| {
                vec![
                    c.name.clone(),
                    role_names(&c.roles),
                    c.cert_identity.clone().unwrap_or_else(|| "-".into()),
                    c.detokenize_rate
                        .map_or_else(|| "-".into(), |r| Rate { per_second: r }.to_string()),
                    c.reuse_rate
                        .map_or_else(|| "-".into(), |r| Rate { per_second: r }.to_string()),
                    c.reuse_group.clone().unwrap_or_else(|| "-".into()),
                    format_time(c.created_at),
                    c.revoked_at.map_or_else(|| "-".into(), format_time),
                ]
            })
            .collect();
        print_table(
            &[
                "NAME",
                "ROLES",
                "CERT IDENTITY",
                "DETOKENIZE RATE",
                "REUSE RATE",
                "REUSE GROUP",
                "CREATED",
                "REVOKED",
            ],
            &rows,
        );
    }
}
