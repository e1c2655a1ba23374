//! One suite, two stores: every behaviour below is one test body run against the embedded
//! SQLite store and against PostgreSQL (a throwaway cluster, see `pg/mod.rs`). Then the
//! PostgreSQL-only behaviours of several replicas on one database.

mod pg;

use std::sync::Arc;
use std::time::Duration;

use tokenvault::auth::Role;
use tokenvault::card::Pan;
use tokenvault::crypto::MasterKey;
use tokenvault::error::Error;
use tokenvault::token::{Token, TokenFormat};
use tokenvault::vault::{
    Caller, Clock, KeyPolicy, KeyState, PurgeOptions, RewrapOptions, TokenizeRequest, Vault,
    VaultConfig,
};

const PANS: [&str; 4] = [
    "4111111111111111",
    "5555555555554444",
    "378282246310005",
    "6011111111111117",
];

fn req(pan: &str, format: TokenFormat, reuse: bool) -> TokenizeRequest {
    TokenizeRequest {
        pan: Pan::parse(pan).unwrap(),
        format,
        reuse_existing: reuse,
        expires_at: None,
    }
}

fn caller() -> Caller {
    Caller::new("test", "local")
}

/// Where a test's vault lives; keeps its temp directory and cluster alive.
enum Store {
    Sqlite(tempfile::TempDir),
    Postgres {
        cluster: Arc<pg::Cluster>,
        url: String,
        dir: tempfile::TempDir,
    },
}

impl Store {
    fn sqlite() -> Option<Store> {
        Some(Store::Sqlite(tempfile::tempdir().unwrap()))
    }

    fn postgres() -> Option<Store> {
        Self::postgres_on(pg::cluster()?)
    }

    fn postgres_on(cluster: Arc<pg::Cluster>) -> Option<Store> {
        let url = cluster.create_db();
        Some(Store::Postgres {
            cluster,
            url,
            dir: tempfile::tempdir().unwrap(),
        })
    }

    fn config(&self) -> VaultConfig {
        match self {
            Store::Sqlite(dir) => VaultConfig::new(dir.path().join("data")),
            Store::Postgres { url, dir, .. } => {
                // No data directory is needed: point at one that does not exist.
                let mut cfg = VaultConfig::new(dir.path().join("unused"));
                cfg.store_url = Some(url.clone().into());
                cfg
            }
        }
    }

    /// Runs a statement against the vault's tables, the way an attacker with database
    /// access would (the SQL used is valid in both dialects).
    fn tamper(&self, sql: &str) {
        match self {
            Store::Sqlite(dir) => {
                let conn = rusqlite::Connection::open(tokenvault::store::sqlite::db_path(
                    &dir.path().join("data"),
                ))
                .unwrap();
                conn.execute_batch(sql).unwrap();
            }
            Store::Postgres { cluster, url, .. } => cluster.sql(pg::db_of(url), sql),
        }
    }
}

impl Store {
    /// The first column (a blob) of every row `sql` returns, read the way an attacker with
    /// database access would.
    fn blobs(&self, sql: &str) -> Vec<Vec<u8>> {
        match self {
            Store::Sqlite(dir) => {
                let conn = rusqlite::Connection::open(tokenvault::store::sqlite::db_path(
                    &dir.path().join("data"),
                ))
                .unwrap();
                let mut stmt = conn.prepare(sql).unwrap();
                let rows = stmt
                    .query_map([], |r| r.get::<_, Vec<u8>>(0))
                    .unwrap()
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
                rows
            }
            Store::Postgres { cluster, url, .. } => cluster.query_blobs(pg::db_of(url), sql),
        }
    }
}

/// One test body, run against both stores (`sqlite::NAME`, `postgres::NAME`).
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(store) = super::Store::sqlite() {
                        super::$name(store).await;
                    }
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(store) = super::Store::postgres() {
                        super::$name(store).await;
                    }
                }
            )*
        }
    };
}

conformance!(
    round_trip_reopen_and_wrong_key,
    reuse_existing_is_scoped,
    delete_destroys_and_is_audited,
    automatic_rotation_counts_are_exact,
    one_batch_reuses_rotates_and_audits_in_order,
    one_batch_retries_collisions_and_runs_out_cleanly,
    the_storage_limit_refuses_tokenize_and_keeps_reveals,
    concurrent_load_keeps_one_unbroken_chain,
    an_edited_audit_record_is_caught,
    an_altered_ciphertext_is_data_loss,
    clients_add_authenticate_revoke,
    rewrap_retire_and_check,
    purge_removes_deleted_rows,
    master_rotation_reopens_with_the_new_key,
    audit_key_rotation_and_checkpoint,
    dual_control_requests_need_a_second_admin,
    rekey_cuts_off_the_old_master_key,
    a_reuse_never_returns_a_token_its_group_deletes,
    a_replica_with_the_replaced_keys_is_cut_off_then_reuses_after_reload,
    a_row_written_at_a_reused_id_during_a_rekey_is_not_layered_twice,
    concurrent_reveals_each_get_their_own_answer,
    a_reveal_under_a_version_loaded_later_is_recorded_once,
);

/// A token sealed under a key version this handle has not loaded yet (rotated and used by
/// another process a moment ago): the reveal's lookup finds a row it cannot open where the
/// store would record it (SQLite: on the writer), so the row is handed back with nothing
/// written; the vault then loads the version, answers, and records the reveal exactly once.
/// So does a token that is not there, in the same request.
async fn a_reveal_under_a_version_loaded_later_is_recorded_once(store: Store) {
    let key = MasterKey::generate();
    let server = Vault::create(store.config(), &key).unwrap();
    let admin = Vault::open(store.config(), &key).unwrap();
    assert_eq!(admin.rotate_key(&caller()).await.unwrap(), 2);
    let t = admin
        .tokenize(&caller(), req(PANS[1], TokenFormat::Opaque, false))
        .await
        .unwrap()
        .token;
    let before = server.audit_records(1, 100_000).await.unwrap().len();
    let absent = Token::parse("tok_00000000000000000000000000").unwrap();
    let got = server
        .detokenize_batch(
            &caller(),
            vec![
                (t.clone(), "charge".into()),
                (absent.clone(), "charge".into()),
            ],
        )
        .await
        .unwrap();
    let Ok(r) = &got[0] else {
        panic!("the rotated token: {:?}", got[0].as_ref().map(|r| &r.info));
    };
    assert_eq!((r.pan.expose_digits(), r.info.key_version), (PANS[1], 2));
    assert!(matches!(got[1], Err(Error::NotFound)));
    let records = server.audit_records(1, 100_000).await.unwrap();
    let new: Vec<(&str, &str, &str)> = records[before..]
        .iter()
        .map(|r| (r.action.as_str(), r.subject.as_str(), r.outcome.as_str()))
        .collect();
    assert_eq!(
        new,
        vec![
            ("detokenize", t.as_str(), "OK"),
            ("detokenize", absent.as_str(), "NOT_FOUND")
        ]
    );
    let v = server.verify_audit().await.unwrap();
    assert!(v.is_ok(), "{}", v.describe());
    admin.close().await;
    server.close().await;
}

