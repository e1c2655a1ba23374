//! The contract of [`Storage::reveal`] as the vault relies on it, on the SQLite store (the
//! one-trip path; PostgreSQL's two trips are covered through the vault in
//! `tests/conformance.rs`): records only once the decision accepts, nothing written when it
//! hands the rows back, and a decision that panics fails its own group while the writer
//! goes on serving.

use super::{Caller, TokenizeRequest, Vault, VaultConfig};
use crate::audit::AuditEntry;
use crate::card::Pan;
use crate::crypto::MasterKey;
use crate::error::Error;
use crate::token::TokenFormat;

const PAN: &str = "4111111111111111";

async fn vault_with_one_token() -> (tempfile::TempDir, Vault, String) {
    let dir = tempfile::tempdir().unwrap();
    let vault = Vault::create(
        VaultConfig::new(dir.path().join("data")),
        &MasterKey::generate(),
    )
    .unwrap();
    let token = vault
        .tokenize(
            &Caller::new("test", "local"),
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
    (dir, vault, token.as_str().to_owned())
}

async fn head(vault: &Vault) -> u64 {
    vault.inner.store.audit_head().await.unwrap().unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_commit_only_when_the_decision_accepts() {
    let (_dir, vault, token) = vault_with_one_token().await;
    let store = &vault.inner.store;
    let before = head(&vault).await;

    // Handed back: the rows come back as looked up, and nothing is written.
    let rows = store
        .reveal(
            vec![token.clone(), "tok_absent".into()],
            vault.now(),
            Box::new(Err),
        )
        .await
        .unwrap()
        .expect("the rows handed back");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].as_ref().map(|r| r.token.as_str()), Some(&*token));
    assert!(rows[1].is_none());
    assert_eq!(head(&vault).await, before);

    // Accepted: its records are committed by the time the reveal answers.
    let caller = Caller::new("test", "local");
    let subject = token.clone();
    let done = store
        .reveal(
            vec![token.clone()],
            vault.now(),
            Box::new(move |rows| {
                assert!(rows[0].is_some());
                Ok(vec![AuditEntry::new(
                    &caller,
                    "detokenize",
                    &subject,
                    "OK",
                    "",
                )])
            }),
        )
        .await
        .unwrap();
    assert!(done.is_none());
    assert_eq!(head(&vault).await, before + 1);
    let last = vault.audit_records(before + 1, 1).await.unwrap();
    assert_eq!(
        (last[0].action.as_str(), last[0].subject.as_str()),
        ("detokenize", &*token)
    );
    vault.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_that_panics_fails_its_group_and_the_writer_goes_on() {
    let (_dir, vault, token) = vault_with_one_token().await;
    let before = head(&vault).await;
    let r = vault
        .inner
        .store
        .reveal(
            vec![token.clone()],
            vault.now(),
            Box::new(|_| panic!("a decision that panics (expected by this test)")),
        )
        .await;
    assert!(matches!(r, Err(Error::Internal(_))), "{r:?}");
    assert_eq!(head(&vault).await, before);
    // The writer still serves: a reveal answers and is recorded.
    let revealed = vault
        .detokenize(
            &Caller::new("test", "local"),
            crate::token::Token::parse(&token).unwrap(),
            "t".into(),
        )
        .await
        .unwrap();
    assert_eq!(revealed.pan.expose_digits(), PAN);
    assert_eq!(head(&vault).await, before + 1);
    vault.close().await;
}
