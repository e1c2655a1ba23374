//! Issue 11 item 6: a request is authenticated and authorised from its headers before its
//! body is decoded, and a batch's items are counted before they are. Runs the real
//! `tokenvault serve` and reads its peak RSS (VmHWM) from /proc.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use prost::bytes::{Buf, BufMut, Bytes};
use tokenvault::auth::Role;
use tokenvault::crypto::MasterKey;
use tokenvault::vault::{Caller, Vault, VaultConfig};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Sends pre-encoded message bytes as they are; ignores the response message.
#[derive(Clone, Copy, Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = ();
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        let n = src.remaining();
        src.advance(n);
        Ok(Some(()))
    }
}

async fn raw_call(channel: Channel, key: &str, method: &str, body: Bytes) -> Status {
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20);
    grpc.ready().await.expect("ready");
    let mut req = tonic::Request::new(body);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let path = format!("/tokenvault.v1.TokenVaultService/{method}")
        .parse()
        .unwrap();
    match grpc.unary::<Bytes, (), _>(req, path, RawCodec).await {
        Ok(_) => Status::ok(""),
        Err(s) => s,
    }
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

fn start(data: &Path, key: &Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenvault"))
        .env_remove("TOKENVAULT_MASTER_KEY")
        .env_remove("RUST_LOG")
        .env_remove("TOKENVAULT_DATA_DIR")
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "info",
            "--data-dir",
        ])
        .arg(data)
        .arg("--master-key-file")
        .arg(key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("listen="))
            {
                if line.contains("serving") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.trim_matches('"').to_owned());
                    }
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("server did not report its address");
    (child, addr)
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TokenizeBatch message of about `bytes` bytes of empty items (two bytes each).
fn empty_items_batch(bytes: usize) -> Bytes {
    let mut v = Vec::with_capacity(bytes);
    while v.len() + 2 <= bytes {
        v.extend_from_slice(&[0x0a, 0x00]);
    }
    Bytes::from(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unauthenticated_and_oversized_batches_are_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let key_file = dir.path().join("master.key");
    let master = MasterKey::generate();
    master.write_new_file(&key_file).unwrap();
    let (checkout, payments) = {
        let vault = Vault::create(VaultConfig::new(&data), &master).unwrap();
        let c = vault
            .add_client(&Caller::cli(), "checkout", &[Role::Tokenize], None)
            .await
            .unwrap();
        let p = vault
            .add_client(&Caller::cli(), "payments", &[Role::Detokenize], None)
            .await
            .unwrap();
        vault.close().await;
        (c, p)
    };
    let (child, addr) = start(&data, &key_file);
    let server = Killed(child);
    let pid = server.0.id();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // Warm up: one ordinary call, so the baseline includes the server's working set.
    let small = Bytes::from_static(&[
        0x0a, 0x12, 0x0a, 0x10, b'4', b'1', b'1', b'1', b'1', b'1', b'1', b'1', b'1', b'1', b'1',
        b'1', b'1', b'1', b'1', b'1',
    ]);
    let st = raw_call(channel.clone(), &checkout, "TokenizeBatch", small).await;
    assert_eq!(st.code(), Code::Ok, "{st:?}");
    let before = vm_hwm_kib(pid);

    // About 6 MB of empty items: three million of them.
    let batch = empty_items_batch(6 << 20);
    let cases: [(&str, &str, Code); 3] = [
        ("a bogus key", "tvk_bogus_bogus", Code::Unauthenticated),
        (
            "a key without the tokenize role",
            &payments,
            Code::PermissionDenied,
        ),
        (
            "a valid key, too many items",
            &checkout,
            Code::InvalidArgument,
        ),
    ];
    for (case, key, want) in cases {
        let calls = (0..4).map(|_| {
            let channel = channel.clone();
            let key = key.to_owned();
            let batch = batch.clone();
            tokio::spawn(async move { raw_call(channel, &key, "TokenizeBatch", batch).await })
        });
        for call in calls {
            let status = tokio::time::timeout(Duration::from_secs(60), call)
                .await
                .expect("answered in time")
                .unwrap();
            assert_eq!(status.code(), want, "{case}: {status:?}");
        }
        let after = vm_hwm_kib(pid);
        let grown_mib = after.saturating_sub(before) / 1024;
        eprintln!("{case}: VmHWM {before} kB -> {after} kB (+{grown_mib} MiB)");
        assert!(
            grown_mib < 100,
            "{case}: peak RSS grew by {grown_mib} MiB (from {before} kB to {after} kB)"
        );
    }
}
