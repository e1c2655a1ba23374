//! Storage faults against a real server: a full disk, a disk that stops answering (writes
//! only, or reads too: `faults/fuse_disk.rs`), a database locked by another process, a
//! damaged database file, and wrong or missing master keys. Each promise in the README's
//! "Guarantees" has a test here that fails if the promise breaks.

mod common;
#[path = "faults/fuse_disk.rs"]
mod fuse_disk;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use tokenvault::grpc::pb;
use tokenvault::grpc::server::ServerConfig;
use tokenvault::vault::{Caller, PurgeOptions};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn tokenize_req(pan: &str) -> pb::TokenizeRequest {
    pb::TokenizeRequest {
        pan: pan.into(),
        ..Default::default()
    }
}

async fn health(server: &TestServer) -> ServingStatus {
    let mut h = HealthClient::new(server.channel().await);
    let resp = h
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    resp.into_inner().status()
}

/// Polls `f` until it returns true, for at most `limit`.
async fn eventually(limit: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn token_rows(server: &TestServer) -> i64 {
    server
        .db()
        .query_row("SELECT COUNT(*) FROM tokens", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test]
async fn full_storage_refuses_tokenize_keeps_detokenize_and_recovers_after_purge() {
    let mut server = TestServer::start_with_vault(ServerConfig::default(), |v| {
        v.max_storage_bytes = Some(4 * 1024 * 1024);
    })
    .await;
    let mut checkout = server.client(CHECKOUT).await;
    let mut payments = server.client(PAYMENTS).await;

    // The first tokens expire soon: purging them later is how space gets freed.
    let expiry = std::time::SystemTime::now() + Duration::from_secs(3);
    let expires_at = Some(prost_types::Timestamp::from(expiry));
    let mut tokens = Vec::new();
    let mut n = 0;
    let exhausted = loop {
        let short_lived = n < 4000;
        let batch = pb::TokenizeBatchRequest {
            requests: (0..500)
                .map(|i| pb::TokenizeRequest {
                    pan: test_pan(n + i),
                    expires_at: if short_lived { expires_at } else { None },
                    ..Default::default()
                })
                .collect(),
        };
        n += 500;
        let results = checkout
            .tokenize_batch(batch)
            .await
            .unwrap()
            .into_inner()
            .results;
        let mut full = None;
        for r in results {
            match r.outcome.unwrap() {
                pb::tokenize_batch_result::Outcome::Success(ok) if !short_lived => {
                    tokens.push(ok.token)
                }
                pb::tokenize_batch_result::Outcome::Success(_) => {}
                pb::tokenize_batch_result::Outcome::Error(e) => full = Some(e),
            }
        }
        if let Some(e) = full {
            break e;
        }
        assert!(n < 100_000, "the storage limit never took effect");
    };
    assert_eq!(
        exhausted.code,
        Code::ResourceExhausted as i32,
        "{}",
        exhausted.message
    );

    // Single tokenize: RESOURCE_EXHAUSTED, not INTERNAL, not a hang; nothing partial stored.
    // The limit counts the WAL, which a checkpoint can shrink a moment after the batch was
    // refused, so a few more may fit: keep filling until a single tokenize is refused.
    let mut extra = 0u64;
    let err = loop {
        let rows = token_rows(&server);
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            checkout.tokenize(tokenize_req(&test_pan(999_999 + extra))),
        )
        .await
        .expect("tokenize hung on a full store");
        match r {
            Err(err) => {
                assert_eq!(token_rows(&server), rows, "a refused tokenize stored a row");
                break err;
            }
            Ok(_) => {
                extra += 1;
                assert!(extra < 5_000, "single tokenizes never reached the limit");
            }
        }
    };
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(!has_digit_run(err.message(), 12));

    // Reveals still work: their audit records use the headroom kept for them.
    for t in tokens.iter().take(20) {
        let r = payments
            .detokenize(pb::DetokenizeRequest {
                token: t.clone(),
                reason: "charge".into(),
            })
            .await;
        assert!(
            r.is_ok(),
            "detokenize failed on a full store: {:?}",
            r.err()
        );
    }

    // Free space as an operator would: once the short-lived tokens expired, purge them with
    // a second handle on the live vault (what the CLI does).
    let wait = expiry
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(100)).await;
    let admin = server.reopen_second();
    let opts = PurgeOptions {
        deleted: false,
        expired: true,
        older_than: Some(Duration::ZERO),
        batch: 1000,
    };
    let report = admin.purge(&Caller::cli(), &opts).await.unwrap();
    assert_eq!(report.expired, 4000);
    admin.close().await;
    // Without a restart, tokenize works again, once the WAL the purge wrote (which counts
    // against the limit) has been checkpointed and reset.
    let mut n = 1_000_001;
    assert!(
        eventually(Duration::from_secs(5), async || {
            n += 1;
            checkout.tokenize(tokenize_req(&test_pan(n))).await.is_ok()
        })
        .await,
        "tokenize did not recover after purge"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn locked_database_is_unavailable_not_serving_and_recovers() {
    let mut server = TestServer::start_with_vault(ServerConfig::default(), |v| {
        v.busy_timeout = Duration::from_millis(200);
    })
    .await;
    let mut checkout = server.client(CHECKOUT).await;
    checkout.tokenize(tokenize_req(&test_pan(1))).await.unwrap();
    assert_eq!(health(&server).await, ServingStatus::Serving);

    // Another process takes the write lock and keeps it.
    let locker = server.db();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let err = checkout
        .tokenize(tokenize_req(&test_pan(2)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(!has_digit_run(err.message(), 12));
    assert!(
        eventually(Duration::from_secs(5), async || health(&server).await
            == ServingStatus::NotServing)
        .await,
        "health stayed SERVING while storage was locked"
    );

    locker.execute_batch("ROLLBACK").unwrap();
    assert!(
        eventually(Duration::from_secs(5), async || health(&server).await
            == ServingStatus::Serving)
        .await,
        "health did not recover"
    );
    checkout.tokenize(tokenize_req(&test_pan(3))).await.unwrap();
    server.shutdown().await;
}

/// A small ext4 filesystem in a file, loop-mounted (needs root, as in CI; without it the
/// test says so and does nothing, except under CI=true, where it fails). Unmounted on drop.
struct LoopExt4 {
    dir: tempfile::TempDir,
}

impl LoopExt4 {
    fn mount() -> Option<LoopExt4> {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        std::fs::File::create(&image)
            .unwrap()
            .set_len(128 << 20)
            .unwrap();
        let run = |cmd: &mut Command| cmd.output().map(|o| (o.status.success(), o));
        let made = run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
        let mounted = match made {
            Ok((true, _)) => run(Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(&mnt)),
            other => other,
        };
        match mounted {
            Ok((true, _)) => Some(LoopExt4 { dir }),
            failed => {
                let why = match failed {
                    Ok((_, o)) => String::from_utf8_lossy(&o.stderr).into_owned(),
                    Err(e) => e.to_string(),
                };
                // In CI nothing may be skipped for lack of a component: there it fails.
                assert!(
                    std::env::var_os("CI").is_none(),
                    "CI must run the hung-disk test as root with mkfs.ext4 and loop devices: {why}"
                );
                eprintln!("SKIPPED: cannot loop-mount an ext4 image ({why}); run as root");
                None
            }
        }
    }

    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for LoopExt4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).output();
    }
}

/// A filesystem frozen with FIFREEZE, as `fsfreeze -f` does: every write to it, and every
/// fsync, blocks in the kernel until it is thawed. To the vault this is a disk that stopped
/// answering (a hung volume), not one that fails. Thawed on drop, and by a watchdog after two
/// minutes whatever happens, so a failing test cannot leave threads stuck in the kernel.
struct Frozen {
    dir: std::fs::File,
}

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` from linux/fs.h.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

impl Frozen {
    fn freeze(path: &std::path::Path) -> Frozen {
        use std::os::fd::AsRawFd;
        let dir = std::fs::File::open(path).unwrap();
        // SAFETY: a valid descriptor of the filesystem's directory; the argument is unused.
        let r = unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE as _, 0) };
        assert_eq!(r, 0, "FIFREEZE: {}", std::io::Error::last_os_error());
        let watchdog = dir.try_clone().unwrap();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(120));
            // SAFETY: as above; EINVAL when already thawed.
            unsafe { libc::ioctl(watchdog.as_raw_fd(), FITHAW as _, 0) };
        });
        Frozen { dir }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: as in `freeze`.
        unsafe { libc::ioctl(self.dir.as_raw_fd(), FITHAW as _, 0) };
    }
}

type Client = tokenvault::grpc::client::Client;

async fn reveal(
    mut client: Client,
    token: String,
) -> Result<tonic::Response<pb::DetokenizeResponse>, tonic::Status> {
    client
        .detokenize(pb::DetokenizeRequest {
            token,
            reason: "charge".into(),
        })
        .await
}

/// `n` cards stored through `checkout`: (token, card number).
async fn store_cards(checkout: &mut Client, n: u64) -> Vec<(String, String)> {
    let mut stored = Vec::new();
    for n in 0..n {
        let pan = test_pan(n);
        let token = checkout
            .tokenize(tokenize_req(&pan))
            .await
            .unwrap()
            .into_inner()
            .token;
        stored.push((token, pan));
    }
    stored
}

/// Both calls refused with UNAVAILABLE, neither message carrying a run of digits.
fn assert_unavailable<A, B>(
    tokenized: Result<A, tonic::Status>,
    revealed: Result<B, tonic::Status>,
) {
    for (what, status) in [
        ("tokenize", tokenized.map(|_| ()).unwrap_err()),
        ("detokenize", revealed.map(|_| ()).unwrap_err()),
    ] {
        assert_eq!(
            status.code(),
            Code::Unavailable,
            "{what}: {}",
            status.message()
        );
        assert!(
            !has_digit_run(status.message(), 12),
            "{what}: {}",
            status.message()
        );
    }
}

/// Once the disk answers again: SERVING without a restart, every stored token reveals its
/// own card, a new card is stored, and the audit chain verifies.
async fn assert_recovers(
    server: &TestServer,
    checkout: &mut Client,
    payments: &Client,
    stored: &[(String, String)],
) {
    assert!(
        eventually(Duration::from_secs(10), async || health(server).await
            == ServingStatus::Serving)
        .await,
        "health did not recover once the disk answered"
    );
    for (token, pan) in stored {
        let got = reveal(payments.clone(), token.clone())
            .await
            .unwrap()
            .into_inner()
            .pan;
        assert!(&got == pan, "a stored token revealed another card");
    }
    checkout
        .tokenize(tokenize_req(&test_pan(102)))
        .await
        .unwrap();
    match server.vault.verify_audit().await.unwrap() {
        tokenvault::audit::Verification::Ok { .. } => {}
        other => panic!("audit chain after the hang: {other:?}"),
    }
}

/// A disk that stops answering (writes and fsyncs hang, nothing fails) must not hold callers
/// for as long as it hangs, nor keep health SERVING: a waiting write gives up within the
/// store's bound, health goes NOT_SERVING, later writes are refused at once, a reveal gives no
/// PAN without its audit record, and once the disk answers again everything recovers without
/// a restart, every stored token reveals, and the audit chain is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_stops_answering_fails_fast_and_recovers() {
    let Some(fs) = LoopExt4::mount() else { return };
    let mut server = TestServer::start_in(&fs.path(), ServerConfig::default(), |_| {}).await;
    let mut checkout = server.client(CHECKOUT).await;
    let payments = server.client(PAYMENTS).await;
    let stored = store_cards(&mut checkout, 20).await;
    assert_eq!(health(&server).await, ServingStatus::Serving);

    let frozen = Frozen::freeze(&fs.path());
    let started = Instant::now();
    let (tokenized, revealed) = tokio::join!(
        checkout.tokenize(tokenize_req(&test_pan(100))),
        reveal(payments.clone(), stored[0].0.clone()),
    );
    let waited = started.elapsed();
    assert_unavailable(tokenized, revealed);
    assert!(
        waited < Duration::from_secs(20),
        "callers were held {waited:?} by a hung disk"
    );
    assert!(
        eventually(Duration::from_secs(10), async || health(&server).await
            == ServingStatus::NotServing)
        .await,
        "health stayed SERVING on a disk that stopped answering"
    );
    // Now refused at once, not queued behind the stuck write.
    let again = Instant::now();
    let refused = checkout.tokenize(tokenize_req(&test_pan(101))).await;
    assert_eq!(refused.unwrap_err().code(), Code::Unavailable);
    let refused = reveal(payments.clone(), stored[1].0.clone()).await;
    assert_eq!(refused.unwrap_err().code(), Code::Unavailable);
    assert!(
        again.elapsed() < Duration::from_secs(2),
        "a stalled store queued new writes for {:?}",
        again.elapsed()
    );

    drop(frozen);
    assert_recovers(&server, &mut checkout, &payments, &stored).await;
    server.shutdown().await;
}

/// The health check, bounded: a server whose runtime is stuck does not answer at all.
async fn health_within(server: &TestServer, limit: Duration) -> Option<ServingStatus> {
    tokio::time::timeout(limit, health(server)).await.ok()
}

/// Thaws the FUSE disk on drop, so a failing test cannot leave threads waiting on it.
struct Thaw(fuse_disk::Switch);

impl Drop for Thaw {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

/// A disk that stops answering reads too (a hung volume: a read that misses the page cache
/// waits in the kernel, nothing fails). A lookup runs on a runtime worker when a point-read
/// connection is free, and a worker waiting in the kernel serves nothing else; when every
/// worker held one, the server stopped answering altogether, health checks included. Now at
/// least one worker stays free: health answers and goes NOT_SERVING, later reveals and
/// tokenizes are refused at once, and once the disk answers everything recovers without a
/// restart, with every card where it was and the audit chain whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_stops_answering_reads_leaves_the_server_answering() {
    let Some(disk) = fuse_disk_or_skip() else {
        return;
    };
    let mut server = TestServer::start_in(disk.path(), ServerConfig::default(), |_| {}).await;
    let mut checkout = server.client(CHECKOUT).await;
    let stored = store_cards(&mut checkout, 20).await;
    assert_eq!(health(&server).await, ServingStatus::Serving);

    let thaw = freeze_reads(&disk);
    let started = Instant::now();
    // The first reveals meet the hung disk in their lookups.
    let mut hung = Vec::new();
    for (token, _) in &stored[..3] {
        let client = server.client(PAYMENTS).await;
        hung.push(tokio::spawn(reveal(client, token.clone())));
    }
    let mut answered = false;
    let mut not_serving = false;
    while started.elapsed() < Duration::from_secs(15) {
        match health_within(&server, Duration::from_secs(2)).await {
            Some(ServingStatus::NotServing) => {
                (answered, not_serving) = (true, true);
                break;
            }
            Some(_) => answered = true,
            None => break,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        answered && not_serving,
        "health on a disk that stopped answering reads: answered {answered}, NOT_SERVING \
         {not_serving}, after {:?}",
        started.elapsed()
    );
    // Refused at once, not queued behind the stuck reads.
    let payments = server.client(PAYMENTS).await;
    let again = Instant::now();
    let (tokenized, revealed) = tokio::join!(
        checkout.tokenize(tokenize_req(&test_pan(100))),
        reveal(payments.clone(), stored[10].0.clone()),
    );
    assert_unavailable(tokenized, revealed);
    assert!(
        again.elapsed() < Duration::from_secs(2),
        "a stalled store held new requests for {:?}",
        again.elapsed()
    );

    drop(thaw);
    // The reveals that waited on the disk end with their own card or UNAVAILABLE (their
    // audit record's write gave up), never another card.
    for (task, (_, pan)) in hung.into_iter().zip(&stored) {
        match task.await.unwrap() {
            Ok(r) => assert!(&r.into_inner().pan == pan, "a reveal gave another card"),
            Err(status) => assert_eq!(status.code(), Code::Unavailable, "{}", status.message()),
        }
    }
    assert_recovers(&server, &mut checkout, &payments, &stored).await;
    server.shutdown().await;
}

/// Mounts the FUSE disk, or says why not (a failure in CI, where nothing may be skipped).
fn fuse_disk_or_skip() -> Option<fuse_disk::FuseDisk> {
    match fuse_disk::FuseDisk::mount() {
        Ok(disk) => Some(disk),
        Err(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run the hung-read tests as root with /dev/fuse: {why}"
            );
            eprintln!("SKIPPED: cannot mount a FUSE filesystem ({why}); run as root");
            None
        }
    }
}

/// Freezes the disk and drops the clean cached pages, so reads reach the (now silent) disk;
/// thawed when the guard drops, and by a watchdog after two minutes whatever happens.
fn freeze_reads(disk: &fuse_disk::FuseDisk) -> Thaw {
    let watchdog = disk.switch.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(120));
        watchdog.set(false);
    });
    disk.switch.set(true);
    std::fs::write("/proc/sys/vm/drop_caches", "1").unwrap();
    Thaw(disk.switch.clone())
}

/// A flood of lookups (GetTokenInfo) and reveals on a disk whose reads hang, sent before the
/// store could notice the stall. Lookups go to the reader threads: their queue fills, and
/// what does not fit is refused with UNAVAILABLE at once. Reveals go to the writer (lookup
/// and audit record in one group), whose bounded queue holds them at most `WRITE_WAIT`
/// without blocking a runtime worker. The server keeps answering meanwhile (a full read
/// queue used to block the runtime worker that submitted to it, and with it every request
/// on that worker), and once the disk answers every request ends with its own token or card
/// or UNAVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_on_a_hung_disk_is_refused_beyond_the_queues() {
    let Some(disk) = fuse_disk_or_skip() else {
        return;
    };
    let mut server = TestServer::start_in(disk.path(), ServerConfig::default(), |_| {}).await;
    let mut checkout = server.client(CHECKOUT).await;
    let stored = store_cards(&mut checkout, 20).await;
    // Enough connections for the flood: each admits 64 requests at a time.
    let mut clients = Vec::new();
    for _ in 0..26 {
        clients.push(server.client(PAYMENTS).await);
    }

    let thaw = freeze_reads(&disk);
    let started = Instant::now();
    let mut flood = Vec::new();
    for i in 0..1_500 {
        let (token, pan) = stored[i % stored.len()].clone();
        let mut client = clients[i % clients.len()].clone();
        flood.push(tokio::spawn(async move {
            // Every fifth a reveal; the rest lookups. Each answers with what it asked for.
            let answer = if i % 5 == 0 {
                reveal(client, token.clone())
                    .await
                    .map(|r| r.into_inner().pan == pan)
            } else {
                client
                    .get_token_info(pb::GetTokenInfoRequest {
                        token: token.clone(),
                    })
                    .await
                    .map(|r| r.into_inner().info.is_some_and(|info| info.token == token))
            };
            (answer, Instant::now())
        }));
    }
    // Refusals come back at once, long before a stalled read is noticed (5 s).
    let mut refused = 0;
    while started.elapsed() < Duration::from_secs(4) && refused == 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Nothing can succeed while the disk is silent: a finished request was refused.
        refused = flood.iter().filter(|t| t.is_finished()).count();
    }
    assert!(
        refused > 0,
        "nothing was refused within {:?}: a full read queue held them",
        started.elapsed()
    );
    assert!(
        health_within(&server, Duration::from_secs(2))
            .await
            .is_some(),
        "health did not answer during the flood"
    );

    drop(thaw);
    let (mut ok, mut unavailable, mut queue_full) = (0, 0, 0);
    for task in flood {
        let (result, at) = task.await.unwrap();
        match result {
            Ok(own) => {
                assert!(
                    own,
                    "a request was answered with another token's card or info"
                );
                ok += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
                assert!(!has_digit_run(status.message(), 12), "{}", status.message());
                if status.message().contains("reads are already waiting") {
                    queue_full += 1;
                    assert!(
                        at.duration_since(started) < Duration::from_secs(4),
                        "a full queue refused late: {:?}",
                        at.duration_since(started)
                    );
                }
                unavailable += 1;
            }
        }
    }
    assert!(
        queue_full > 0 && ok + unavailable == 1_500,
        "{ok} ok, {unavailable} refused, {queue_full} of them for a full queue"
    );
    eprintln!("{ok} ok, {unavailable} refused, {queue_full} of them for a full queue");
    let payments = server.client(PAYMENTS).await;
    assert_recovers(&server, &mut checkout, &payments, &stored).await;
    server.shutdown().await;
}

// ---- the binary refuses to start on bad storage or bad keys ----

fn bin() -> Command {
    common::tokenvault_command()
}

/// Runs `serve` on an ephemeral loopback port and expects it to refuse to start.
fn serve_refuses(
    data: &std::path::Path,
    key_args: &[&str],
    envs: &[(&str, &str)],
) -> (i32, String) {
    let mut cmd = bin();
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(data)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .args(key_args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.stdin(std::process::Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "serve started: {stderr}");
    assert!(!stderr.contains("serving"), "serve bound a port: {stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

fn init_vault(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let data = dir.join("data");
    let key = dir.join("master.key");
    let out = bin()
        .args(["init", "--data-dir"])
        .arg(&data)
        .arg("--generate-master-key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (data, key)
}

fn write_mode(path: &std::path::Path, bytes: &[u8], mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn wrong_or_missing_master_keys_are_refused_each_with_its_own_message() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _key) = init_vault(dir.path());
    let db = data.join("vault.db");
    let before = std::fs::read(&db).unwrap();

    let other = dir.path().join("other.key");
    tokenvault::crypto::MasterKey::generate()
        .write_new_file(&other)
        .unwrap();
    let open = dir.path().join("open.key");
    write_mode(&open, &std::fs::read(&other).unwrap(), 0o644);
    let empty = dir.path().join("empty.key");
    write_mode(&empty, b"", 0o600);
    let short = dir.path().join("short.key");
    write_mode(&short, b"AAAAAAAAAAAAAAAAAAAAAA==\n", 0o600);
    let missing = dir.path().join("missing.key");

    type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "wrong key",
            vec!["--master-key-file", other.to_str().unwrap()],
            vec![],
            "master key does not match",
        ),
        (
            "readable by others",
            vec!["--master-key-file", open.to_str().unwrap()],
            vec![],
            "chmod 600",
        ),
        (
            "missing file",
            vec!["--master-key-file", missing.to_str().unwrap()],
            vec![],
            "does not exist",
        ),
        (
            "empty file",
            vec!["--master-key-file", empty.to_str().unwrap()],
            vec![],
            "empty",
        ),
        (
            "wrong length",
            vec!["--master-key-file", short.to_str().unwrap()],
            vec![],
            "wrong length",
        ),
        (
            "wrong length (env)",
            vec![],
            vec![("TOKENVAULT_MASTER_KEY", "AAAA")],
            "wrong length",
        ),
    ];
    let mut messages = std::collections::HashSet::new();
    for (name, args, envs, expect) in cases {
        let (code, stderr) = serve_refuses(&data, &args, &envs);
        assert_eq!(code, 3, "{name}: exit code {code}: {stderr}");
        assert!(stderr.contains(expect), "{name}: {stderr}");
        messages.insert(stderr.lines().last().unwrap_or_default().to_owned());
        assert_eq!(
            std::fs::read(&db).unwrap(),
            before,
            "{name}: database bytes changed"
        );
    }
    assert!(
        messages.len() >= 5,
        "messages are not distinct: {messages:?}"
    );
}

#[test]
fn garbage_or_truncated_database_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (data, key) = init_vault(dir.path());
    let db = data.join("vault.db");
    let key = key.to_str().unwrap().to_owned();
    let original = std::fs::read(&db).unwrap();

    for (name, bytes) in [
        (
            "garbage",
            b"this is not a database, just bytes that happen to be here".repeat(100),
        ),
        ("truncated", original[..original.len().min(1000)].to_vec()),
    ] {
        std::fs::write(&db, &bytes).unwrap();
        let _ = std::fs::remove_file(data.join("vault.db-wal"));
        let _ = std::fs::remove_file(data.join("vault.db-shm"));
        let (code, stderr) = serve_refuses(&data, &["--master-key-file", &key], &[]);
        assert_ne!(code, 0, "{name}");
        assert!(
            stderr.contains("damaged")
                || stderr.contains("not a tokenvault database")
                || stderr.contains("not a database"),
            "{name}: unclear message: {stderr}"
        );
        assert_eq!(
            std::fs::read(&db).unwrap(),
            bytes,
            "{name}: the damaged file was modified"
        );
    }
}
