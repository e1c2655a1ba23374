//! The metadata beside a ciphertext is bound to it (issue 11, item 8): a database reader who
//! edits `expires_at`, the format or a masked field gets DATA_LOSS (or NOT_FOUND), never a
//! reveal, and never an expired token back.

use std::time::Duration;

use tokenvault::card::Pan;
use tokenvault::crypto::MasterKey;
use tokenvault::error::Error;
use tokenvault::token::{Token, TokenFormat};
use tokenvault::vault::{now_micros, Caller, TokenizeRequest, Vault, VaultConfig};

const PAN: &str = "4111111111111111";

fn caller() -> Caller {
    Caller::new("test", "local")
}

fn req(expires_at: Option<i64>) -> TokenizeRequest {
    TokenizeRequest {
        pan: Pan::parse(PAN).unwrap(),
        format: TokenFormat::Opaque,
        reuse_existing: false,
        expires_at,
    }
}

fn db(data: &std::path::Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(data.join("vault.db")).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn
}

fn is_refused(r: &Result<impl std::fmt::Debug, Error>) -> bool {
    matches!(r, Err(Error::DataLoss(_)) | Err(Error::NotFound))
}

/// Each metadata column edited alone, with a value a reader could plausibly want.
const EDITS: [(&str, &str); 9] = [
    ("format", "format = 2"),
    ("brand", "brand = 3"),
    ("pan_length", "pan_length = 15"),
    ("bin", "bin = '555555'"),
    ("last4", "last4 = '4444'"),
    ("created_at", "created_at = created_at - 1"),
    (
        "expires_at (later)",
        "expires_at = expires_at + 86400000000",
    ),
    ("expires_at (never)", "expires_at = NULL"),
    ("row_format (downgrade)", "row_format = 1"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_metadata_column_is_data_loss_never_a_reveal() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let vault = Vault::create(VaultConfig::new(&data), &MasterKey::generate()).unwrap();
    let expires = Some(now_micros() + 3_600_000_000);
    let mut tokens: Vec<Token> = Vec::new();
    for _ in EDITS {
        tokens.push(vault.tokenize(&caller(), req(expires)).await.unwrap().token);
    }
    let conn = db(&data);
    for ((what, set), token) in EDITS.iter().zip(&tokens) {
        // Untouched, it reveals.
        let revealed = vault
            .detokenize(&caller(), token.clone(), "before".into())
            .await
            .unwrap();
        assert_eq!(revealed.pan.expose_digits(), PAN);
        let saved: (i64, i64, i64, String, String, i64, Option<i64>) = conn
            .query_row(
                "SELECT format, brand, pan_length, bin, last4, created_at, expires_at \
                 FROM tokens WHERE token = ?1",
                [token.as_str()],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                },
            )
            .unwrap();
        let n = conn
            .execute(
                &format!("UPDATE tokens SET {set} WHERE token = ?1"),
                [token.as_str()],
            )
            .unwrap();
        assert_eq!(n, 1);
        let r = vault
            .detokenize(&caller(), token.clone(), "after".into())
            .await;
        assert!(is_refused(&r), "{what}: edited row answered {r:?}");
        assert!(matches!(r, Err(Error::DataLoss(_))), "{what}: {r:?}");
        let info = vault.info(&caller(), token.clone()).await;
        assert!(
            matches!(info, Err(Error::DataLoss(_))),
            "{what}: info answered {info:?}"
        );
        let check = vault.check(true, 0).await.unwrap();
        assert_eq!(
            check.failed_tokens,
            vec![token.as_str().to_owned()],
            "{what}"
        );
        // Put back, it reveals again: the binding, not some side effect, refused it.
        conn.execute(
            "UPDATE tokens SET format = ?2, brand = ?3, pan_length = ?4, bin = ?5, last4 = ?6, \
             created_at = ?7, expires_at = ?8, row_format = 2 WHERE token = ?1",
            rusqlite::params![
                token.as_str(),
                saved.0,
                saved.1,
                saved.2,
                saved.3,
                saved.4,
                saved.5,
                saved.6
            ],
        )
        .unwrap();
        let again = vault
            .detokenize(&caller(), token.clone(), "restored".into())
            .await;
        assert_eq!(again.unwrap().pan.expose_digits(), PAN, "{what}");
    }
    vault.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_does_not_come_back_with_an_edited_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let vault = Vault::create(VaultConfig::new(&data), &MasterKey::generate()).unwrap();
    let token = vault
        .tokenize(&caller(), req(Some(now_micros() + 300_000)))
        .await
        .unwrap()
        .token;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = vault
        .detokenize(&caller(), token.clone(), "expired".into())
        .await;
    assert!(matches!(r, Err(Error::NotFound)), "{r:?}");
    let conn = db(&data);
    for set in ["expires_at = expires_at + 86400000000", "expires_at = NULL"] {
        conn.execute(
            &format!("UPDATE tokens SET {set} WHERE token = ?1"),
            [token.as_str()],
        )
        .unwrap();
        let r = vault
            .detokenize(&caller(), token.clone(), "revived?".into())
            .await;
        assert!(is_refused(&r), "{set}: expired token answered {r:?}");
        let info = vault.info(&caller(), token.clone()).await;
        assert!(is_refused(&info), "{set}: info answered {info:?}");
    }
    vault.close().await;
}
