//! `keys rotate-master --rekey` on the SQLite store: what the old master key and an earlier
//! backup can still open afterwards (nothing created after the rekey), a rekey stopped
//! half-way and resumed, and a second process (a server) serving through it.

mod common;

use std::collections::HashSet;
use std::path::Path;

use common::test_pan;
use rusqlite::{Connection, OptionalExtension};
use tokenvault::audit::{canonical_bytes, AuditRecord, GENESIS_MAC};
use tokenvault::card::Pan;
use tokenvault::crypto::{AuditKey, DataKey, FingerprintKey, KeyPurpose, MasterKey, VaultId};
use tokenvault::error::Error;
use tokenvault::token::TokenFormat;
use tokenvault::vault::{Caller, KeyState, RekeyOptions, TokenizeRequest, Vault, VaultConfig};

fn caller() -> Caller {
    Caller::new("test", "local")
}

fn req(pan: &str, reuse: bool) -> TokenizeRequest {
    TokenizeRequest {
        pan: Pan::parse(pan).unwrap(),
        format: TokenFormat::Opaque,
        reuse_existing: reuse,
        expires_at: None,
    }
}

fn db(dir: &Path) -> Connection {
    Connection::open(tokenvault::store::sqlite::db_path(dir)).unwrap()
}

fn meta(conn: &Connection, key: &str) -> Option<Vec<u8>> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
        .unwrap()
}

/// What someone holding the OLD master key and an OLD backup file gets: every key the
/// backup holds, unwrapped.
struct OldKeyHolder {
    data_keys: Vec<DataKey>,
    fingerprint: FingerprintKey,
    audit: AuditKey,
    kwk: tokenvault::crypto::KeyWrappingKey,
}

impl OldKeyHolder {
    fn open(backup: &Path, old: &MasterKey) -> OldKeyHolder {
        let conn = Connection::open(backup).unwrap();
        let id = VaultId::from_slice(&meta(&conn, "vault_id").unwrap()).unwrap();
        let (kwk, _) = old.derive(&id);
        let mut data_keys = Vec::new();
        let rows: Vec<(u32, Vec<u8>)> = conn
            .prepare("SELECT version, wrapped FROM data_keys WHERE length(wrapped) > 0")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for (v, w) in rows {
            data_keys.push(DataKey::new(
                v,
                kwk.unwrap(&w, KeyPurpose::Data(v)).unwrap(),
            ));
        }
        assert!(!data_keys.is_empty());
        let fingerprint = FingerprintKey::new(
            kwk.unwrap(
                &meta(&conn, "wrapped_fingerprint_key").unwrap(),
                KeyPurpose::Fingerprint,
            )
            .unwrap(),
        );
        let audit = AuditKey::new(
            kwk.unwrap(
                &meta(&conn, "wrapped_audit_key").unwrap(),
                KeyPurpose::Audit,
            )
            .unwrap(),
        );
        OldKeyHolder {
            data_keys,
            fingerprint,
            audit,
            kwk,
        }
    }

    /// Tokens of `conn` whose ciphertext one of the old data keys opens.
    fn opens(&self, conn: &Connection) -> Vec<String> {
        let mut stmt = conn
            .prepare(
                "SELECT token, key_version, nonce, ciphertext, format, brand, pan_length, bin, \
                 last4, created_at, expires_at, row_format FROM tokens \
                 WHERE ciphertext IS NOT NULL",
            )
            .unwrap();
        let rows = stmt
            .query_map([], |r| {
                let meta = tokenvault::store::canonical_meta(
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    &r.get::<_, String>(7)?,
                    &r.get::<_, String>(8)?,
                    r.get(9)?,
                    r.get(10)?,
                );
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, u32>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                    meta,
                    r.get::<_, u32>(11)?,
                ))
            })
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let mut opened = Vec::new();
        for (token, _version, nonce, ct, meta, format) in rows {
            // Whatever version the row claims: try every key the attacker has.
            if self
                .data_keys
                .iter()
                .any(|k| k.open(format, &token, &meta, &nonce, &ct).is_ok())
            {
                opened.push(token);
            }
        }
        opened
    }

    /// Wrapped keys of `conn` the old master opens (data keys, fingerprint key and layers,
    /// audit keys).
    fn unwraps(&self, conn: &Connection) -> usize {
        let mut n = 0;
        let rows: Vec<(u32, Vec<u8>)> = conn
            .prepare("SELECT version, wrapped FROM data_keys")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for (v, w) in rows {
            n += usize::from(self.kwk.unwrap(&w, KeyPurpose::Data(v)).is_ok());
        }
        if let Some(w) = meta(conn, "wrapped_fingerprint_key") {
            n += usize::from(self.kwk.unwrap(&w, KeyPurpose::Fingerprint).is_ok());
        }
        if let Some(w) = meta(conn, "wrapped_audit_key") {
            n += usize::from(self.kwk.unwrap(&w, KeyPurpose::Audit).is_ok());
        }
        let signing: Vec<(u32, Vec<u8>)> = conn
            .prepare("SELECT id, wrapped FROM audit_signing_keys WHERE wrapped IS NOT NULL")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for (id, w) in signing {
            n += usize::from(self.kwk.unwrap(&w, KeyPurpose::AuditSigning(id)).is_ok());
        }
        for (i, w) in meta(conn, "fingerprint_layers")
            .unwrap_or_default()
            .chunks(60)
            .enumerate()
        {
            n += usize::from(
                self.kwk
                    .unwrap(w, KeyPurpose::FingerprintLayer(i as u32 + 1))
                    .is_ok(),
            );
        }
        n
    }
}