/// Many reveals at once, of live, deleted and expired tokens: each gets exactly its own
/// answer. PostgreSQL folds concurrent lookups into shared statements (and judges expiry
/// per request), so a mix-up between the callers of one statement would show here.
async fn concurrent_reveals_each_get_their_own_answer(store: Store) {
    let key = MasterKey::generate();
    let clock = Clock::stepped();
    let mut cfg = store.config();
    cfg.clock = clock.clone();
    let vault = Vault::create(cfg, &key).unwrap();
    let hour = 3_600_000_000i64;
    let in_an_hour = vault.now() + hour;
    let mut tokens = Vec::new();
    for i in 0..40 {
        let mut r = req(PANS[i % 4], TokenFormat::Opaque, false);
        // Every third expires in an hour; every seventh is deleted.
        r.expires_at = (i % 3 == 0).then_some(in_an_hour);
        let t = vault.tokenize(&caller(), r).await.unwrap().token;
        if i % 7 == 0 {
            assert!(vault.delete(&caller(), t.clone()).await.unwrap());
        }
        tokens.push((t, (i % 3 != 0 && i % 7 != 0).then_some(PANS[i % 4])));
    }
    clock.set_step(2 * hour);
    let tokens = Arc::new(tokens);
    let tasks: Vec<_> = (0..240)
        .map(|n| {
            let (vault, tokens) = (vault.clone(), tokens.clone());
            tokio::spawn(async move {
                let (token, pan) = &tokens[(n * 7) % tokens.len()];
                let got = vault.detokenize(&caller(), token.clone(), "t".into()).await;
                match (got, pan) {
                    (Ok(r), Some(pan)) => assert_eq!(r.pan.expose_digits(), *pan),
                    (Err(Error::NotFound), None) => {}
                    (got, pan) => {
                        panic!("{token:?}: got {:?}, expected {pan:?}", got.map(|r| r.info))
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let v = vault.verify_audit().await.unwrap();
    assert!(v.is_ok(), "{}", v.describe());
    vault.close().await;
}

/// The attack of a racing delete: `Delete(X)` and `Tokenize(PAN of X, reuse_existing)` sent
/// together, so they usually share one group (the writer is busy with the pairs before).
/// Whatever the order the store picks, it must read as serial: a tokenize that answers X is
/// recorded before X's delete, and one recorded after it creates a new token that reveals
/// its card. Before the fix, PostgreSQL's one group-wide reuse lookup ran ahead of the
/// group's deletes and answered X (created=false) from the very commit that deleted it.
async fn a_reuse_never_returns_a_token_its_group_deletes(store: Store) {
    let key = MasterKey::generate();
    let vault = Vault::create(store.config(), &key).unwrap();
    let pans: Vec<String> = (0..48u64)
        .map(|n| {
            let payload = format!("411111{n:09}");
            let check = tokenvault::card::luhn_check_digit(payload.as_bytes());
            format!("{payload}{}", check as char)
        })
        .collect();
    for round in 0..3 {
        let reqs = pans
            .iter()
            .map(|p| req(p, TokenFormat::Opaque, true))
            .collect();
        let first: Vec<String> = vault
            .tokenize_batch(&caller(), reqs)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.unwrap().token.to_string())
            .collect();
        let from = vault.audit_head_seq().await.unwrap() + 1;
        let mut handles = Vec::new();
        for (pan, x) in pans.iter().zip(&first) {
            let (v, x) = (vault.clone(), x.clone());
            handles.push(tokio::spawn(async move {
                v.delete(&caller(), Token::parse(&x).unwrap())
                    .await
                    .map(|_| None)
            }));
            let (v, pan) = (vault.clone(), pan.clone());
            handles.push(tokio::spawn(async move {
                v.tokenize(&caller(), req(&pan, TokenFormat::Opaque, true))
                    .await
                    .map(Some)
            }));
        }
        let mut answers = Vec::new();
        for h in handles {
            if let Some(t) = h.await.unwrap().unwrap() {
                answers.push(t);
            }
        }
        let records = vault.audit_records(from, 10_000).await.unwrap();
        for (i, x) in first.iter().enumerate() {
            let deleted_at = records
                .iter()
                .position(|r| r.action == "delete" && &r.subject == x)
                .unwrap_or_else(|| panic!("round {round}: delete of item {i} recorded"));
            assert_eq!(records[deleted_at].outcome, "OK");
            assert!(
                !records[deleted_at..]
                    .iter()
                    .any(|r| r.action == "tokenize" && &r.subject == x),
                "round {round}: item {i}'s token answered to a tokenize recorded after its delete"
            );
        }
        for (i, t) in answers.iter().enumerate() {
            if !first.contains(&t.token.to_string()) {
                assert!(t.created, "round {round}: answer {i}");
                let r = vault
                    .detokenize(&caller(), t.token.clone(), "t".into())
                    .await
                    .unwrap();
                assert!(pans.contains(&r.pan.expose_digits().to_string()));
            }
        }
        // The next round starts from fresh tokens: delete what this one created.
        for t in answers.iter().filter(|t| t.created) {
            assert!(vault.delete(&caller(), t.token.clone()).await.unwrap());
        }
    }
    let v = vault.verify_audit().await.unwrap();
    assert!(v.is_ok(), "{}", v.describe());
    vault.close().await;
}

async fn round_trip_reopen_and_wrong_key(store: Store) {
    let key = MasterKey::generate();
    let vault = Vault::create(store.config(), &key).unwrap();
    assert!(matches!(
        Vault::create(store.config(), &key).map(|_| ()),
        Err(Error::AlreadyExists(_))
    ));
    let mut tokens = Vec::new();
    for pan in PANS {
        for format in [
            TokenFormat::Opaque,
            TokenFormat::PanShaped,
            TokenFormat::PanShapedKeepBin,
        ] {
            let t = vault
                .tokenize(&caller(), req(pan, format, false))
                .await
                .unwrap();
            assert!(t.created);
            let r = vault
                .detokenize(&caller(), t.token.clone(), "test".into())
                .await
                .unwrap();
            assert_eq!(r.pan.expose_digits(), pan);
            assert_eq!(r.info, t.info);
            tokens.push((t.token, pan));
        }
    }
    vault.close().await;
    assert!(matches!(
        Vault::open(store.config(), &MasterKey::generate()).map(|_| ()),
        Err(Error::WrongMasterKey)
    ));
    let vault = Vault::open(store.config(), &key).unwrap();
    for (token, pan) in tokens {
        let r = vault
            .detokenize(&caller(), token, "test".into())
            .await
            .unwrap();
        assert_eq!(r.pan.expose_digits(), pan);
    }
    assert!(vault.verify_audit().await.unwrap().is_ok());
    vault.close().await;
}

async fn reuse_existing_is_scoped(store: Store) {
    let key = MasterKey::generate();
    let vault = Vault::create(store.config(), &key).unwrap();
    let a = vault
        .tokenize(&caller(), req(PANS[0], TokenFormat::Opaque, true))
        .await
        .unwrap();
    let b = vault
        .tokenize(&caller(), req(PANS[0], TokenFormat::Opaque, true))
        .await
        .unwrap();
    assert!(a.created && !b.created);
    assert_eq!(a.token, b.token);
    let other = Caller::new("someone-else", "local");
    let c = vault
        .tokenize(&other, req(PANS[0], TokenFormat::Opaque, true))
        .await
        .unwrap();
    assert!(
        c.created,
        "another principal never finds the first one's token"
    );
    assert_ne!(c.token, a.token);
    vault.close().await;
}

async fn delete_destroys_and_is_audited(store: Store) {
    let key = MasterKey::generate();
    let vault = Vault::create(store.config(), &key).unwrap();
    let t = vault
        .tokenize(&caller(), req(PANS[1], TokenFormat::Opaque, false))
        .await
        .unwrap();
    assert!(vault.delete(&caller(), t.token.clone()).await.unwrap());
    assert!(!vault.delete(&caller(), t.token.clone()).await.unwrap());
    assert!(matches!(
        vault
            .detokenize(&caller(), t.token.clone(), "t".into())
            .await,
        Err(Error::NotFound)
    ));
    let records = vault.audit_records(1, 100).await.unwrap();
    let deletes: Vec<_> = records.iter().filter(|r| r.action == "delete").collect();
    assert_eq!(deletes.len(), 2);
    assert_eq!(deletes[0].outcome, "OK");
    assert_eq!(deletes[1].outcome, "NOT_FOUND");
    vault.close().await;
}

async fn automatic_rotation_counts_are_exact(store: Store) {
    let key = MasterKey::generate();
    let mut cfg = store.config();
    cfg.key_policy = KeyPolicy {
        max_encryptions: 10,
        max_age: None,
    };
    let vault = Vault::create(cfg, &key).unwrap();
    let mut handles = Vec::new();
    for i in 0..25 {
        let v = vault.clone();
        handles.push(tokio::spawn(async move {
            v.tokenize(&caller(), req(PANS[i % 4], TokenFormat::Opaque, false))
                .await
                .unwrap()
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let keys = vault.list_keys().await.unwrap();
    let counts: Vec<(u32, u64, KeyState)> = keys
        .iter()
        .map(|k| (k.version, k.encryptions, k.state))
        .collect();
    assert_eq!(
        counts,
        vec![
            (1, 10, KeyState::DecryptOnly),
            (2, 10, KeyState::DecryptOnly),
            (3, 5, KeyState::Active)
        ]
    );
    let rows: u64 = keys.iter().map(|k| k.rows).sum();
    assert_eq!(rows, 25);
    vault.close().await;
}

/// One TokenizeBatch is one group: its items are written together (on PostgreSQL in one
/// multi-row statement), yet behave as if stored one by one in order: a repeated card number
/// with `reuse_existing` gets the token its first occurrence created, the rotation by usage
/// falls exactly on the 11th, 21st and 31st seal, each rotation's audit record comes right
/// before the first record sealed under the new version, and every token reveals its card.
async fn one_batch_reuses_rotates_and_audits_in_order(store: Store) {
    let key = MasterKey::generate();
    let mut cfg = store.config();
    cfg.key_policy = KeyPolicy {
        max_encryptions: 10,
        max_age: None,
    };
    let vault = Vault::create(cfg, &key).unwrap();
    // Every 4th item: PANS[0] with reuse (1 seal, 9 reuses); the others: 30 fresh seals.
    let pans: Vec<&str> = (0..40)
        .map(|i| if i % 4 == 0 { PANS[0] } else { PANS[i % 4] })
        .collect();
    let reqs = (0..40)
        .map(|i| req(pans[i], TokenFormat::Opaque, i % 4 == 0))
        .collect();
    let out: Vec<_> = vault
        .tokenize_batch(&caller(), reqs)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let reused = out[0].token.to_string();
    let mut seals = 0u32;
    for (i, t) in out.iter().enumerate() {
        if i % 4 == 0 && i > 0 {
            assert!(!t.created, "item {i} reuses the batch's first token");
            assert_eq!(t.token.to_string(), reused);
            continue;
        }
        assert!(t.created, "item {i}");
        seals += 1;
        assert_eq!(t.info.key_version, seals.div_ceil(10), "seal {seals}");
    }
    assert_eq!(seals, 31);
    // Another batch finds the stored token (and only seals nothing).
    let again = vault
        .tokenize(&caller(), req(PANS[0], TokenFormat::Opaque, true))
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.token.to_string(), reused);
    let keys = vault.list_keys().await.unwrap();
    let counts: Vec<(u32, u64)> = keys.iter().map(|k| (k.version, k.encryptions)).collect();
    assert_eq!(counts, vec![(1, 10), (2, 10), (3, 10), (4, 1)]);
    assert_eq!(keys.iter().map(|k| k.rows).sum::<u64>(), 31);
    // The trail: tokenize records in the batch's order, each rotation just before the first
    // seal under its version.
    let records = vault.audit_records(1, 1000).await.unwrap();
    let mut tokenized = 0usize;
    let mut version = 1u32;
    for r in &records {
        match r.action.as_str() {
            "key_rotate" => {
                version += 1;
                assert_eq!(r.subject, format!("key v{version}"));
            }
            "tokenize" if tokenized < out.len() => {
                let t = &out[tokenized];
                assert_eq!(r.subject, t.token.to_string(), "record of item {tokenized}");
                assert_eq!(r.outcome, "OK");
                if t.created {
                    assert_eq!(t.info.key_version, version, "item {tokenized}");
                }
                tokenized += 1;
            }
            _ => {}
        }
    }
    assert_eq!((tokenized, version), (40, 4));
    assert!(vault.verify_audit().await.unwrap().is_ok());
    for (i, t) in out.iter().enumerate() {
        let r = vault
            .detokenize(&caller(), t.token.clone(), "test".into())
            .await
            .unwrap();
        assert_eq!(r.pan.expose_digits(), pans[i]);
    }
    vault.close().await;
}

/// Rows holding every token a 15-digit card shaped with `PanShapedKeepBin` can get
/// (`378282` + 5 free digits + `0005`) whose free digits are >= `from`; deleted rows, as a
/// purge would leave them (no ciphertext), so only their tokens are taken.
fn occupy_shaped_tokens(store: &Store, from: u32) {
    store.tamper(&format!(
        "WITH RECURSIVE n(i) AS (SELECT {from} UNION ALL SELECT i + 1 FROM n WHERE i < 99999) \
         INSERT INTO tokens(token, key_version, format, brand, pan_length, bin, last4, \
         created_at, deleted_at) SELECT '378282' || substr(CAST(100000 + i AS TEXT), 2) || '0005', \
         1, 3, 1, 15, '378282', '0005', 0, 1 FROM n"
    ));
}

/// Token collisions inside one group. First every token of the card's space is taken: each
/// item of a batch draws its 32 times, every draw collides with a stored row, and the item
/// ends RESOURCE_EXHAUSTED, with nothing stored, the 32 seals counted and its audit record
/// saying so. Then half the space is freed: a batch of 60 collides about every other draw, so
/// its items take several rounds; each ends with a distinct stored token that reveals the
/// card, and each item's audit record names its own token.
async fn one_batch_retries_collisions_and_runs_out_cleanly(store: Store) {
    let pan = PANS[2];
    let key = MasterKey::generate();
    let vault = Vault::create(store.config(), &key).unwrap();
    occupy_shaped_tokens(&store, 0);
    let batch = |n: usize| {
        (0..n)
            .map(|_| req(pan, TokenFormat::PanShapedKeepBin, false))
            .collect::<Vec<_>>()
    };
    let full = vault.tokenize_batch(&caller(), batch(20)).await.unwrap();
    for r in &full {
        assert!(
            matches!(r, Err(Error::ResourceExhausted(m)) if m.contains("no free")),
            "{r:?}"
        );
    }
    let keys = vault.list_keys().await.unwrap();
    assert_eq!((keys[0].encryptions, keys[0].rows), (20 * 32, 0));

    store.tamper(
        "DELETE FROM tokens WHERE bin = '378282' AND created_at = 0 AND token < '37828250000'",
    );
    let out: Vec<_> = vault
        .tokenize_batch(&caller(), batch(60))
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let distinct: std::collections::HashSet<String> =
        out.iter().map(|t| t.token.to_string()).collect();
    assert_eq!(distinct.len(), 60, "a token handed out twice");
    assert!(out
        .iter()
        .all(|t| t.created && t.token.as_str() < "37828250000"));
    let keys = vault.list_keys().await.unwrap();
    assert_eq!(keys[0].rows, 60);
    assert!(
        keys[0].encryptions > 20 * 32 + 60,
        "no collision was drawn again"
    );

    let records = vault.audit_records(1, 1000).await.unwrap();
    let outcomes: Vec<(&str, &str)> = records
        .iter()
        .filter(|r| r.action == "tokenize")
        .map(|r| (r.subject.as_str(), r.outcome.as_str()))
        .collect();
    let mut expected = vec![("", "RESOURCE_EXHAUSTED"); 20];
    expected.extend(out.iter().map(|t| (t.token.as_str(), "OK")));
    assert_eq!(outcomes, expected);
    assert!(vault.verify_audit().await.unwrap().is_ok());
    for t in out {
        let revealed = vault
            .detokenize(&caller(), t.token, "test".into())
            .await
            .unwrap();
        assert_eq!(revealed.pan.expose_digits(), pan);
    }
    vault.close().await;
}

/// `limits.max_storage_bytes`: once the vault's storage passes the tokenize share of the
/// limit (SQLite: pages in use; PostgreSQL: its tables on disk, measured every second),
/// every tokenize item is refused with RESOURCE_EXHAUSTED and audited, nothing of it is
/// stored, and reveals (with their audit records) still work.
async fn the_storage_limit_refuses_tokenize_and_keeps_reveals(store: Store) {
    let key = MasterKey::generate();
    let mut cfg = store.config();
    cfg.max_storage_bytes = Some(4 << 20);
    let vault = Vault::create(cfg, &key).unwrap();
    let batch = |seed: usize| {
        (0..200)
            .map(|i| req(PANS[(seed + i) % 4], TokenFormat::Opaque, false))
            .collect::<Vec<_>>()
    };
    let mut first = None;
    let mut stored = 0u64;
    let mut n = 0;
    let refused = loop {
        let out = vault.tokenize_batch(&caller(), batch(n)).await.unwrap();
        n += 1;
        let ok = out.iter().filter(|r| r.is_ok()).count();
        if ok == 0 {
            break out;
        }
        assert_eq!(ok, out.len(), "a batch is refused whole or not at all");
        stored += ok as u64;
        first.get_or_insert_with(|| out[0].as_ref().unwrap().token.clone());
        assert!(n < 400, "the storage limit never took effect");
        // PostgreSQL measures once a second.
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for r in &refused {
        assert!(
            matches!(r, Err(Error::ResourceExhausted(m)) if m.contains("storage limit")),
            "{r:?}"
        );
    }
    let keys = vault.list_keys().await.unwrap();
    assert_eq!(
        keys.iter().map(|k| k.rows).sum::<u64>(),
        stored,
        "nothing refused is stored"
    );
    let revealed = vault
        .detokenize(&caller(), first.unwrap(), "after the limit".into())
        .await
        .unwrap();
    assert!(PANS.contains(&revealed.pan.expose_digits()));
    let head = vault.audit_head_seq().await.unwrap();
    let records = vault
        .audit_records(head.saturating_sub(300), 400)
        .await
        .unwrap();
    assert!(records
        .iter()
        .any(|r| r.action == "tokenize" && r.outcome == "RESOURCE_EXHAUSTED"));
    assert_eq!(records.last().unwrap().action, "detokenize");
    assert!(vault.verify_audit().await.unwrap().is_ok());
    vault.close().await;
}

async fn concurrent_load_keeps_one_unbroken_chain(store: Store) {
    let key = MasterKey::generate();
    let vault = Vault::create(store.config(), &key).unwrap();
    let mut handles = Vec::new();
    for task in 0..16 {
        let v = vault.clone();
        handles.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..20 {
                let pan = PANS[(task + i) % 4];
                let t = v
                    .tokenize(&caller(), req(pan, TokenFormat::Opaque, false))
                    .await
                    .unwrap();
                out.push((t.token, pan));
            }
            out
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    for (token, pan) in &all {
        let r = vault
            .detokenize(&caller(), token.clone(), "t".into())
            .await
            .unwrap();
        assert_eq!(r.pan.expose_digits(), *pan);
    }
    let v = vault.verify_audit().await.unwrap();
    assert!(v.is_ok(), "{}", v.describe());
    // 320 tokenize + 320 detokenize records, numbered 1..=640 without a gap.
    assert_eq!(vault.audit_head_seq().await.unwrap(), 640);
    vault.close().await;
}

async fn an_edited_audit_record_is_caught(store: Store) {
    let key = MasterKey::generate();
    let vault = Vault::create(store.config(), &key).unwrap();
    for pan in PANS {
        vault
            .tokenize(&caller(), req(pan, TokenFormat::Opaque, false))
            .await
            .unwrap();
    }
    assert!(vault.verify_audit().await.unwrap().is_ok());
    store.tamper("UPDATE audit SET principal = 'someone-else' WHERE seq = 2");
    let v = vault.verify_audit().await.unwrap();
    assert!(!v.is_ok(), "an edited record passed verification");
    vault.close().await;
}

async fn an_altered_ciphertext_is_data_loss(store: Store) {
    let key = MasterKey::generate();
    let vault = Vault::create(store.config(), &key).unwrap();
    let a = vault
        .tokenize(&caller(), req(PANS[0], TokenFormat::Opaque, false))
        .await
        .unwrap();
    let b = vault
        .tokenize(&caller(), req(PANS[1], TokenFormat::Opaque, false))
        .await
        .unwrap();
    // Swap the two ciphertexts: each is bound to its own token.
    store.tamper(&format!(
        "UPDATE tokens SET ciphertext = (SELECT ciphertext FROM tokens WHERE token = '{b}'), \
         nonce = (SELECT nonce FROM tokens WHERE token = '{b}') WHERE token = '{a}'",
        a = a.token.as_str(),
        b = b.token.as_str()
    ));
    assert!(matches!(
        vault
            .detokenize(&caller(), a.token.clone(), "t".into())
            .await,
        Err(Error::DataLoss(_))
    ));
    vault.close().await;
}

async fn clients_add_authenticate_revoke(store: Store) {
    let key = MasterKey::generate();
    let vault = Vault::create(store.config(), &key).unwrap();
    let api_key = vault
        .add_client(&caller(), "app", &[Role::Tokenize], None)
        .await
        .unwrap();
    assert!(matches!(
        vault
            .add_client(&caller(), "app", &[Role::Tokenize], None)
            .await,
        Err(Error::AlreadyExists(_))
    ));
    assert_eq!(vault.authenticate_api_key(&api_key).unwrap().name, "app");
    assert!(vault.revoke_client(&caller(), "app").await.unwrap());
    assert!(!vault.revoke_client(&caller(), "app").await.unwrap());
    assert!(vault.authenticate_api_key(&api_key).is_err());
    let clients = vault.list_clients().await.unwrap();
    assert!(clients[0].revoked_at.is_some());
    vault.close().await;
}

async fn rewrap_retire_and_check(store: Store) {
    let key = MasterKey::generate();
    let vault = Vault::create(store.config(), &key).unwrap();
    let mut tokens = Vec::new();
    for pan in PANS {
        let t = vault
            .tokenize(&caller(), req(pan, TokenFormat::Opaque, false))
            .await
            .unwrap();
        tokens.push((t.token, pan));
    }
    assert_eq!(vault.rotate_key(&caller()).await.unwrap(), 2);
    assert!(matches!(
        vault.retire_key(&caller(), 1).await,
        Err(Error::FailedPrecondition(_))
    ));
    let report = vault
        .rewrap(&caller(), &RewrapOptions::default(), |_| {})
        .await
        .unwrap();
    assert_eq!(report.rewrapped, 4);
    assert!(report.failed.is_empty());
    assert!(vault.retire_key(&caller(), 1).await.unwrap());
    for (token, pan) in &tokens {
        let r = vault
            .detokenize(&caller(), token.clone(), "t".into())
            .await
            .unwrap();
        assert_eq!(r.pan.expose_digits(), *pan);
        assert_eq!(r.info.key_version, 2);
    }
    let keys = vault.list_keys().await.unwrap();
    assert_eq!(keys[0].state, KeyState::Retired);
    assert_eq!((keys[0].encryptions, keys[1].encryptions), (4, 4));
    let check = vault.check(true, 10).await.unwrap();
    assert!(check.ok(), "{check:?}");
    assert_eq!(check.checked, 4);
    vault.close().await;
}

async fn purge_removes_deleted_rows(store: Store) {
    let key = MasterKey::generate();
    let vault = Vault::create(store.config(), &key).unwrap();
    let mut tokens = Vec::new();
    for pan in PANS {
        tokens.push(
            vault
                .tokenize(&caller(), req(pan, TokenFormat::Opaque, false))
                .await
                .unwrap()
                .token,
        );
    }
    vault.delete(&caller(), tokens[0].clone()).await.unwrap();
    vault.delete(&caller(), tokens[1].clone()).await.unwrap();
    let opts = PurgeOptions {
        deleted: true,
        expired: false,
        older_than: None,
        batch: 1,
    };
    let report = vault.purge(&caller(), &opts).await.unwrap();
    assert_eq!((report.deleted, report.expired), (2, 0));
    let r = vault
        .detokenize(&caller(), tokens[2].clone(), "t".into())
        .await
        .unwrap();
    assert_eq!(r.pan.expose_digits(), PANS[2]);
    assert!(vault.verify_audit().await.unwrap().is_ok());
    vault.close().await;
}

async fn master_rotation_reopens_with_the_new_key(store: Store) {
    let key = MasterKey::generate();
    let vault = Vault::create(store.config(), &key).unwrap();
    let t = vault
        .tokenize(&caller(), req(PANS[3], TokenFormat::Opaque, false))
        .await
        .unwrap();
    let new = MasterKey::generate();
    assert_eq!(vault.rotate_master(&caller(), &new).await.unwrap(), 1);
    vault.close().await;
    assert!(matches!(
        Vault::open(store.config(), &key).map(|_| ()),
        Err(Error::WrongMasterKey)
    ));
    let vault = Vault::open(store.config(), &new).unwrap();
    let r = vault
        .detokenize(&caller(), t.token, "t".into())
        .await
        .unwrap();
    assert_eq!(r.pan.expose_digits(), PANS[3]);
    vault.close().await;
}

async fn audit_key_rotation_and_checkpoint(store: Store) {
    let key = MasterKey::generate();
    let vault = Vault::create(store.config(), &key).unwrap();
    vault
        .tokenize(&caller(), req(PANS[0], TokenFormat::Opaque, false))
        .await
        .unwrap();
    let before = vault
        .audit_checkpoint()
        .await
        .unwrap()
        .expect("a checkpoint");
    let (id, _public) = vault.rotate_audit_key(&caller()).await.unwrap();
    assert_eq!(id, 2);
    let keys = vault.audit_signing_keys().await.unwrap();
    assert_eq!(keys.len(), 2);
    assert!(!keys[0].active && keys[1].active);
    let after = vault
        .audit_checkpoint()
        .await
        .unwrap()
        .expect("a checkpoint");
    assert!(after.seq > before.seq);
    let v = vault.verify_audit().await.unwrap();
    assert!(v.is_ok(), "{}", v.describe());
    vault.close().await;
}

// ---------------------------------------------------------------------------------------
// Several replicas on one PostgreSQL database

fn replicas(store: &Store, key: &MasterKey, n: usize, policy: KeyPolicy) -> Vec<Vault> {
    let mut cfg = store.config();
    cfg.key_policy = policy.clone();
    let mut out = vec![Vault::create(cfg, key).unwrap()];
    for _ in 1..n {
        let mut cfg = store.config();
        cfg.key_policy = policy.clone();
        out.push(Vault::open(cfg, key).unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_tokens_one_chain_and_rotate_exactly_once() {
    let Some(store) = Store::postgres() else {
        return;
    };
    let key = MasterKey::generate();
    let policy = KeyPolicy {
        max_encryptions: 50,
        max_age: None,
    };
    let vaults = replicas(&store, &key, 3, policy);
    let mut handles = Vec::new();
    for task in 0..12 {
        let v = vaults[task % 3].clone();
        let reader = vaults[(task + 1) % 3].clone();
        handles.push(tokio::spawn(async move {
            for i in 0..20 {
                let pan = PANS[(task + i) % 4];
                let t = v
                    .tokenize(&caller(), req(pan, TokenFormat::Opaque, false))
                    .await
                    .unwrap();
                // Detokenizable through another replica the moment tokenize answered.
                let r = reader
                    .detokenize(&caller(), t.token, "t".into())
                    .await
                    .unwrap();
                assert_eq!(r.pan.expose_digits(), pan);
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    // 240 encryptions at 50 per version: exactly versions 1..=5, 50 each, the 5th with 40.
    let keys = vaults[0].list_keys().await.unwrap();
    let counts: Vec<(u32, u64)> = keys.iter().map(|k| (k.version, k.encryptions)).collect();
    assert_eq!(counts, vec![(1, 50), (2, 50), (3, 50), (4, 50), (5, 40)]);
    let rotations = vaults[0]
        .audit_records(1, 10_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.action == "key_rotate")
        .count();
    assert_eq!(
        rotations, 4,
        "each automatic rotation happened exactly once"
    );
    for v in &vaults {
        let verdict = v.verify_audit().await.unwrap();
        assert!(verdict.is_ok(), "{}", verdict.describe());
    }
    assert_eq!(vaults[1].audit_head_seq().await.unwrap(), 240 * 2 + 4);
    for v in vaults {
        v.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_see_key_and_client_changes_within_a_second() {
    let Some(store) = Store::postgres() else {
        return;
    };
    let key = MasterKey::generate();
    let vaults = replicas(&store, &key, 2, KeyPolicy::default());
    let api_key = vaults[0]
        .add_client(&caller(), "app", &[Role::Tokenize], None)
        .await
        .unwrap();
    let v2 = vaults[0].rotate_key(&caller()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        vaults[1].authenticate_api_key(&api_key).unwrap().name,
        "app"
    );
    let t = vaults[1]
        .tokenize(&caller(), req(PANS[0], TokenFormat::Opaque, false))
        .await
        .unwrap();
    assert_eq!(
        t.info.key_version, v2,
        "the other replica seals under the new version"
    );
    vaults[0].revoke_client(&caller(), "app").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(vaults[1].authenticate_api_key(&api_key).is_err());
    for v in vaults {
        v.close().await;
    }
}

/// Retries a reveal of `token` until it answers `pan`; panics if it has not within `limit`.
async fn reveals_again_within(vault: &Vault, token: &Token, pan: &str, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match vault.detokenize(&caller(), token.clone(), "t".into()).await {
            Ok(r) => {
                assert_eq!(r.pan.expose_digits(), pan);
                return;
            }
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("still recovering: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no recovery: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_fails_fast_then_recovers_without_a_restart() {
    // A cluster of its own: the restart must not hit the other tests.
    let Some(store) = pg::private_cluster().and_then(Store::postgres_on) else {
        return;
    };
    let Store::Postgres { cluster, .. } = &store else {
        unreachable!()
    };
    let key = MasterKey::generate();
    let vault = Vault::create(store.config(), &key).unwrap();
    let t = vault
        .tokenize(&caller(), req(PANS[0], TokenFormat::Opaque, false))
        .await
        .unwrap();
    cluster.stop_immediate();
    let started = std::time::Instant::now();
    let r = vault
        .tokenize(&caller(), req(PANS[1], TokenFormat::Opaque, false))
        .await;
    assert!(matches!(r, Err(Error::Unavailable(_))), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!vault.healthy(), "health reports the lost database");
    cluster.start_again();
    reveals_again_within(&vault, &t.token, PANS[0], Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(vault.healthy());
    assert!(vault.verify_audit().await.unwrap().is_ok());
    vault.close().await;
}

/// A database that stops answering without closing its connections (every server process
/// stopped with SIGSTOP, like a hung host or a silent partition): a reveal and a tokenize fail
/// with UNAVAILABLE within the serving bound (10 s) instead of waiting for TCP to give up,
/// health reports it, and once the server runs again the vault serves without a restart.
/// Before the bound, both waited until the server ran again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_database_fails_requests_within_a_bound_then_recovers() {
    let Some(store) = pg::private_cluster().and_then(Store::postgres_on) else {
        return;
    };
    let Store::Postgres { cluster, .. } = &store else {
        unreachable!()
    };
    let key = MasterKey::generate();
    let vault = Vault::create(store.config(), &key).unwrap();
    let t = vault
        .tokenize(&caller(), req(PANS[0], TokenFormat::Opaque, false))
        .await
        .unwrap();
    let frozen = cluster.freeze();
    let started = std::time::Instant::now();
    let who = caller();
    let (tokenized, revealed) = tokio::join!(
        tokio::time::timeout(
            Duration::from_secs(30),
            vault.tokenize(&who, req(PANS[1], TokenFormat::Opaque, false)),
        ),
        tokio::time::timeout(
            Duration::from_secs(30),
            vault.detokenize(&who, t.token.clone(), "t".into()),
        ),
    );
    let waited = started.elapsed();
    let tokenized = tokenized.expect("tokenize still waiting after 30 s");
    let revealed = revealed
        .expect("detokenize still waiting after 30 s")
        .map(|r| r.info);
    assert!(
        matches!(tokenized, Err(Error::Unavailable(_))),
        "{tokenized:?}"
    );
    assert!(
        matches!(revealed, Err(Error::Unavailable(_))),
        "{revealed:?}"
    );
    assert!(waited < Duration::from_secs(15), "{waited:?}");
    assert!(!vault.healthy(), "health reports the silent database");
    drop(frozen);
    reveals_again_within(&vault, &t.token, PANS[0], Duration::from_secs(20)).await;
    vault
        .tokenize(&caller(), req(PANS[2], TokenFormat::Opaque, false))
        .await
        .unwrap();
    let v = vault.verify_audit().await.unwrap();
    assert!(v.is_ok(), "{}", v.describe());
    vault.close().await;
}

/// `serve` and the admin commands need only SELECT/INSERT/UPDATE/DELETE (the README's
/// GRANTs); only `init` (and a migration) needs to create tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_with_only_dml_grants_runs_the_vault() {
    let Some(store) = Store::postgres() else {
        return;
    };
    let Store::Postgres { cluster, url, dir } = &store else {
        unreachable!()
    };
    let key = MasterKey::generate();
    Vault::create(store.config(), &key).unwrap().close().await;
    let db = pg::db_of(url).to_owned();
    let role = format!("{db}_app");
    // The README's GRANTs, verbatim apart from the names.
    cluster.sql(
        &db,
        &format!(
            "CREATE ROLE {role} LOGIN; \
             GRANT CONNECT ON DATABASE {db} TO {role}; \
             GRANT USAGE ON SCHEMA public TO {role}; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}; \
             GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role};"
        ),
    );
    let mut cfg = VaultConfig::new(dir.path().join("unused"));
    cfg.store_url = Some(format!("postgres://{role}@127.0.0.1:{}/{db}", cluster.port).into());
    let vault = Vault::open(cfg, &key).unwrap();
    let t = vault
        .tokenize(&caller(), req(PANS[0], TokenFormat::Opaque, false))
        .await
        .unwrap();
    vault
        .add_client(&caller(), "app", &[Role::Tokenize], None)
        .await
        .unwrap();
    vault.rotate_key(&caller()).await.unwrap();
    vault
        .rewrap(&caller(), &RewrapOptions::default(), |_| {})
        .await
        .unwrap();
    assert!(vault.retire_key(&caller(), 1).await.unwrap());
    vault.rotate_audit_key(&caller()).await.unwrap();
    vault.delete(&caller(), t.token).await.unwrap();
    let opts = PurgeOptions {
        deleted: true,
        expired: false,
        older_than: None,
        batch: 100,
    };
    assert_eq!(vault.purge(&caller(), &opts).await.unwrap().deleted, 1);
    assert!(vault.verify_audit().await.unwrap().is_ok());
    // And it cannot create anything.
    vault.close().await;
    let denied = std::panic::catch_unwind(|| {
        cluster.sql(
            &db,
            &format!("SET ROLE {role}; CREATE TABLE sneaky (x int)"),
        );
    });
    assert!(denied.is_err(), "the serve role could create a table");
}

/// Dual control (issue 16) on either store: a request is persisted (a reopened vault sees
/// it), its requester cannot approve it, a second admin can exactly once, an expired one
/// cannot be approved, and request and approval are both audited.
async fn dual_control_requests_need_a_second_admin(store: Store) {
    let key = MasterKey::generate();
    let vault = Vault::create(store.config(), &key).unwrap();
    let alice = Caller::new("alice", "local");
    let bob = Caller::new("bob", "local");
    let params = serde_json::json!({ "version": 1 });
    let req = vault
        .request_admin_op(&alice, "revoke_key", &params, Duration::from_secs(3600))
        .await
        .unwrap();
    let expired = vault
        .request_admin_op(&alice, "revoke_key", &params, Duration::ZERO)
        .await
        .unwrap();
    vault.close().await;

    let vault = Vault::open(store.config(), &key).unwrap();
    let pending = vault.admin_requests().await.unwrap();
    assert_eq!(pending.len(), 2, "{pending:?}");
    assert!(pending.iter().all(|r| r.approver.is_none()));
    assert!(matches!(
        vault.approve_admin_request(&alice, &req.id).await,
        Err(Error::PermissionDenied(_))
    ));
    let approved = vault.approve_admin_request(&bob, &req.id).await.unwrap();
    assert_eq!(approved.approver.as_deref(), Some("bob"));
    assert_eq!(approved.operation, "revoke_key");
    assert!(matches!(
        vault.approve_admin_request(&bob, &req.id).await,
        Err(Error::FailedPrecondition(_))
    ));
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(matches!(
        vault.approve_admin_request(&bob, &expired.id).await,
        Err(Error::FailedPrecondition(_))
    ));
    assert!(matches!(
        vault.approve_admin_request(&bob, "req_unknown").await,
        Err(Error::FailedPrecondition(_))
    ));
    let trail = vault.audit_records(1, 1000).await.unwrap();
    let actions: Vec<&str> = trail.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(
        actions.iter().filter(|a| **a == "admin_request").count(),
        2,
        "{actions:?}"
    );
    assert_eq!(
        actions.iter().filter(|a| **a == "admin_approve").count(),
        1,
        "{actions:?}"
    );
    vault.close().await;
}

/// Group commit in a constant number of statements: a TokenizeBatch of 64 (one group) runs
/// one token insert, one audit insert, one head update and one count update, the same
/// statements as a batch of 1 (counted by pg_stat_statements); before, one insert per token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_64_costs_the_statements_of_a_group_of_1() {
    let Some(cluster) = pg::private_cluster_with("-c shared_preload_libraries=pg_stat_statements")
    else {
        return;
    };
    let store = Store::postgres_on(cluster.clone()).unwrap();
    let Store::Postgres { url, .. } = &store else {
        unreachable!()
    };
    let db = pg::db_of(url).to_owned();
    cluster.sql(&db, "CREATE EXTENSION pg_stat_statements");
    let key = MasterKey::generate();
    let vault = Vault::create(store.config(), &key).unwrap();
    let calls = |what: &str| -> i64 {
        cluster
            .query(
                &db,
                &format!(
                    "SELECT COALESCE(SUM(calls), 0) FROM pg_stat_statements \
                     WHERE query LIKE '{what}%'"
                ),
            )
            .trim()
            .parse()
            .unwrap()
    };
    let mut per_batch = Vec::new();
    for n in [1usize, 64] {
        cluster.sql(&db, "SELECT pg_stat_statements_reset()");
        let reqs = (0..n)
            .map(|i| req(PANS[i % 4], TokenFormat::Opaque, false))
            .collect();
        let out = vault.tokenize_batch(&caller(), reqs).await.unwrap();
        assert!(out.iter().all(|r| r.is_ok()));
        per_batch.push((
            calls("INSERT INTO tokens"),
            calls("INSERT INTO audit("),
            calls("UPDATE audit_head"),
            calls("UPDATE data_keys SET encryptions"),
        ));
    }
    assert_eq!(per_batch, vec![(1, 1, 1, 1), (1, 1, 1, 1)]);
    vault.close().await;
}

/// Concurrent reveals share lookup statements: 256 detokenizes sent at once run far fewer
/// than 256 `token = ANY($1)` statements (counted by pg_stat_statements); before, one each.
/// Pooled connections plan generically (`plan_cache_mode`): 40 lookups one after the other are
/// planned at most once per pooled connection; before, 45 times (a custom plan every time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lookups_share_statements_and_generic_plans() {
    let Some(cluster) = pg::private_cluster_with(
        // No autovacuum: an ANALYZE of the new rows would invalidate the cached plans once more.
        "-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track_planning=on \
         -c autovacuum=off",
    ) else {
        return;
    };
    let store = Store::postgres_on(cluster.clone()).unwrap();
    let Store::Postgres { url, .. } = &store else {
        unreachable!()
    };
    let db = pg::db_of(url).to_owned();
    cluster.sql(&db, "CREATE EXTENSION pg_stat_statements");
    let key = MasterKey::generate();
    let vault = Vault::create(store.config(), &key).unwrap();
    let reqs = (0..64)
        .map(|i| req(PANS[i % 4], TokenFormat::Opaque, false))
        .collect();
    let tokens: Vec<Token> = vault
        .tokenize_batch(&caller(), reqs)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap().token)
        .collect();
    cluster.sql(&db, "SELECT pg_stat_statements_reset()");
    let tasks: Vec<_> = (0..256)
        .map(|n| {
            let (vault, token) = (vault.clone(), tokens[n % 64].clone());
            tokio::spawn(async move {
                let r = vault
                    .detokenize(&caller(), token, "t".into())
                    .await
                    .unwrap();
                assert_eq!(r.pan.expose_digits(), PANS[n % 64 % 4]);
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let q = |sql: &str| cluster.query(&db, sql).trim().to_owned();
    let lookups: i64 = q("SELECT COALESCE(SUM(calls), 0) FROM pg_stat_statements \
         WHERE query LIKE 'SELECT token, key_version, nonce, ciphertext%'")
    .parse()
    .unwrap();
    assert!(
        (1..64).contains(&lookups),
        "256 concurrent reveals ran {lookups} lookup statements"
    );
    // Planned once per pooled connection, not per execution: before, `= ANY($1)` got a
    // custom plan every time (the server's generic estimate assumes ten array elements).
    cluster.sql(&db, "SELECT pg_stat_statements_reset()");
    for token in &tokens[..40] {
        vault
            .detokenize(&caller(), token.clone(), "t".into())
            .await
            .unwrap();
    }
    let (calls, plans) = {
        let row = q(
            "SELECT SUM(calls) || '|' || SUM(plans) FROM pg_stat_statements \
             WHERE query LIKE 'SELECT token, key_version, nonce, ciphertext%'",
        );
        let (c, p) = row.split_once('|').unwrap();
        (c.parse::<i64>().unwrap(), p.parse::<i64>().unwrap())
    };
    assert_eq!(calls, 40);
    // At most once per pooled connection (six); before, once per lookup and once more.
    assert!(plans <= 6, "40 lookups planned {plans} times");
    vault.close().await;
}

/// `keys rotate-master --rekey`, stopped after one batch and resumed with the new key:
/// reuse keeps returning the same tokens throughout; afterwards the keys an old backup holds
/// (unwrapped with the old master key) open no stored key, match no stored fingerprint and
/// verify no audit record after the switch; the new key opens everything.
async fn rekey_cuts_off_the_old_master_key(store: Store) {
    use tokenvault::crypto::{AuditKey, FingerprintKey, KeyPurpose, VaultId};
    let old = MasterKey::generate();
    let vault = Vault::create(store.config(), &old).unwrap();
    let pans: Vec<String> = (0..9).map(|n| format!("4111111111{:05}", n)).collect();
    let pans: Vec<String> = pans
        .iter()
        .map(|p| {
            let head = &p[..15];
            let check = tokenvault::card::luhn_check_digit(head.as_bytes());
            format!("{head}{}", check as char)
        })
        .collect();
    let mut tokens = Vec::new();
    for pan in &pans {
        let t = vault
            .tokenize(&caller(), req(pan, TokenFormat::Opaque, true))
            .await
            .unwrap();
        tokens.push(t.token.to_string());
    }
    // What a backup taken now holds.
    let one = |sql: &str| store.blobs(sql).pop().unwrap();
    let vault_id =
        VaultId::from_slice(&one("SELECT value FROM meta WHERE key = 'vault_id'")).unwrap();
    let backup_fp = one("SELECT value FROM meta WHERE key = 'wrapped_fingerprint_key'");
    let backup_audit = one("SELECT value FROM meta WHERE key = 'wrapped_audit_key'");
    let (old_kwk, _) = old.derive(&vault_id);
    let old_fp = FingerprintKey::new(old_kwk.unwrap(&backup_fp, KeyPurpose::Fingerprint).unwrap());
    let old_audit = AuditKey::new(old_kwk.unwrap(&backup_audit, KeyPurpose::Audit).unwrap());
    let scope = caller().reuse_scope();
    let stored_fps =
        |store: &Store| store.blobs("SELECT fingerprint FROM tokens WHERE fingerprint IS NOT NULL");
    // The attack works before the rekey: the test can fail.
    assert!(stored_fps(&store).contains(
        &old_fp
            .scoped_fingerprint(&scope, pans[0].as_bytes())
            .to_vec()
    ));

    let new = MasterKey::generate();
    let opts = tokenvault::vault::RekeyOptions {
        batch: 4,
        max_batches: Some(1),
    };
    let r = vault.rekey(&caller(), &new, &opts, |_| {}).await.unwrap();
    assert!(!r.finished && r.resealed == 4);
    for (pan, token) in pans.iter().zip(&tokens) {
        let t = vault
            .tokenize(&caller(), req(pan, TokenFormat::Opaque, true))
            .await
            .unwrap();
        assert_eq!(&t.token.to_string(), token, "reuse during the rekey");
    }
    vault.close().await;
    assert!(matches!(
        Vault::open(store.config(), &old).map(|_| ()),
        Err(Error::WrongMasterKey)
    ));
    let vault = Vault::open(store.config(), &new).unwrap();
    let opts = tokenvault::vault::RekeyOptions {
        batch: 4,
        max_batches: None,
    };
    let r = vault.rekey(&caller(), &new, &opts, |_| {}).await.unwrap();
    assert!(r.finished && r.resumed && r.resealed == 5 && r.retired == 1);
    let fresh = vault
        .tokenize(
            &caller(),
            req("5555555555554444", TokenFormat::Opaque, true),
        )
        .await
        .unwrap();

    // The old master key and the old backup's keys against the current tables.
    for w in store.blobs("SELECT wrapped FROM data_keys WHERE length(wrapped) > 0") {
        for v in 1..=4 {
            assert!(old_kwk.unwrap(&w, KeyPurpose::Data(v)).is_err());
        }
    }
    assert!(old_kwk
        .unwrap(
            &one("SELECT value FROM meta WHERE key = 'wrapped_audit_key'"),
            KeyPurpose::Audit
        )
        .is_err());
    // The checkpoint signing key the backup holds was replaced when the rekey finished.
    let signers = vault.audit_signing_keys().await.unwrap();
    assert_eq!(signers.len(), 2);
    assert!(!signers[0].active && signers[1].active);
    for w in store.blobs("SELECT wrapped FROM audit_signing_keys WHERE wrapped IS NOT NULL") {
        assert!(old_kwk.unwrap(&w, KeyPurpose::AuditSigning(2)).is_err());
    }
    let fps = stored_fps(&store);
    assert_eq!(fps.len(), 10);
    for pan in pans.iter().map(String::as_str).chain(["5555555555554444"]) {
        assert!(!fps.contains(&old_fp.scoped_fingerprint(&scope, pan.as_bytes()).to_vec()));
    }
    let records = vault.audit_records(1, 10_000).await.unwrap();
    let switch = records
        .iter()
        .find(|r| r.action == "master_rekey")
        .unwrap()
        .seq;
    let mut prev = tokenvault::audit::GENESIS_MAC.to_vec();
    for rec in &records {
        let ok = old_audit.verify(
            &prev,
            &tokenvault::audit::canonical_bytes(rec.seq, &rec.entry()),
            &rec.mac,
        );
        assert_eq!(ok, rec.seq <= switch, "record {}", rec.seq);
        prev = rec.mac.clone();
    }

    // The new key opens everything; the chain verifies across the switch.
    for (pan, token) in pans.iter().zip(&tokens) {
        let r = vault
            .detokenize(
                &caller(),
                tokenvault::token::Token::parse(token).unwrap(),
                "t".into(),
            )
            .await
            .unwrap();
        assert_eq!(r.pan.expose_digits(), pan);
        let t = vault
            .tokenize(&caller(), req(pan, TokenFormat::Opaque, true))
            .await
            .unwrap();
        assert_eq!(&t.token.to_string(), token);
    }
    let again = vault
        .tokenize(
            &caller(),
            req("5555555555554444", TokenFormat::Opaque, true),
        )
        .await
        .unwrap();
    assert_eq!(again.token, fresh.token);
    let v = vault.verify_audit().await.unwrap();
    assert!(v.is_ok(), "{}", v.describe());
    vault.close().await;
}

/// The merge of group commit and rekey: a second store instance (a replica) still holding
/// the replaced keys gets UNAVAILABLE through the serving (group) path after the switch and
/// writes nothing; reloaded with the new master key, `reuse_existing` through concurrent
/// `Vault::tokenize` calls (one group) returns the old tokens, whether the row is already
/// re-layered or not, and after the rekey finishes; one chain verifies across it all.
async fn a_replica_with_the_replaced_keys_is_cut_off_then_reuses_after_reload(store: Store) {
    let old = MasterKey::generate();
    let server = Vault::create(store.config(), &old).unwrap();
    let pans: Vec<String> = (0..6)
        .map(|n| {
            let head = format!("411111111100{:03}", n);
            let check = tokenvault::card::luhn_check_digit(head.as_bytes());
            format!("{head}{}", check as char)
        })
        .collect();
    let mut tokens = Vec::new();
    for pan in &pans {
        let t = server
            .tokenize(&caller(), req(pan, TokenFormat::Opaque, true))
            .await
            .unwrap();
        tokens.push(t.token.to_string());
    }
    let admin = Vault::open(store.config(), &old).unwrap();
    let new = MasterKey::generate();
    let step = tokenvault::vault::RekeyOptions {
        batch: 2,
        max_batches: Some(1),
    };
    let r = admin.rekey(&caller(), &new, &step, |_| {}).await.unwrap();
    assert!(!r.finished && r.resealed == 2);
    let audited = admin.audit_records(1, 10_000).await.unwrap().len();
    let rows = store.blobs("SELECT ciphertext FROM tokens").len();
    // Stale keys: the group path refuses, for a new card and for a reuse alike.
    let stale = concurrently(
        &server,
        pans.iter()
            .map(String::as_str)
            .chain(["5555555555554444"])
            .collect(),
    )
    .await;
    for r in &stale {
        assert!(
            matches!(r, Err(Error::Unavailable(_))),
            "{:?}",
            r.as_ref().map(|_| ())
        );
    }
    assert_eq!(admin.audit_records(1, 10_000).await.unwrap().len(), audited);
    assert_eq!(store.blobs("SELECT ciphertext FROM tokens").len(), rows);

    server.reload_master_key(&new).await.unwrap();
    let check_reuse = |v: &'static str| {
        let server = server.clone();
        let pans = pans.clone();
        let tokens = tokens.clone();
        async move {
            let got = concurrently(&server, pans.iter().map(String::as_str).collect()).await;
            for (t, token) in got.into_iter().zip(&tokens) {
                let t = t.unwrap();
                assert!(!t.created, "{v}: reuse made a new token");
                assert_eq!(&t.token.to_string(), token, "{v}");
            }
        }
    };
    check_reuse("during the rekey").await;
    let fresh = server
        .tokenize(
            &caller(),
            req("5555555555554444", TokenFormat::Opaque, true),
        )
        .await
        .unwrap();
    let r = admin
        .rekey(
            &caller(),
            &new,
            &tokenvault::vault::RekeyOptions {
                batch: 2,
                max_batches: None,
            },
            |_| {},
        )
        .await
        .unwrap();
    assert!(r.finished && r.resumed);
    check_reuse("after the rekey").await;
    let again = server
        .tokenize(
            &caller(),
            req("5555555555554444", TokenFormat::Opaque, true),
        )
        .await
        .unwrap();
    assert_eq!(again.token, fresh.token);
    assert!(!again.created);
    let v = server.verify_audit().await.unwrap();
    assert!(v.is_ok(), "{}", v.describe());
    admin.close().await;
    server.close().await;
}

/// `reuse_existing` tokenize calls issued at once, so the writer takes them as one group.
async fn concurrently(
    vault: &Vault,
    pans: Vec<&str>,
) -> Vec<Result<tokenvault::vault::Tokenized, Error>> {
    let handles: Vec<_> = pans
        .into_iter()
        .map(|p| {
            let (vault, r) = (vault.clone(), req(p, TokenFormat::Opaque, true));
            tokio::spawn(async move { vault.tokenize(&caller(), r).await })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// SQLite reuses the highest id once it is purged: a row written after the switch can sit at
/// an id <= the switch's last id. The re-seal pass must leave it alone (it already has the
/// new key and layer); layered twice, reuse would miss it and silently make a second token.
async fn a_row_written_at_a_reused_id_during_a_rekey_is_not_layered_twice(store: Store) {
    let old = MasterKey::generate();
    let vault = Vault::create(store.config(), &old).unwrap();
    let mut tokens = Vec::new();
    for pan in PANS {
        let t = vault
            .tokenize(&caller(), req(pan, TokenFormat::Opaque, true))
            .await
            .unwrap();
        tokens.push(t.token);
    }
    let new = MasterKey::generate();
    let begin = tokenvault::vault::RekeyOptions {
        batch: 10,
        max_batches: Some(0),
    };
    assert!(
        !vault
            .rekey(&caller(), &new, &begin, |_| {})
            .await
            .unwrap()
            .finished
    );
    // A plain master rotation is refused while the rekey runs (review F).
    match vault.rotate_master(&caller(), &MasterKey::generate()).await {
        Err(Error::FailedPrecondition(m)) => assert!(m.contains("rekey is in progress"), "{m}"),
        other => panic!("rotate-master during a rekey: {:?}", other.map(|_| ())),
    }
    // So is a rewrap (or a retire, which rewraps): a row it moved under the new key would keep
    // its old fingerprint layer, and the re-seal pass below would skip it.
    let rewrap = RewrapOptions::default();
    match vault.rewrap(&caller(), &rewrap, |_| {}).await {
        Err(Error::FailedPrecondition(m)) => assert!(m.contains("rekey is in progress"), "{m}"),
        other => panic!("rewrap during a rekey: {:?}", other.map(|_| ())),
    }
    // And so a revoke of the active version, refused before its first step (a rotation), so
    // nothing changes: the refused command leaves the key versions as they were.
    let versions = |keys: Vec<tokenvault::vault::KeyVersionInfo>| {
        keys.iter()
            .map(|k| (k.version, k.state, k.encryptions))
            .collect::<Vec<_>>()
    };
    let keys = vault.list_keys().await.unwrap();
    let active = keys.iter().find(|k| k.state == KeyState::Active);
    let active = active.expect("an active version").version;
    let before = versions(keys);
    match vault.revoke_key(&caller(), active, 10, |_| {}).await {
        Err(Error::FailedPrecondition(m)) => assert!(m.contains("rekey is in progress"), "{m}"),
        other => panic!("revoke during a rekey: {:?}", other.map(|_| ())),
    }
    assert_eq!(versions(vault.list_keys().await.unwrap()), before);
    // The highest row goes away during the rekey; the next insert may take its id.
    vault.delete(&caller(), tokens[3].clone()).await.unwrap();
    let purge = PurgeOptions {
        deleted: true,
        expired: false,
        older_than: None,
        batch: 10,
    };
    assert_eq!(vault.purge(&caller(), &purge).await.unwrap().deleted, 1);
    let during = vault
        .tokenize(&caller(), req(PANS[3], TokenFormat::Opaque, true))
        .await
        .unwrap();
    assert!(during.created);
    let done = tokenvault::vault::RekeyOptions {
        batch: 10,
        max_batches: None,
    };
    let r = vault.rekey(&caller(), &new, &done, |_| {}).await.unwrap();
    assert!(r.finished);
    assert_eq!(r.resealed, 3, "only the rows from before the switch");
    let again = vault
        .tokenize(&caller(), req(PANS[3], TokenFormat::Opaque, true))
        .await
        .unwrap();
    assert!(!again.created, "reuse made a second token");
    assert_eq!(again.token, during.token);
    for (pan, token) in PANS.iter().zip(&tokens).take(3) {
        let t = vault
            .tokenize(&caller(), req(pan, TokenFormat::Opaque, true))
            .await
            .unwrap();
        assert_eq!(&t.token, token);
    }
    let v = vault.verify_audit().await.unwrap();
    assert!(v.is_ok(), "{v:?}");
    vault.close().await;
}
