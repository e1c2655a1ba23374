//! Sealed start (`serve --unseal-socket PATH`): the server listens before it has a master
//! key. Until K custodians have each handed in a share over a Unix socket, health answers
//! NOT_SERVING and every other RPC UNAVAILABLE; the socket (mode 0600) takes one share file
//! per connection and answers one line. Once the rebuilt key passes the vault's key check the
//! vault opens, the attempts are audited, and the caller serves as usual.
//!
//! A refused share (malformed, another vault, another split, a repeated index) is answered
//! with a message about that share only; the shares already given stay. If K shares rebuild
//! a key that fails the key check (an altered share), all shares are discarded and the
//! custodians start again: which share was bad cannot be told, and must not be guessed at.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::ServingStatus;

use crate::crypto::shares::{Collector, Combine, Share};
use crate::crypto::{MasterKey, VaultId};
use crate::error::{Error, Result};

/// Largest share message accepted on the socket.
const MAX_SHARE_BYTES: usize = 4096;

/// Answers every request but the health service's with UNAVAILABLE.
#[derive(Clone)]
struct SealedLayer;

impl<S> tower::Layer<S> for SealedLayer {
    type Service = Sealed<S>;
    fn layer(&self, inner: S) -> Sealed<S> {
        Sealed { inner }
    }
}

#[derive(Clone)]
struct Sealed<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for Sealed<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path().starts_with("/grpc.health.v1.Health/") {
            return Box::pin(self.inner.call(req));
        }
        let status = tonic::Status::unavailable(
            "the vault is sealed: custodians must unseal it (tokenvault unseal)",
        );
        Box::pin(async move { Ok(status.into_http()) })
    }
}

/// One unseal attempt, audited once the vault is open.
struct Attempt {
    peer: String,
    outcome: &'static str,
    detail: String,
}

/// Serves sealed on a clone of `listener` and takes shares on `socket` until they rebuild
/// this vault's master key; returns the key (checked) and leaves `listener` to the caller.
/// `open` opens the vault with the key; the attempts are then audited through it.
pub async fn unseal(
    listener: &TcpListener,
    socket: &Path,
    location: crate::store::StoreLocation,
    tls: Option<std::sync::Arc<super::tls::TlsReloader>>,
) -> Result<(MasterKey, Vec<(String, &'static str, String)>)> {
    // Any store (SQLite file or PostgreSQL): the header holds what the shares are checked
    // against. Read off the async workers (a PostgreSQL read blocks on its own runtime).
    let header = tokio::task::spawn_blocking(move || location.read_header())
        .await
        .map_err(|e| Error::Internal(format!("read header: {e}")))??;
    let vault_id = VaultId::from_slice(&header.vault_id)
        .ok_or_else(|| Error::Internal("vault id has the wrong length".into()))?;

    // The sealed server shares the listening socket; it stops accepting when unsealed.
    let std_listener = listener
        .as_ref_std_clone()
        .map_err(|e| Error::Unavailable(format!("listener: {e}")))?;
    let sealed_listener = TcpListener::from_std(std_listener)
        .map_err(|e| Error::Unavailable(format!("listener: {e}")))?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    reporter
        .set_service_status(super::SERVICE_NAME, ServingStatus::NotServing)
        .await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        .layer(SealedLayer)
        .add_service(health);
    let stop = async {
        let _ = stop_rx.await;
    };
    // Sealed or not, the port speaks only what the configuration says (TLS when configured).
    let (sealed_server, accept_task) = match tls {
        Some(tls) => {
            let (incoming, task) = super::tls::incoming(sealed_listener, tls);
            (
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, stop)),
                Some(task),
            )
        }
        None => (
            tokio::spawn(
                router.serve_with_incoming_shutdown(TcpListenerStream::new(sealed_listener), stop),
            ),
            None,
        ),
    };

    let unix = bind_private(socket)?;
    let listen = listener
        .local_addr()
        .map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
    tracing::warn!(listen, socket = %socket.display(), "vault sealed: waiting for master-key shares");
    let mut collector = Collector::new();
    let mut attempts = Vec::new();
    let master = loop {
        let (mut conn, _) = unix
            .accept()
            .await
            .map_err(|e| Error::Unavailable(format!("unseal socket: {e}")))?;
        let peer = conn
            .peer_cred()
            .map(|c| format!("uid {} pid {}", c.uid(), c.pid().unwrap_or(0)))
            .unwrap_or_else(|_| "unknown".into());
        let mut buf = zeroize::Zeroizing::new(Vec::with_capacity(MAX_SHARE_BYTES));
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            (&mut conn)
                .take(MAX_SHARE_BYTES as u64 + 1)
                .read_to_end(&mut buf),
        )
        .await;
        let (reply, done) = match read {
            Ok(Ok(_)) if buf.len() <= MAX_SHARE_BYTES => {
                let text = String::from_utf8_lossy(&buf);
                step(
                    &mut collector,
                    &vault_id,
                    &header.key_check,
                    &text,
                    &peer,
                    &mut attempts,
                )
            }
            _ => (
                "refused: no share received (send one share file, at most 4 KiB)".to_owned(),
                None,
            ),
        };
        let _ = conn.write_all(format!("{reply}\n").as_bytes()).await;
        let _ = conn.shutdown().await;
        if let Some(master) = done {
            break master;
        }
    };
    drop(unix);
    let _ = std::fs::remove_file(socket);
    let _ = stop_tx.send(());
    let _ = sealed_server.await;
    if let Some(task) = accept_task {
        task.abort();
    }
    let attempts = attempts
        .into_iter()
        .map(|a: Attempt| (a.peer, a.outcome, a.detail))
        .collect();
    Ok((master, attempts))
}

