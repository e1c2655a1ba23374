//! JSON logs as a log pipeline ingests them, from a real `tokenvault serve` child: one flat
//! object per line (no nested `fields`/`span` objects), every key once (a failed RPC used to
//! carry two `"message"` keys and lose the event name), a request id on every RPC's lines, and
//! the W3C `traceparent` trace id when the caller sends one (ignored when malformed).

mod common;

use std::collections::BTreeSet;
use std::io::BufRead;
use std::time::Duration;

use serde::de::{Deserializer, MapAccess, Visitor};
use tokenvault::auth::Role;
use tokenvault::crypto::MasterKey;
use tokenvault::grpc::client::{endpoint, with_auth, BearerAuth};
use tokenvault::grpc::pb;
use tokenvault::vault::{Caller, Vault, VaultConfig};

/// A JSON object's members in order, duplicates kept (serde_json's `Map` would drop them).
struct Pairs(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Pairs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Pairs, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Pairs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Pairs, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, serde_json::Value>()? {
                    out.push((k, v));
                }
                Ok(Pairs(out))
            }
        }
        d.deserialize_map(V)
    }
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[tokio::test]
async fn json_lines_are_flat_unique_and_carry_request_and_trace_ids() {
    check_lines(true).await;
}

/// Without `--access-log` a successful request writes no INFO line (issue 14: one line per
/// request cost 11% of throughput); failed and refused requests are still logged.
#[tokio::test]
async fn successful_requests_are_logged_only_with_the_access_log() {
    check_lines(false).await;
}

async fn check_lines(access_log: bool) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let key_file = dir.path().join("master.key");
    let master = MasterKey::generate();
    master.write_new_file(&key_file).unwrap();
    let vault = Vault::create(VaultConfig::new(&data), &master).unwrap();
    let api_key = vault
        .add_client(&Caller::cli(), "checkout", &[Role::Tokenize], None)
        .await
        .unwrap();
    vault.close().await;

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tokenvault"))
        .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
        .arg(format!("--access-log={access_log}"))
        .arg("--data-dir")
        .arg(&data)
        .arg("--master-key-file")
        .arg(&key_file)
        .env_remove("TOKENVAULT_MASTER_KEY")
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = |timeout: Duration| rx.recv_timeout(timeout).ok();
    let mut lines = Vec::new();
    let listen = loop {
        let line = next(Duration::from_secs(30)).expect("no serving line in time");
        lines.push(line.clone());
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["message"] == "serving" {
            break v["listen"]
                .as_str()
                .expect("serving line without listen")
                .to_owned();
        }
    };

    let channel = endpoint(&format!("http://{listen}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = with_auth(channel.clone(), BearerAuth::new(Some(&api_key)).unwrap());
    // A failed RPC (bad card number) with a trace context.
    let mut req = tonic::Request::new(pb::TokenizeRequest {
        pan: "12345".into(),
        ..Default::default()
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    let status = client.tokenize(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    // A successful one, and one with a malformed traceparent.
    let mut req = tonic::Request::new(pb::TokenizeRequest {
        pan: common::test_pan(1),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("traceparent", "00-nothex-1-01".parse().unwrap());
    client.tokenize(req).await.unwrap();
    // Refused before its body is read (no API key).
    let mut anonymous = with_auth(channel, BearerAuth::new(None).unwrap());
    let refused = anonymous
        .tokenize(pb::TokenizeRequest {
            pan: common::test_pan(2),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    while let Some(line) = next(Duration::from_millis(1500)) {
        lines.push(line);
    }
    let _ = child.kill();
    let _ = child.wait();

    let mut objects = Vec::new();
    for line in &lines {
        let Pairs(pairs) =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not one object ({e}): {line}"));
        let mut keys = BTreeSet::new();
        for (k, v) in &pairs {
            assert!(keys.insert(k.clone()), "key {k} twice: {line}");
            assert!(
                !v.is_object() && !v.is_array(),
                "nested value under {k}: {line}"
            );
        }
        for k in ["timestamp", "level", "target", "message"] {
            assert!(keys.contains(k), "no {k}: {line}");
        }
        let obj: serde_json::Map<_, _> = pairs.into_iter().collect();
        objects.push(obj);
    }
    let find = |message: &str| -> Vec<&serde_json::Map<String, serde_json::Value>> {
        objects.iter().filter(|o| o["message"] == message).collect()
    };

    let failed = find("rpc failed");
    assert_eq!(failed.len(), 1, "{lines:#?}");
    let failed = failed[0];
    assert_eq!(failed["code"], "InvalidArgument", "{failed:?}");
    assert_eq!(failed["method"], "Tokenize", "{failed:?}");
    assert_eq!(failed["principal"], "checkout", "{failed:?}");
    assert_eq!(failed["trace_id"], TRACE_ID, "{failed:?}");
    assert!(failed["error"].is_string(), "{failed:?}");
    let is_request_id = |v: &serde_json::Value| {
        v.as_str()
            .is_some_and(|s| s.len() == 16 && s.chars().all(|c| c.is_ascii_hexdigit()))
    };
    assert!(is_request_id(&failed["request_id"]), "{failed:?}");

    let refused = find("rpc refused before its body was read");
    assert_eq!(refused.len(), 1, "{lines:#?}");
    assert!(is_request_id(&refused[0]["request_id"]), "{:?}", refused[0]);
    assert_eq!(refused[0]["code"], "Unauthenticated");
    // The card number of the successful call appears nowhere.
    for line in &lines {
        assert!(!line.contains(&common::test_pan(1)), "{line}");
    }
    let finished = find("rpc finished");
    if !access_log {
        assert!(finished.is_empty(), "{lines:#?}");
        return;
    }
    assert_eq!(finished.len(), 1, "{lines:#?}");
    assert!(is_request_id(&finished[0]["request_id"]));
    assert_ne!(finished[0]["request_id"], failed["request_id"]);
    assert!(
        !finished[0].contains_key("trace_id"),
        "a malformed traceparent was logged: {:?}",
        finished[0]
    );
}
