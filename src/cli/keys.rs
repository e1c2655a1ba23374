//! `tokenvault keys list|rotate`: data-key versions.

use clap::Subcommand;

use super::common::{format_time, print_table, CliError, VaultArgs};
use crate::vault::{Caller, KeyState};

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// List data-key versions with their state and usage.
    List {
        #[command(flatten)]
        vault: VaultArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Start a new data-key version; older versions stay usable for decryption.
    Rotate {
        #[command(flatten)]
        vault: VaultArgs,
    },
}

pub fn state_name(state: KeyState) -> &'static str {
    match state {
        KeyState::Active => "active",
        KeyState::DecryptOnly => "decrypt-only",
        KeyState::Retired => "retired",
    }
}

pub async fn run(cmd: KeysCommand) -> Result<(), CliError> {
    match cmd {
        KeysCommand::List { vault, json } => {
            let vault = vault.open()?;
            let keys = vault.list_keys().await;
            vault.close().await;
            let keys = keys?;
            if json {
                let out: Vec<serde_json::Value> = keys
                    .iter()
                    .map(|k| {
                        serde_json::json!({
                            "version": k.version,
                            "state": state_name(k.state),
                            "created_at": format_time(k.created_at),
                            "encryptions": k.encryptions,
                            "max_encryptions": k.max_encryptions,
                            "rows": k.rows,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(out));
            } else {
                let rows: Vec<Vec<String>> = keys
                    .iter()
                    .map(|k| {
                        vec![
                            k.version.to_string(),
                            state_name(k.state).to_owned(),
                            format_time(k.created_at),
                            format!("{} / {}", k.encryptions, k.max_encryptions),
                            k.rows.to_string(),
                        ]
                    })
                    .collect();
                print_table(
                    &["VERSION", "STATE", "CREATED", "ENCRYPTIONS / LIMIT", "ROWS"],
                    &rows,
                );
            }
            Ok(())
        }
        KeysCommand::Rotate { vault } => {
            let vault = vault.open()?;
            let rotated = vault.rotate_key(&Caller::cli()).await;
            vault.close().await;
            println!("active data key is now version {}", rotated?);
            Ok(())
        }
    }
}
