//! Rows sealed before the metadata was bound (row format 1) keep opening through the vault,
//! and `keys rewrap` upgrades them to the current format, after which an edited column is
//! DATA_LOSS. Here because writing a format-1 row needs the crate-private legacy sealer.

use std::time::Duration;

use super::{Caller, RewrapOptions, TokenizeRequest, Vault, VaultConfig};
use crate::card::Pan;
use crate::crypto::{MasterKey, ROW_FORMAT, ROW_FORMAT_TOKEN_ONLY};
use crate::error::Error;
use crate::token::TokenFormat;

const PAN: &str = "5555555555554444";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_1_row_still_opens_and_rewrap_binds_its_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let vault = Vault::create(VaultConfig::new(&data), &MasterKey::generate()).unwrap();
    let caller = Caller::new("test", "local");
    let token = vault
        .tokenize(
            &caller,
            TokenizeRequest {
                pan: Pan::parse(PAN).unwrap(),
                format: TokenFormat::Opaque,
                reuse_existing: false,
                expires_at: None,
            },
        )
        .await
        .unwrap()
        .token;
    // Re-seal the row as a vault before the binding wrote it: AAD = version || token only.
    let legacy = vault
        .inner
        .keyring
        .snapshot()
        .active
        .seal_token_only(token.as_str(), PAN.as_bytes());
    let conn = rusqlite::Connection::open(data.join("vault.db")).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    let format = |conn: &rusqlite::Connection| -> u32 {
        conn.query_row(
            "SELECT row_format FROM tokens WHERE token = ?1",
            [token.as_str()],
            |r| r.get(0),
        )
        .unwrap()
    };
    conn.execute(
        "UPDATE tokens SET nonce = ?2, ciphertext = ?3, row_format = ?4 WHERE token = ?1",
        rusqlite::params![
            token.as_str(),
            &legacy.nonce[..],
            legacy.ciphertext,
            ROW_FORMAT_TOKEN_ONLY
        ],
    )
    .unwrap();

    let revealed = vault
        .detokenize(&caller, token.clone(), "legacy".into())
        .await
        .unwrap();
    assert_eq!(revealed.pan.expose_digits(), PAN);
    vault.info(&caller, token.clone()).await.unwrap();
    assert!(vault.check(true, 0).await.unwrap().ok());

    // A full rewrap re-seals it in the current format, under the same (active) version.
    let report = vault
        .rewrap(&caller, &RewrapOptions::default(), |_| {})
        .await
        .unwrap();
    assert_eq!(report.rewrapped, 1);
    assert_eq!(format(&conn), ROW_FORMAT);
    let again = vault
        .detokenize(&caller, token.clone(), "upgraded".into())
        .await
        .unwrap();
    assert_eq!(again.pan.expose_digits(), PAN);
    // Nothing left to upgrade: a second run touches no row.
    let report = vault
        .rewrap(&caller, &RewrapOptions::default(), |_| {})
        .await
        .unwrap();
    assert_eq!(report.rewrapped, 0);

    // From now on its metadata is bound.
    conn.execute(
        "UPDATE tokens SET last4 = '0000' WHERE token = ?1",
        [token.as_str()],
    )
    .unwrap();
    let r = vault
        .detokenize(&caller, token.clone(), "edited".into())
        .await;
    assert!(matches!(r, Err(Error::DataLoss(_))), "{r:?}");
    vault.close().await;
}