/// Handles one share; returns the reply and, when the key is rebuilt and checked, the key.
fn step(
    collector: &mut Collector,
    vault_id: &VaultId,
    key_check: &[u8],
    text: &str,
    peer: &str,
    attempts: &mut Vec<Attempt>,
) -> (String, Option<MasterKey>) {
    let mut record = |outcome: &'static str, detail: String| {
        attempts.push(Attempt {
            peer: peer.to_owned(),
            outcome,
            detail,
        })
    };
    let share = match Share::parse(text) {
        Ok(s) => s,
        Err(e) => {
            record("INVALID_ARGUMENT", "malformed share".into());
            return (format!("refused: {e}"), None);
        }
    };
    let index = share.index;
    if let Err(e) = collector.add(vault_id, share) {
        record("FAILED_PRECONDITION", format!("share {index} refused"));
        return (format!("refused: {e}"), None);
    }
    match collector.combine() {
        Err(Combine::NeedMore { have, need }) => {
            record("OK", format!("share {index} accepted ({have} of {need})"));
            (format!("accepted: {have} of {need} shares"), None)
        }
        Ok(Ok(master)) => {
            let (_, check) = master.derive(vault_id);
            if check.matches(key_check) {
                record("OK", format!("share {index} accepted; vault unsealed"));
                (
                    "unsealed: the master key opens this vault".into(),
                    Some(master),
                )
            } else {
                *collector = Collector::new();
                record(
                    "DATA_LOSS",
                    "shares rebuilt a wrong key; all discarded".into(),
                );
                (
                    "refused: these shares rebuild a key that does not open this vault (a share \
                     was altered or is from an older key); all shares were discarded, start again"
                        .into(),
                    None,
                )
            }
        }
        Ok(Err(e)) => {
            *collector = Collector::new();
            record(
                "DATA_LOSS",
                "shares could not be combined; all discarded".into(),
            );
            (
                format!("refused: {e}; all shares were discarded, start again"),
                None,
            )
        }
    }
}

/// Binds the Unix socket with mode 0600 from the start (umask), refusing an existing path.
fn bind_private(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        return Err(Error::FailedPrecondition(format!(
            "unseal socket {} already exists; remove it if no server uses it",
            path.display()
        )));
    }
    // SAFETY: umask has no preconditions; restored right after the bind.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    unsafe { libc::umask(old) };
    bound.map_err(|e| Error::Unavailable(format!("unseal socket {}: {e}", path.display())))
}

/// Sends one share to a sealed server's socket and returns its answer line.
pub async fn send_share(socket: &PathBuf, share: &[u8]) -> std::io::Result<String> {
    let mut conn = tokio::net::UnixStream::connect(socket).await?;
    conn.write_all(share).await?;
    conn.shutdown().await?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply).await?;
    Ok(reply.trim().to_owned())
}

trait CloneStd {
    fn as_ref_std_clone(&self) -> std::io::Result<std::net::TcpListener>;
}

impl CloneStd for TcpListener {
    /// A second handle on the same listening socket (dup), non-blocking for tokio.
    fn as_ref_std_clone(&self) -> std::io::Result<std::net::TcpListener> {
        use std::os::fd::{AsFd, FromRawFd, IntoRawFd};
        let fd = self.as_fd().try_clone_to_owned()?;
        // SAFETY: `fd` is an owned, open listening socket we just duplicated.
        let std = unsafe { std::net::TcpListener::from_raw_fd(fd.into_raw_fd()) };
        std.set_nonblocking(true)?;
        Ok(std)
    }
}
