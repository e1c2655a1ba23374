//! The audit trail: one record per affected token, no PAN in it, fail-closed reveals, and a
//! chain that pinpoints edited, removed, inserted and reordered records.

use tokenvault::audit::Verification;
use tokenvault::card::Pan;
use tokenvault::crypto::MasterKey;
use tokenvault::token::TokenFormat;
use tokenvault::vault::{Caller, TokenizeRequest, Vault, VaultConfig};

const PANS: [&str; 3] = ["4111111111111111", "5555555555554444", "378282246310005"];

fn req(pan: &str) -> TokenizeRequest {
    TokenizeRequest {
        pan: Pan::parse(pan).unwrap(),
        format: TokenFormat::PanShapedKeepBin,
        reuse_existing: false,
        expires_at: None,
    }
}

async fn vault_with_traffic(dir: &std::path::Path) -> (Vault, Vec<String>) {
    let vault = Vault::create(VaultConfig::new(dir), &MasterKey::generate()).unwrap();
    let c = Caller::new("payments", "127.0.0.1:4000");
    let mut tokens = Vec::new();
    for pan in PANS {
        let t = vault.tokenize(&c, req(pan)).await.unwrap();
        vault
            .detokenize(&c, t.token.clone(), "charge order 42".into())
            .await
            .unwrap();
        vault.info(&c, t.token.clone()).await.unwrap();
        tokens.push(t.token.into_string());
    }
    vault
        .delete(&c, tokenvault::token::Token::parse(&tokens[2]).unwrap())
        .await
        .unwrap();
    vault
        .audit_refusal(
            &Caller::new("unknown", "127.0.0.1:4001"),
            "detokenize",
            "UNAUTHENTICATED",
        )
        .await
        .unwrap();
    (vault, tokens)
}

fn conn(dir: &std::path::Path) -> rusqlite::Connection {
    rusqlite::Connection::open(dir.join("vault.db")).unwrap()
}

#[tokio::test]
async fn records_every_action_with_its_fields_and_never_a_pan() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, tokens) = vault_with_traffic(dir.path()).await;
    let records = vault.audit_records(1, 1000).await.unwrap();
    let actions: Vec<&str> = records.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "tokenize",
            "detokenize",
            "info",
            "tokenize",
            "detokenize",
            "info",
            "tokenize",
            "detokenize",
            "info",
            "delete",
            "detokenize"
        ]
    );
    let reveal = &records[1];
    assert_eq!(reveal.principal, "payments");
    assert_eq!(reveal.peer, "127.0.0.1:4000");
    assert_eq!(reveal.subject, tokens[0]);
    assert_eq!(reveal.outcome, "OK");
    assert_eq!(reveal.reason, "charge order 42");
    assert!(reveal.at > 0);
    assert_eq!(records.last().unwrap().outcome, "UNAUTHENTICATED");
    for w in records.windows(2) {
        assert_eq!(w[1].seq, w[0].seq + 1);
    }
    // Scan every byte of the audit table for the PANs and their hidden middles.
    let c = conn(dir.path());
    let mut stmt = c
        .prepare("SELECT principal || peer || action || subject || outcome || reason FROM audit")
        .unwrap();
    let all: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    let text = all.join("\n");
    for pan in PANS {
        assert!(!text.contains(pan));
        assert!(
            !text.contains(&pan[..pan.len() - 4]),
            "hidden PAN digits in the audit trail"
        );
    }
    assert_eq!(
        vault.verify_audit().await.unwrap(),
        Verification::Ok {
            records: records.len() as u64
        }
    );
}

#[tokio::test]
async fn a_reveal_whose_audit_record_cannot_be_written_returns_no_pan() {
    let dir = tempfile::tempdir().unwrap();
    let vault = Vault::create(VaultConfig::new(dir.path()), &MasterKey::generate()).unwrap();
    let c = Caller::new("payments", "test");
    let t = vault.tokenize(&c, req(PANS[0])).await.unwrap();
    conn(dir.path())
        .execute_batch("CREATE TRIGGER audit_down BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'audit down'); END;")
        .unwrap();
    let err = vault
        .detokenize(&c, t.token.clone(), String::new())
        .await
        .expect_err("a PAN left without its audit record");
    assert!(!err.to_string().contains(PANS[0]));
    conn(dir.path())
        .execute_batch("DROP TRIGGER audit_down")
        .unwrap();
    assert_eq!(
        vault
            .detokenize(&c, t.token, String::new())
            .await
            .unwrap()
            .pan
            .expose_digits(),
        PANS[0]
    );
}

async fn broken_at(dir: &std::path::Path, vault: &Vault, sql: &str) -> u64 {
    conn(dir).execute_batch(sql).unwrap();
    match vault.verify_audit().await.unwrap() {
        Verification::Broken { seq, .. } => seq,
        ok => panic!("tampering went unnoticed: {ok:?}"),
    }
}

#[tokio::test]
async fn verify_pinpoints_an_edited_record() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, _) = vault_with_traffic(dir.path()).await;
    assert_eq!(
        broken_at(
            dir.path(),
            &vault,
            "UPDATE audit SET reason = 'nothing to see' WHERE seq = 5"
        )
        .await,
        5
    );
}

#[tokio::test]
async fn verify_pinpoints_a_deleted_record_and_a_truncated_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, _) = vault_with_traffic(dir.path()).await;
    assert_eq!(
        broken_at(dir.path(), &vault, "DELETE FROM audit WHERE seq = 4").await,
        4
    );
    let dir = tempfile::tempdir().unwrap();
    let (vault, _) = vault_with_traffic(dir.path()).await;
    assert_eq!(
        broken_at(dir.path(), &vault, "DELETE FROM audit WHERE seq >= 10").await,
        10
    );
}

#[tokio::test]
async fn verify_pinpoints_reordered_and_inserted_records() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, _) = vault_with_traffic(dir.path()).await;
    // Swap the contents of records 3 and 6 (MACs travel with them).
    let sql = "UPDATE audit SET seq = -3 WHERE seq = 3; UPDATE audit SET seq = 3 WHERE seq = 6; \
               UPDATE audit SET seq = 6 WHERE seq = -3;";
    assert_eq!(broken_at(dir.path(), &vault, sql).await, 3);
    let dir = tempfile::tempdir().unwrap();
    let (vault, _) = vault_with_traffic(dir.path()).await;
    // Shift records up and insert a forged one with a made-up MAC.
    let sql = "UPDATE audit SET seq = seq + 1000 WHERE seq >= 7; UPDATE audit SET seq = seq - 999 WHERE seq >= 1007; \
               INSERT INTO audit(seq, at, principal, peer, action, subject, outcome, reason, mac) \
               VALUES (7, 1, 'x', 'x', 'detokenize', 'x', 'OK', '', zeroblob(32));";
    assert_eq!(broken_at(dir.path(), &vault, sql).await, 7);
}
