//! `tokenvault admin requests|approve ID`: dual control of a running server (`[admin]
//! dual_control = true`). A dangerous operation asked for over `--addr` (`keys revoke`,
//! `clients add` of a client with `detokenize`) waits as a request until a second,
//! different admin approves it within the window; both are in the audit trail. Requests live
//! in the server's database, so these commands always need `--addr`.

use clap::Subcommand;

use super::common::{format_time, print_table, CliError};
use super::remote::RemoteArgs;
use crate::grpc::client::AdminClient;
use crate::grpc::convert::timestamp_to_micros;
use crate::grpc::pb;

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// List dual-control requests, newest first.
    Requests {
        #[command(flatten)]
        remote: RemoteArgs,
        #[arg(long)]
        json: bool,
    },
    /// Approve another admin's request and run it (approving your own is refused).
    Approve {
        #[command(flatten)]
        remote: RemoteArgs,
        /// The request id (`req_...`).
        id: String,
        #[arg(long)]
        json: bool,
    },
}

/// What `keys revoke` and `clients add` print when their operation awaits approval.
pub fn print_pending(id: &str, json: bool) {
    if json {
        println!("{}", serde_json::json!({"pending_request_id": id}));
    } else {
        println!("{id}");
    }
    eprintln!(
        "dual control: request {id} awaits approval by a second admin \
         (`tokenvault admin approve {id}`)"
    );
}

async fn client(remote: &RemoteArgs) -> Result<AdminClient, CliError> {
    remote.client().await?.ok_or_else(|| {
        CliError::Usage(
            "dual-control requests live on the server: pass --addr (or TOKENVAULT_ADDR)".into(),
        )
    })
}

fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| timestamp_to_micros(t, "time").ok())
        .map_or_else(|| "-".into(), format_time)
}

pub async fn run(cmd: AdminCommand) -> Result<(), CliError> {
    match cmd {
        AdminCommand::Requests { remote, json } => {
            let rows = client(&remote)
                .await?
                .list_admin_requests(pb::ListAdminRequestsRequest {})
                .await?
                .into_inner()
                .requests;
            if json {
                let out: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "id": r.id,
                            "operation": r.operation,
                            "params": serde_json::from_str::<serde_json::Value>(&r.params)
                                .unwrap_or(serde_json::Value::Null),
                            "requester": r.requester,
                            "created_at": time(r.created_at.as_ref()),
                            "expires_at": time(r.expires_at.as_ref()),
                            "approver": (!r.approver.is_empty()).then_some(&r.approver),
                            "approved_at": r.approved_at.as_ref().map(|t| time(Some(t))),
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(out));
            } else {
                let rows: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.id.clone(),
                            r.operation.clone(),
                            r.params.clone(),
                            r.requester.clone(),
                            time(r.created_at.as_ref()),
                            time(r.expires_at.as_ref()),
                            if r.approver.is_empty() {
                                "-".into()
                            } else {
                                r.approver.clone()
                            },
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "ID",
                        "OPERATION",
                        "PARAMETERS",
                        "REQUESTER",
                        "CREATED",
                        "EXPIRES",
                        "APPROVER",
                    ],
                    &rows,
                );
            }
            Ok(())
        }
        AdminCommand::Approve { remote, id, json } => {
            let r = client(&remote)
                .await?
                .approve_admin_request(pb::ApproveAdminRequestRequest { id: id.clone() })
                .await?
                .into_inner();
            let requester = r.request.as_ref().map_or("", |q| q.requester.as_str());
            match r.outcome {
                Some(pb::approve_admin_request_response::Outcome::AddClient(c)) => {
                    // As `clients add`: the key alone on stdout.
                    println!("{}", c.api_key);
                    eprintln!(
                        "approved {id} of {requester}: API key of the new client; store it \
                         now, it cannot be shown again"
                    );
                }
                Some(pb::approve_admin_request_response::Outcome::RevokeKey(k)) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({
                                "id": id,
                                "requester": requester,
                                "version": k.version,
                                "rotated_to": (k.rotated_to != 0).then_some(k.rotated_to),
                                "rewrapped": k.rewrapped,
                                "already_retired": k.already_retired,
                            })
                        );
                    } else {
                        println!(
                            "approved {id} of {requester}: re-encrypted {} rows; key version {} \
                             is retired",
                            k.rewrapped, k.version
                        );
                    }
                }
                None => return Err(CliError::Other("the server sent no outcome".into())),
            }
            Ok(())
        }
    }
}
