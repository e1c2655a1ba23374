//! Fills a vault for the rewrap benchmark: `cargo run --release --example rewrap_fill -- DIR ROWS`
//! creates DIR (vault) and DIR.key (master key), tokenizes ROWS test card numbers under
//! version 1 and rotates, so `tokenvault keys rewrap` has ROWS rows to re-encrypt.

use tokenvault::card::Pan;
use tokenvault::crypto::MasterKey;
use tokenvault::token::TokenFormat;
use tokenvault::vault::{Caller, TokenizeRequest, Vault, VaultConfig};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("DIR"));
    let rows: usize = args
        .next()
        .map(|n| n.parse().expect("ROWS"))
        .unwrap_or(1_000_000);
    let key = MasterKey::generate();
    key.write_new_file(&dir.with_extension("key"))
        .expect("write key");
    let vault = Vault::create(VaultConfig::new(&dir), &key).expect("create");
    let caller = Caller::new("bench", "local");
    let start = std::time::Instant::now();
    let mut tasks = Vec::new();
    for chunk in (0..rows).collect::<Vec<_>>().chunks(4096) {
        let (v, c, n) = (vault.clone(), caller.clone(), chunk.len());
        tasks.push(tokio::spawn(async move {
            let reqs = (0..n)
                .map(|_| TokenizeRequest {
                    pan: Pan::parse("4111111111111111").expect("test PAN"),
                    format: TokenFormat::Opaque,
                    reuse_existing: false,
                    expires_at: None,
                })
                .collect();
            v.tokenize_batch(&c, reqs).await.expect("tokenize");
        }));
        if tasks.len() >= 8 {
            tasks.remove(0).await.expect("join");
        }
    }
    for t in tasks {
        t.await.expect("join");
    }
    println!(
        "filled {rows} rows in {:.1}s",
        start.elapsed().as_secs_f64()
    );
    vault.rotate_key(&caller).await.expect("rotate");
    vault.close().await;
}