fn fingerprints(conn: &Connection) -> HashSet<Vec<u8>> {
    conn.prepare("SELECT fingerprint FROM tokens WHERE fingerprint IS NOT NULL")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn audit_records(conn: &Connection) -> Vec<AuditRecord> {
    conn.prepare(
        "SELECT seq, at, principal, peer, action, subject, outcome, reason, mac, hash \
         FROM audit ORDER BY seq",
    )
    .unwrap()
    .query_map([], |r| {
        Ok(AuditRecord {
            seq: r.get::<_, i64>(0)? as u64,
            at: r.get(1)?,
            principal: r.get(2)?,
            peer: r.get(3)?,
            action: r.get(4)?,
            subject: r.get(5)?,
            outcome: r.get(6)?,
            reason: r.get(7)?,
            mac: r.get(8)?,
            hash: r.get(9)?,
        })
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// Sequence numbers of the records whose MAC `key` verifies.
fn macs_verified_by(key: &AuditKey, records: &[AuditRecord]) -> Vec<u64> {
    let mut prev = GENESIS_MAC.to_vec();
    let mut out = Vec::new();
    for rec in records {
        if key.verify(&prev, &canonical_bytes(rec.seq, &rec.entry()), &rec.mac) {
            out.push(rec.seq);
        }
        prev = rec.mac.clone();
    }
    out
}

async fn tokenize(vault: &Vault, pan: &str, reuse: bool) -> String {
    vault
        .tokenize(&caller(), req(pan, reuse))
        .await
        .unwrap()
        .token
        .to_string()
}

async fn reveal(vault: &Vault, token: &str) -> String {
    let t = tokenvault::token::Token::parse(token).unwrap();
    vault
        .detokenize(&caller(), t, "test".into())
        .await
        .unwrap()
        .pan
        .expose_digits()
        .to_owned()
}

/// THE test: backup, rekey, tokenize a new card; the old master with the old backup (and
/// with the current files) opens none of it; the new master opens everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_key_and_an_old_backup_open_nothing_created_after_a_rekey() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let old = MasterKey::generate();
    let vault = Vault::create(VaultConfig::new(&data), &old).unwrap();
    let mut tokens = Vec::new();
    for n in 0..20 {
        let pan = test_pan(n);
        tokens.push((tokenize(&vault, &pan, n % 2 == 0).await, pan));
    }
    let backup = dir.path().join("old-backup.db");
    vault.backup(&caller(), &backup).await.unwrap();

    // The attack works on the backup itself: the test can fail.
    let attacker = OldKeyHolder::open(&backup, &old);
    assert_eq!(
        attacker.opens(&Connection::open(&backup).unwrap()).len(),
        20
    );
    let scope = caller().reuse_scope();
    let backup_fps = fingerprints(&Connection::open(&backup).unwrap());
    assert!(backup_fps.contains(
        attacker
            .fingerprint
            .scoped_fingerprint(&scope, test_pan(0).as_bytes())
            .as_slice()
    ));

    let new = MasterKey::generate();
    let report = vault
        .rekey(
            &caller(),
            &new,
            &RekeyOptions {
                batch: 7,
                max_batches: None,
            },
            |_| {},
        )
        .await
        .unwrap();
    assert!(report.finished && !report.resumed);
    assert_eq!(report.resealed, 20);
    assert_eq!(report.retired, 1);
    // Serving on: reuse gives the same tokens, a new card gets a new one.
    for (token, pan) in tokens.iter().step_by(2) {
        assert_eq!(&tokenize(&vault, pan, true).await, token);
    }
    let new_pan = test_pan(999);
    let new_token = tokenize(&vault, &new_pan, true).await;
    assert_eq!(tokenize(&vault, &new_pan, true).await, new_token);
    vault.close().await;

    let current = db(&data);
    // Nothing in the current files opens with the old master and the old backup's keys:
    // not the new token's row, not an old token's (re-sealed) row, not a wrapped key.
    assert_eq!(attacker.opens(&current), Vec::<String>::new());
    assert_eq!(attacker.unwraps(&current), 0);
    // No stored fingerprint is one the old fingerprint key computes, for any card.
    let fps = fingerprints(&current);
    assert_eq!(fps.len(), 11);
    for n in (0..20).chain([999]) {
        let fp = attacker
            .fingerprint
            .scoped_fingerprint(&scope, test_pan(n).as_bytes());
        assert!(
            !fps.contains(fp.as_slice()),
            "card {n}'s old fingerprint is still stored"
        );
    }
    // The old audit key verifies the records up to the switch and none after it.
    let records = audit_records(&current);
    let switch = records
        .iter()
        .find(|r| r.action == "master_rekey")
        .expect("the switch is recorded")
        .seq;
    let verified = macs_verified_by(&attacker.audit, &records);
    assert_eq!(verified, (1..=switch).collect::<Vec<_>>());
    assert!(records.len() as u64 > switch + 3);
    // The signing key the old backup holds (the old master unwraps it) was replaced when the
    // rekey finished, with a handover record: it signs no checkpoint past that point.
    let signing_key = |conn: &Connection, state: &str| -> (u32, Vec<u8>) {
        conn.query_row(
            "SELECT id, public_key FROM audit_signing_keys WHERE state = ?1 ORDER BY id DESC",
            [state],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    };
    let (old_signer, old_public) = signing_key(&Connection::open(&backup).unwrap(), "active");
    let (new_signer, new_public) = signing_key(&current, "active");
    assert!(new_signer > old_signer && new_public != old_public);
    assert_eq!(signing_key(&current, "retired"), (old_signer, old_public));
    let done = records
        .iter()
        .find(|r| r.action == "master_rekey_done")
        .expect("the end is recorded")
        .seq;
    assert!(records
        .iter()
        .any(|r| r.seq > done && r.action == tokenvault::audit::ROTATE_ACTION));
    drop(current);

    // The old master opens nothing; the new one opens everything.
    assert!(matches!(
        Vault::open(VaultConfig::new(&data), &old).map(|_| ()),
        Err(Error::WrongMasterKey)
    ));
    let vault = Vault::open(VaultConfig::new(&data), &new).unwrap();
    for (token, pan) in &tokens {
        assert_eq!(&reveal(&vault, token).await, pan);
    }
    assert_eq!(reveal(&vault, &new_token).await, new_pan);
    for (token, pan) in tokens.iter().step_by(2) {
        assert_eq!(&tokenize(&vault, pan, true).await, token);
    }
    let verification = vault.verify_audit().await.unwrap();
    assert!(verification.is_ok(), "{}", verification.describe());
    // The same command run again after it finished: a clear answer, nothing changed.
    match vault
        .rekey(&caller(), &new, &RekeyOptions::default(), |_| {})
        .await
    {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("nothing to do"), "{m}"),
        other => panic!("a finished rekey run again: {:?}", other.map(|_| ())),
    }
    let keys = vault.list_keys().await.unwrap();
    assert!(keys
        .iter()
        .any(|k| k.version == 1 && k.state == KeyState::Retired));
    // A plain rotation afterwards carries the layers and the retired audit key along.
    let newer = MasterKey::generate();
    vault.rotate_master(&caller(), &newer).await.unwrap();
    vault.close().await;
    let vault = Vault::open(VaultConfig::new(&data), &newer).unwrap();
    assert_eq!(tokenize(&vault, &new_pan, true).await, new_token);
    assert!(vault.verify_audit().await.unwrap().is_ok());
    vault.close().await;
}

/// A rekey stopped after one batch (as a kill between transactions leaves it) resumes with
/// the new key; reuse finds both re-layered and not yet re-layered rows meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rekey_stopped_half_way_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let old = MasterKey::generate();
    let vault = Vault::create(VaultConfig::new(&data), &old).unwrap();
    let mut tokens = Vec::new();
    for n in 0..12 {
        let pan = test_pan(n);
        tokens.push((tokenize(&vault, &pan, true).await, pan));
    }
    let new = MasterKey::generate();
    let half = RekeyOptions {
        batch: 5,
        max_batches: Some(1),
    };
    let report = vault.rekey(&caller(), &new, &half, |_| {}).await.unwrap();
    assert!(!report.finished);
    assert_eq!(report.resealed, 5);
    // Mid-way: rows re-layered (the first 5) and not yet (the rest) are both found.
    for (token, pan) in &tokens {
        assert_eq!(&tokenize(&vault, pan, true).await, token);
        assert_eq!(&reveal(&vault, token).await, pan);
    }
    let during = tokenize(&vault, &test_pan(500), true).await;
    vault.close().await;

    // The old key no longer opens the vault; starting another rekey is refused.
    assert!(matches!(
        Vault::open(VaultConfig::new(&data), &old).map(|_| ()),
        Err(Error::WrongMasterKey)
    ));
    let vault = Vault::open(VaultConfig::new(&data), &new).unwrap();
    let other = MasterKey::generate();
    assert!(matches!(
        vault.rekey(&caller(), &other, &half, |_| {}).await,
        Err(Error::FailedPrecondition(_))
    ));
    let report = vault
        .rekey(&caller(), &new, &RekeyOptions::default(), |_| {})
        .await
        .unwrap();
    assert!(report.finished && report.resumed);
    assert_eq!(report.resealed, 7);
    for (token, pan) in &tokens {
        assert_eq!(&tokenize(&vault, pan, true).await, token);
        assert_eq!(&reveal(&vault, token).await, pan);
    }
    assert_eq!(tokenize(&vault, &test_pan(500), true).await, during);
    assert!(vault.verify_audit().await.unwrap().is_ok());
    // Finished: nothing to resume, and no old data key left.
    let header_rekey = meta(&db(&data), "rekey");
    assert!(header_rekey.is_none());
    let keys = vault.list_keys().await.unwrap();
    assert!(keys
        .iter()
        .filter(|k| k.version < report.version)
        .all(|k| k.state == KeyState::Retired));
    vault.close().await;
}

/// A second process (a server) keeps serving: refused (UNAVAILABLE, nothing sealed or MACed
/// under a replaced key) from the switch until it reloads the new master key, then serving
/// throughout; one unbroken audit chain across both processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_serves_through_a_rekey_after_reloading() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let old = MasterKey::generate();
    let server = Vault::create(VaultConfig::new(&data), &old).unwrap();
    let mut tokens = Vec::new();
    for n in 0..10 {
        let pan = test_pan(n);
        tokens.push((tokenize(&server, &pan, true).await, pan));
    }
    let admin = Vault::open(VaultConfig::new(&data), &old).unwrap();
    let new = MasterKey::generate();
    let step = RekeyOptions {
        batch: 3,
        max_batches: Some(1),
    };
    admin.rekey(&caller(), &new, &step, |_| {}).await.unwrap();
    // Stale keys: refused, not sealed or audited under them.
    assert!(matches!(
        server.tokenize(&caller(), req(&test_pan(100), true)).await,
        Err(Error::Unavailable(_))
    ));
    let t = tokenvault::token::Token::parse(&tokens[0].0).unwrap();
    assert!(matches!(
        server.detokenize(&caller(), t, "x".into()).await,
        Err(Error::Unavailable(_))
    ));
    server.reload_master_key(&new).await.unwrap();
    for (token, pan) in &tokens {
        assert_eq!(&tokenize(&server, pan, true).await, token);
        assert_eq!(&reveal(&server, token).await, pan);
    }
    let during = tokenize(&server, &test_pan(100), true).await;
    // The admin finishes while the server serves.
    let serve = async {
        for round in 0..5u64 {
            for (token, pan) in &tokens {
                assert_eq!(&reveal(&server, token).await, pan);
            }
            tokenize(&server, &test_pan(200 + round), false).await;
        }
    };
    let admin_caller = caller();
    let (report, ()) = tokio::join!(
        admin.rekey(
            &admin_caller,
            &new,
            &RekeyOptions {
                batch: 2,
                max_batches: None
            },
            |_| {}
        ),
        serve
    );
    assert!(report.unwrap().finished);
    for (token, pan) in &tokens {
        assert_eq!(&tokenize(&server, pan, true).await, token);
        assert_eq!(&reveal(&server, token).await, pan);
    }
    assert_eq!(tokenize(&server, &test_pan(100), true).await, during);
    let verification = server.verify_audit().await.unwrap();
    assert!(verification.is_ok(), "{}", verification.describe());
    admin.close().await;
    server.close().await;
}
