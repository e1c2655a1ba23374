//! A tokenize request prepared before a reload (SIGHUP after `--rekey` began) and written
//! after it: the writer must catch its fingerprint up to the new layer, so the row is not
//! stored testable with the old master key and an old backup, and its reuse lookup still
//! finds a row the rekey already re-layered. Here because it needs the crate-private
//! `prepare` to hold a request across the reload deterministically.

use super::{Caller, RekeyOptions, TokenizeRequest, Vault, VaultConfig};
use crate::card::Pan;
use crate::crypto::MasterKey;
use crate::token::TokenFormat;

fn req(pan: &str) -> TokenizeRequest {
    TokenizeRequest {
        pan: Pan::parse(pan).unwrap(),
        format: TokenFormat::Opaque,
        reuse_existing: true,
        expires_at: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_prepared_before_the_reload_is_stored_under_the_new_layer() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let old = MasterKey::generate();
    let caller = Caller::new("test", "local");
    let scope = caller.reuse_scope();
    let server = Vault::create(VaultConfig::new(&data), &old).unwrap();
    let first = server
        .tokenize(&caller, req("4111111111111111"))
        .await
        .unwrap();
    // More rows than one re-seal batch, so the rekey stays in progress after one.
    for n in 0..15u64 {
        let head = format!("40000000000{:04}", n);
        let pan = format!(
            "{head}{}",
            crate::card::luhn_check_digit(head.as_bytes()) as char
        );
        let mut r = req(&pan);
        r.reuse_existing = false;
        server.tokenize(&caller, r).await.unwrap();
    }
    // Taken before the switch: fingerprints without the rekey's layer.
    let again = server.prepare(req("4111111111111111"), &scope);
    let fresh = server.prepare(req("5555555555554444"), &scope);
    let stale_fp = fresh.fingerprint.unwrap();

    let admin = Vault::open(VaultConfig::new(&data), &old).unwrap();
    let new = MasterKey::generate();
    let step = RekeyOptions {
        batch: 10,
        max_batches: Some(1),
    };
    admin.rekey(&caller, &new, &step, |_| {}).await.unwrap();
    server.reload_master_key(&new).await.unwrap();

    let out = server
        .inner
        .store
        .tokenize(vec![again, fresh], caller.clone())
        .await
        .unwrap();
    let again = out[0].as_ref().unwrap();
    assert!(!again.created, "the lookup missed the re-layered row");
    assert_eq!(again.token, first.token.to_string());
    let fresh = out[1].as_ref().unwrap();
    assert!(fresh.created);
    let conn = rusqlite::Connection::open(crate::store::sqlite::db_path(&data)).unwrap();
    let stored: Vec<u8> = conn
        .query_row(
            "SELECT fingerprint FROM tokens WHERE token = ?1",
            [&fresh.token],
            |r| r.get(0),
        )
        .unwrap();
    let (want, prev) = server
        .inner
        .keyring
        .fingerprints()
        .reuse(&scope, b"5555555555554444");
    assert_eq!(
        prev,
        Some(stale_fp),
        "the test's request predates the layer"
    );
    assert_ne!(stored, stale_fp.to_vec(), "stored without the new layer");
    assert_eq!(stored, want.to_vec());

    // Finished: the row is not layered twice, reuse still finds it.
    let done = RekeyOptions {
        batch: 10,
        max_batches: None,
    };
    assert!(
        admin
            .rekey(&caller, &new, &done, |_| {})
            .await
            .unwrap()
            .finished
    );
    let t = server
        .tokenize(&caller, req("5555555555554444"))
        .await
        .unwrap();
    assert!(!t.created);
    assert_eq!(t.token.to_string(), fresh.token);
    admin.close().await;
    server.close().await;
}
