//! Issue 14: the write-ahead log stays bounded under writes that never pause.
//!
//! The background checkpointer runs PASSIVE checkpoints, which never block anyone and so
//! never catch up with a writer that always has the next group queued: without the writer
//! resetting the WAL itself, `vault.db-wal` grows for as long as the load lasts. Here 64
//! tasks tokenize without pause until several times the bound has been written, while a
//! thread samples the WAL's size. The bound is `limits.max_wal_bytes` (64 MiB by default),
//! 2 MiB here so that a debug build fills it many times over in a few seconds.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenvault::card::Pan;
use tokenvault::crypto::MasterKey;
use tokenvault::token::TokenFormat;
use tokenvault::vault::{Caller, TokenizeRequest, Vault, VaultConfig};

const WAL_BOUND: u64 = 2 << 20;
const WRITES: u64 = 40_000;

fn pan(n: u64) -> Pan {
    Pan::parse(&common::test_pan(n)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_stays_bounded_under_writes_that_never_pause() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = VaultConfig::new(dir.path());
    config.max_wal_bytes = Some(WAL_BOUND);
    let vault = Arc::new(Vault::create(config, &MasterKey::generate()).unwrap());
    let wal = dir.path().join("vault.db-wal");

    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let written = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak, wal) = (stop.clone(), peak.clone(), wal.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(m) = std::fs::metadata(&wal) {
                    peak.fetch_max(m.len(), Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };

    // Enough writes to fill the bound several times over (each group writes the pages of its
    // rows, their index entries and audit records), and a time cap so a slow machine ends.
    let deadline = Instant::now() + Duration::from_secs(40);
    let caller = Caller::new("load", "local");
    let mut tasks = Vec::new();
    for t in 0..64u64 {
        let (vault, caller, written) = (vault.clone(), caller.clone(), written.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = t;
            while Instant::now() < deadline && written.load(Ordering::Relaxed) < WRITES {
                let req = TokenizeRequest {
                    pan: pan(n),
                    format: TokenFormat::Opaque,
                    reuse_existing: false,
                    expires_at: None,
                };
                vault.tokenize(&caller, req).await.unwrap();
                n += 64;
                written.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();

    let peak = peak.load(Ordering::Relaxed);
    let writes = written.load(Ordering::Relaxed);
    eprintln!("{writes} tokenizes, WAL peak {peak} bytes, bound {WAL_BOUND}");
    assert!(
        writes >= 10_000,
        "the load did too little to show anything: {writes} writes"
    );
    // One group's frames may land past the check that runs between groups.
    assert!(
        peak <= WAL_BOUND + WAL_BOUND / 2,
        "WAL reached {peak} bytes under load; the bound is {WAL_BOUND}"
    );
    // The vault still answers and every write is there.
    let db = rusqlite::Connection::open(dir.path().join("vault.db")).unwrap();
    let rows: u64 = db
        .query_row("SELECT count(*) FROM tokens", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, writes);
}
