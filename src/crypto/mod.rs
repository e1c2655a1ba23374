//! The only module that touches raw key bytes or imports `aes-gcm`, `hkdf`, `hmac` and `sha2`.
//!
//! Envelope encryption: a [`MasterKey`] supplied from outside derives, through HKDF-SHA256 with
//! the vault id as salt and fixed versioned labels, a [`KeyWrappingKey`] and a [`KeyCheck`].
//! Random [`SecretKey`]s (data, fingerprint, audit) are stored only wrapped under the
//! key-wrapping key. A [`DataKey`] seals each PAN with AES-256-GCM, a fresh 96-bit nonce and
//! AAD binding the ciphertext to its token, key version and metadata (row format 2). Every decryption failure is the
//! same opaque [`DecryptError`].
//!
//! # Key hierarchy
//!
//! ```text
//!  master key (32 bytes; key file or operator; never in the vault database)
//!    │
//!    │  HKDF-SHA256(salt = vault id, ikm = master key)
//!    ├── info "tokenvault/v1/kwk" ─────────► KeyWrappingKey (AES-256-GCM, derived, never stored)
//!    └── info "tokenvault/v1/key-check" ───► KeyCheck (stored; detects a wrong master key)
//!
//!  KeyWrappingKey wraps random SecretKeys; only the 60-byte wrapped forms are stored:
//!    ├── data key v1, v2, … ──► DataKey         AES-256-GCM over each PAN
//!    ├── fingerprint key ─────► FingerprintKey  HMAC-SHA256 PAN fingerprint (de-duplication)
//!    ├── audit key ───────────► AuditKey        HMAC-SHA256 chain over audit records
//!    └── audit signing key n ─► AuditSigningKey Ed25519 (seed), signs audit checkpoints
//! ```
//!
//! The audit trail is also chained by plain SHA-256 ([`audit_chain_hash`], no secret), so
//! anyone holding the records, the signed checkpoints and the signing key's public half
//! ([`AuditPublicKey`]) can check it without the master key.
//!
//! No PAN is ever encrypted directly under a derived key, so changing the master key only
//! needs the stored keys re-wrapped, and rotating a data key only adds a version.
//!
//! # Labels (domain separation)
//!
//! Every use of a key binds a distinct, versioned label, so no output of one construction can
//! be replayed as an input or output of another.
//!
//! | Label                              | Used as            | Full input                                                   |
//! |------------------------------------|--------------------|--------------------------------------------------------------|
//! | `tokenvault/v1/kwk`                | HKDF info          | 32-byte key-wrapping key                                     |
//! | `tokenvault/v1/key-check`          | HKDF info          | 32-byte [`KeyCheck`]                                          |
//! | `tokenvault/v1/wrap/`              | AES-GCM AAD prefix | `…wrap/` ‖ `data` ‖ version u32 BE, or `fingerprint`, or `audit`, or `signing`/`layer` ‖ n u32 BE, or `retired-audit` ‖ from u64 BE |
//! | `tokenvault/v1/pan`                | AES-GCM AAD prefix | `…pan` ‖ version u32 BE ‖ token bytes (row format 1)         |
//! | `tokenvault/v2/pan`                | AES-GCM AAD prefix | `…pan` ‖ row format u32 BE ‖ version u32 BE ‖ len(token) u32 BE ‖ token ‖ canonical metadata (row format 2) |
//! | `tokenvault/v1/fingerprint\0`      | HMAC input prefix  | label ‖ data                                                 |
//! | `tokenvault/v1/fingerprint-layer\0` | HMAC input prefix | label ‖ inner fingerprint (32)                               |
//! | `tokenvault/v1/audit\0`            | HMAC input prefix  | label ‖ len(prev) u32 BE ‖ prev MAC ‖ record                 |
//! | `tokenvault/v1/api-key\0`          | SHA-256 prefix     | label ‖ secret                                               |
//! | `tokenvault/v1/audit-hash\0`       | SHA-256 prefix     | label ‖ prev hash (32) ‖ record                              |
//! | `tokenvault/v1/audit-key-id\0`     | SHA-256 prefix     | label ‖ Ed25519 public key (32); first 8 bytes = key id      |
//! | `tokenvault/v1/audit-checkpoint\n` | Ed25519 message    | see [`crate::audit::Checkpoint::signed_message`]             |
//! | `tokenvault/v1/audit-key-handover\n` | Ed25519 message  | see [`crate::audit::handover_message`]                       |
//!
//! Each layout is unambiguous: fixed-length prefixes and fixed-width integers come before the
//! single variable-length field, or the variable field is length-prefixed.
//!
//! # Wire formats
//!
//! * Wrapped key: `nonce (12) ‖ ciphertext (32) ‖ tag (16)` = [`WRAPPED_KEY_LEN`] bytes.
//! * [`Sealed`] PAN: the 12-byte nonce, and `ciphertext ‖ tag (16)`.
//!
//! # Nonces
//!
//! Every nonce is 96 random bits from the OS CSPRNG. NIST SP 800-38D caps random-nonce GCM at
//! 2^32 encryptions per key; rotate to a new data-key version long before one version has
//! sealed that many PANs (wrapping uses the key-wrapping key a handful of times per rotation).
//!
//! # Memory hygiene
//!
//! Raw key bytes live only in `Box<Zeroizing<[u8; 32]>>`: wiped on drop, and boxed so that
//! moving a key moves a pointer rather than leaving an unwiped copy of the bytes behind. The
//! AES-GCM and HMAC states are boxed for the same reason. What is *not* wiped, and why:
//!
//! * The AES round keys are wiped on drop only if the `aes` crate's own `zeroize` feature is
//!   on; `aes-gcm`'s `zeroize` feature alone does not forward it (it only wipes a temporary).
//!   The GHASH subkey H (= AES_K(0); allows forgery, not decryption) is not wiped whatever
//!   the features: `polyval` 0.6's x86-64/aarch64 backends never zeroize it.
//! * `hmac` 0.12 and `sha2` 0.10 do not zeroize. [`FingerprintKey`] and [`AuditKey`] keep one
//!   prepared HMAC state (the SHA-256 states after absorbing key⊕ipad and key⊕opad) and clone
//!   it per call: that saves two compression-function calls per MAC on hot paths, and leaves
//!   no more behind than `new_from_slice` per call would (which also builds the padded key
//!   block on the stack). The prepared state lets its holder compute MACs but does not reveal
//!   the key bytes.
//! * HKDF's internal PRK state is not wiped; derivation runs once at start-up.
//! * Stack temporaries made while building a cipher are not guaranteed to be wiped (a general
//!   Rust limitation; see the `zeroize` crate docs).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Key, Nonce, Tag};
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

pub mod pkcs11;
mod rng;
pub mod shares;
pub use rng::public_random;
#[cfg(test)]
mod tests;

use std::sync::Arc;

/// Length of every symmetric key here, in bytes.
pub const KEY_LEN: usize = 32;
/// AES-GCM nonce length in bytes.
pub const NONCE_LEN: usize = 12;
/// AES-GCM tag length in bytes (appended to every ciphertext).
pub const TAG_LEN: usize = 16;
/// Length of a wrapped key: nonce || encrypted key || tag.
pub const WRAPPED_KEY_LEN: usize = NONCE_LEN + KEY_LEN + TAG_LEN;

/// HKDF info for the key-wrapping key.
pub const LABEL_KWK: &[u8] = b"tokenvault/v1/kwk";
/// HKDF info for the stored key check value.
pub const LABEL_KEY_CHECK: &[u8] = b"tokenvault/v1/key-check";
/// AAD prefix for wrapped keys; the purpose encoding follows.
pub const LABEL_WRAP: &[u8] = b"tokenvault/v1/wrap/";
/// AAD prefix for sealed PANs of row format 1; version (u32 BE) and token follow.
pub const LABEL_PAN: &[u8] = b"tokenvault/v1/pan";
/// AAD prefix for sealed PANs of row format 2 and later. The same length as [`LABEL_PAN`]
/// and different from it, so no AAD of one format can be read as one of the other.
pub const LABEL_PAN_ROW: &[u8] = b"tokenvault/v2/pan";

/// Row format 1: the AAD binds the key version and the token (rows written before the
/// metadata was bound; they keep opening, and `keys rewrap` upgrades them).
pub const ROW_FORMAT_TOKEN_ONLY: u32 = 1;
/// Row format 2: the AAD also binds the row's canonical metadata (format, brand, length,
/// BIN, last four, creation and expiry time), so an edited column fails authentication.
pub const ROW_FORMAT_BOUND_META: u32 = 2;
/// The format every new seal uses.
pub const ROW_FORMAT: u32 = ROW_FORMAT_BOUND_META;
/// HMAC input prefix for PAN fingerprints.
pub const LABEL_FINGERPRINT: &[u8] = b"tokenvault/v1/fingerprint\0";
/// Label of the scoped reuse fingerprint (see [`FingerprintKey::scoped_fingerprint`]).
pub const LABEL_REUSE_FINGERPRINT: &[u8] = b"tokenvault/v1/reuse-fingerprint\0";
/// HMAC input prefix of a fingerprint layer (see [`FingerprintKey::layer`]).
pub const LABEL_FINGERPRINT_LAYER: &[u8] = b"tokenvault/v1/fingerprint-layer\0";
/// HMAC input prefix for the audit chain.
pub const LABEL_AUDIT: &[u8] = b"tokenvault/v1/audit\0";
/// SHA-256 input prefix for API key hashes.
pub const LABEL_API_KEY: &[u8] = b"tokenvault/v1/api-key\0";
/// SHA-256 input prefix for the public audit hash chain.
pub const LABEL_AUDIT_HASH: &[u8] = b"tokenvault/v1/audit-hash\0";
/// SHA-256 input prefix for the id of an audit signing key.
pub const LABEL_AUDIT_KEY_ID: &[u8] = b"tokenvault/v1/audit-key-id\0";

/// Largest master key file accepted; a real one is 32 raw or ~45 text bytes.
const MAX_KEY_FILE_LEN: usize = 1024;

type HmacSha256 = Hmac<Sha256>;

/// Raw key bytes: wiped on drop, and on the heap so moves copy only the pointer.
type KeyBytes = Box<Zeroizing<[u8; KEY_LEN]>>;

fn zeroed_key() -> KeyBytes {
    Box::new(Zeroizing::new([0u8; KEY_LEN]))
}

/// Fills the key in place, so the random bytes never exist outside the box.
fn random_key() -> KeyBytes {
    let mut key = zeroed_key();
    OsRng.fill_bytes(&mut key[..]);
    key
}

/// Standard alphabet; accepts input with or without `=` padding (humans strip it).
const BASE64_LENIENT_PAD: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a master key could not be loaded. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("master key file {0} does not exist")]
    Missing(String),
    #[error("master key file {path} is accessible by group or others (mode {mode:o}); run chmod 600 on it")]
    PermissionsTooOpen { path: String, mode: u32 },
    #[error("master key is empty")]
    Empty,
    #[error(
        "master key has the wrong length: {0} bytes, expected 32 (raw, or base64 of 32 bytes)"
    )]
    WrongLength(usize),
    #[error("master key is not valid base64")]
    NotBase64,
    #[error("master key file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid PKCS#11 URI: {0}")]
    Pkcs11Uri(String),
    #[error("cannot load the PKCS#11 module {path}: {detail}")]
    Pkcs11Module { path: String, detail: String },
    #[error("no initialized PKCS#11 token with {token} in module {module}")]
    Pkcs11TokenMissing { token: String, module: String },
    #[error("PKCS#11 PIN source {path}: {detail}")]
    Pkcs11PinSource { path: String, detail: String },
    #[error("wrong PIN for PKCS#11 token {token} (read from {source_path}); the token refused the login")]
    Pkcs11WrongPin { token: String, source_path: String },
    #[error("the user PIN of PKCS#11 token {0} is locked (too many wrong PINs); the security officer must reset it")]
    Pkcs11PinLocked(String),
    #[error("no master key object labelled \"{object}\" in PKCS#11 token {token}; `tokenvault init --master-key-pkcs11 URI` creates it for a new vault")]
    Pkcs11ObjectMissing { object: String, token: String },
    #[error("PKCS#11 object \"{object}\" cannot be the master key: {detail}")]
    Pkcs11BadObject { object: String, detail: String },
    #[error("PKCS#11 token error: {0}")]
    Pkcs11Device(String),
    #[error("master key share: {0}")]
    Share(String),
}

/// How long [`MasterKey::load_file`] waits for a pipe to deliver the key.
pub const KEY_PIPE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits until `file` (a pipe) is readable or hung up, or fails with TimedOut at `deadline`.
#[cfg(unix)]
fn wait_readable(file: &File, deadline: std::time::Instant) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "nothing to read from the pipe (a FIFO nobody writes to?)",
            ));
        }
        let mut pfd = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd, for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r > 0 {
            return Ok(());
        }
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

#[cfg(not(unix))]
fn wait_readable(_: &File, _: std::time::Instant) -> std::io::Result<()> {
    Ok(())
}

fn io_error(path: &Path, source: std::io::Error) -> KeyError {
    KeyError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Why a wrapped key did not unwrap.
#[derive(Debug)]
pub enum UnwrapError {
    /// Wrong key, altered or moved blob: DATA_LOSS (or a wrong master key).
    Authentication,
    /// The PKCS#11 token could not be used: UNAVAILABLE, retry later.
    Device(KeyError),
}

/// Every failure to authenticate or decrypt: wrong key, altered bytes, swapped row, wrong AAD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("ciphertext failed authentication")]
pub struct DecryptError;

/// The root secret. Never stored in the database. Either 256 bits held by this process (a
/// key file, the environment, or rebuilt from shares) or a non-extractable key inside a
/// PKCS#11 token, which this process can only ask to encrypt and decrypt.
pub struct MasterKey(Master);

enum Master {
    Bytes(KeyBytes),
    Pkcs11(Arc<pkcs11::HsmKey>),
}

impl MasterKey {
    pub fn generate() -> MasterKey {
        MasterKey(Master::Bytes(random_key()))
    }

    /// The key object a `pkcs11:` URI names (see [`pkcs11`]); `create` generates it in the
    /// token when absent. Every failure (module, token, PIN, object) has its own message.
    pub fn open_pkcs11(uri: &str, create: bool) -> Result<MasterKey, KeyError> {
        let uri = pkcs11::Pkcs11Uri::parse(uri)?;
        Ok(MasterKey(Master::Pkcs11(Arc::new(pkcs11::HsmKey::open(
            &uri, create,
        )?))))
    }

    /// Where the key lives, without anything secret: `key bytes in this process` or the
    /// PKCS#11 token, object and module.
    pub fn location(&self) -> String {
        match &self.0 {
            Master::Bytes(_) => {
                "key bytes held by this process (file, environment or shares)".into()
            }
            Master::Pkcs11(k) => k.location().to_owned(),
        }
    }

    /// True when the key lives in a PKCS#11 token.
    pub fn is_pkcs11(&self) -> bool {
        matches!(self.0, Master::Pkcs11(_))
    }

    /// The raw bytes of a key held in this process; `None` for a token's key.
    fn bytes(&self) -> Option<&KeyBytes> {
        match &self.0 {
            Master::Bytes(b) => Some(b),
            Master::Pkcs11(_) => None,
        }
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<MasterKey, KeyError> {
        match bytes.len() {
            0 => Err(KeyError::Empty),
            KEY_LEN => {
                let mut key = zeroed_key();
                key.copy_from_slice(bytes);
                Ok(MasterKey(Master::Bytes(key)))
            }
            n => Err(KeyError::WrongLength(n)),
        }
    }

    /// Standard base64 (padding optional) of exactly 32 bytes, surrounding whitespace ignored.
    pub fn from_base64(text: &str) -> Result<MasterKey, KeyError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(KeyError::Empty);
        }
        // Reserve the full estimate up front: `decode_vec` then never reallocates, so no
        // unwiped partial copy of the key is left in a freed buffer.
        let estimate = base64::decoded_len_estimate(text.len());
        let mut decoded = Zeroizing::new(Vec::with_capacity(estimate));
        BASE64_LENIENT_PAD
            .decode_vec(text, &mut decoded)
            .map_err(|_| KeyError::NotBase64)?;
        MasterKey::from_bytes(&decoded)
    }

    /// Reads a key file: base64 text of 32 bytes (what `write_new_file` writes) or 32 raw bytes.
    /// Refuses a file readable or writable by group or others.
    ///
    /// A file made only of printable ASCII and whitespace is parsed as base64; anything else
    /// must be exactly 32 raw bytes. (A random raw key is all-printable with probability about
    /// 2^-44, so this never misreads a real raw key, and a 32-character passphrase is refused
    /// rather than silently used as key bytes.)
    ///
    /// Never blocks indefinitely: the file is opened with `O_NONBLOCK`, so a FIFO nobody writes
    /// to cannot hang the caller in `open(2)`; a pipe (`<(secret-tool …)`) is waited on for at
    /// most [`KEY_PIPE_TIMEOUT`]; anything but a regular file or a pipe is refused.
    pub fn load_file(path: &Path) -> Result<MasterKey, KeyError> {
        let mut options = OpenOptions::new();
        options.read(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC);
        }
        let mut file = match options.open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(KeyError::Missing(path.display().to_string()))
            }
            Err(e) => return Err(io_error(path, e)),
        };
        // Check the opened file (fstat), not the path, so a swap between check and read
        // cannot slip a different file past the permission check.
        let meta = file.metadata().map_err(|e| io_error(path, e))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(KeyError::PermissionsTooOpen {
                    path: path.display().to_string(),
                    mode,
                });
            }
        }
        #[cfg(unix)]
        let pipe = {
            use std::os::unix::fs::FileTypeExt;
            let ft = meta.file_type();
            if !ft.is_file() && !ft.is_fifo() {
                return Err(io_error(
                    path,
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "not a regular file or a pipe",
                    ),
                ));
            }
            ft.is_fifo()
        };
        #[cfg(not(unix))]
        let pipe = false;
        let deadline = std::time::Instant::now() + KEY_PIPE_TIMEOUT;
        // Only regular files have a meaningful size; pipes (e.g. `<(secret-tool …)`) are
        // bounded by the read loop below instead.
        if meta.is_file() && meta.len() > MAX_KEY_FILE_LEN as u64 {
            return Err(KeyError::WrongLength(
                usize::try_from(meta.len()).unwrap_or(usize::MAX),
            ));
        }

        // Fixed-size zeroizing buffer and a manual read loop: `read_to_end` may grow (and so
        // copy and free) its buffer, leaving key bytes behind in freed memory.
        let mut buf = Zeroizing::new(vec![0u8; MAX_KEY_FILE_LEN + 1]);
        let mut len = 0;
        while len < buf.len() {
            // A pipe with no writer yet reads as end-of-file: wait for data (or the writer's
            // end) first, within the deadline.
            if pipe {
                wait_readable(&file, deadline).map_err(|e| io_error(path, e))?;
            }
            match file.read(&mut buf[len..]) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(io_error(path, e)),
            }
        }
        if len > MAX_KEY_FILE_LEN {
            return Err(KeyError::WrongLength(len));
        }
        let content = &buf[..len];

        let is_text = content
            .iter()
            .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace());
        if is_text {
            // All ASCII, so this cannot fail.
            let text = std::str::from_utf8(content).map_err(|_| KeyError::NotBase64)?;
            MasterKey::from_base64(text)
        } else {
            MasterKey::from_bytes(content)
        }
    }

    /// Creates `path` (which must not exist) with mode 0600 and writes the key as base64.
    /// Refused for a key in a PKCS#11 token: its bytes never leave the token.
    pub fn write_new_file(&self, path: &Path) -> Result<(), KeyError> {
        let Some(bytes) = self.bytes() else {
            return Err(KeyError::Pkcs11BadObject {
                object: self.location(),
                detail: "a key inside a token cannot be written to a file".into(),
            });
        };
        let mut options = OpenOptions::new();
        // create_new = O_CREAT|O_EXCL: never overwrites, never follows a planted symlink.
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            // Applied by open(2) itself, so the file is never visible with wider permissions.
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(|e| io_error(path, e))?;

        // 44 base64 characters + "\n", encoded into a wiped stack buffer.
        let mut text = Zeroizing::new([0u8; 45]);
        let n = base64::engine::general_purpose::STANDARD
            .encode_slice(&bytes[..], &mut text[..])
            .expect("base64 of 32 bytes is 44 bytes");
        text[n] = b'\n';
        if let Err(e) = file.write_all(&text[..=n]).and_then(|()| file.sync_all()) {
            // Do not leave a truncated key file that a later load would reject or misread.
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(io_error(path, e));
        }
        drop(file);

        // Make the directory entry durable too, or a crash could lose the new file.
        #[cfg(unix)]
        {
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_error(dir, e))?;
        }
        Ok(())
    }

    /// Key bytes: HKDF-SHA256(salt = vault id, ikm = master key) with the labels
    /// `tokenvault/v1/kwk` and `tokenvault/v1/key-check`. A token's key: the token itself
    /// wraps (AES-GCM, AAD `tokenvault/v1/hsm/` ‖ vault id ‖ the wrap AAD) and the key check
    /// is a blob the token sealed (same AAD scheme, label `tokenvault/v1/key-check`).
    pub fn derive(&self, vault_id: &VaultId) -> (KeyWrappingKey, KeyCheck) {
        match &self.0 {
            Master::Bytes(bytes) => {
                let mut kwk = zeroed_key();
                hkdf_sha256(&vault_id.0, &bytes[..], LABEL_KWK, &mut kwk[..]);
                let mut check = [0u8; 32];
                hkdf_sha256(&vault_id.0, &bytes[..], LABEL_KEY_CHECK, &mut check);
                (
                    KeyWrappingKey::from_key(&kwk),
                    KeyCheck(Check::Derived(check)),
                )
            }
            Master::Pkcs11(key) => (
                KeyWrappingKey(Kwk::Hsm {
                    key: key.clone(),
                    vault_id: *vault_id,
                }),
                KeyCheck(Check::Hsm {
                    key: key.clone(),
                    vault_id: *vault_id,
                }),
            ),
        }
    }
}

/// `key.0[..]`: the bytes of a key held in this process, for tests.
#[cfg(test)]
impl std::ops::Index<std::ops::RangeFull> for Master {
    type Output = [u8];
    fn index(&self, _: std::ops::RangeFull) -> &[u8] {
        match self {
            Master::Bytes(b) => &b[..],
            Master::Pkcs11(_) => panic!("a token's key has no bytes here"),
        }
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Master::Bytes(_) => f.write_str("MasterKey(<redacted>)"),
            Master::Pkcs11(k) => write!(f, "MasterKey({})", k.location()),
        }
    }
}

/// AAD prefix of everything a token's master key seals: the vault id follows, so one token
/// key can serve several vaults without a blob of one opening in another.
pub const LABEL_HSM: &[u8] = b"tokenvault/v1/hsm/";

fn hsm_aad(vault_id: &VaultId, inner: &[u8]) -> Aad {
    Aad::concat(&[LABEL_HSM, &vault_id.0, inner])
}

/// HKDF-SHA256 (RFC 5869) extract-then-expand. `derive` goes through this, and the RFC test
/// vectors test it. Panics only if `out` exceeds 255 * 32 bytes (never: callers want 32).
fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[u8], out: &mut [u8]) {
    Hkdf::<Sha256>::new(Some(salt), ikm)
        .expand(info, out)
        .expect("HKDF-SHA256 output of at most 8160 bytes");
}

/// The vault's random identifier, used as HKDF salt. Not secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VaultId(pub [u8; 16]);

impl VaultId {
    pub fn generate() -> VaultId {
        VaultId(random_bytes())
    }
    pub fn from_slice(bytes: &[u8]) -> Option<VaultId> {
        <[u8; 16]>::try_from(bytes).ok().map(VaultId)
    }
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A value made with the master key and stored in the vault, so a wrong master key is
/// detected before anything is read or written. Reveals nothing about the key. For key
/// bytes: 32 derived bytes. For a token's key: 32 zero bytes sealed by the token (60 bytes,
/// the wrapped-key format), checked by asking the token to open it.
pub struct KeyCheck(Check);

enum Check {
    Derived([u8; 32]),
    Hsm {
        key: Arc<pkcs11::HsmKey>,
        vault_id: VaultId,
    },
}

impl KeyCheck {
    /// True when `stored` was made by this master key for this vault (constant-time
    /// comparison, or the token's tag check). A token that cannot be used also answers false;
    /// its error is logged.
    pub fn matches(&self, stored: &[u8]) -> bool {
        self.verify(stored).unwrap_or_else(|e| {
            tracing::error!(error = %e, "key check in the PKCS#11 token failed");
            false
        })
    }

    /// Like [`KeyCheck::matches`], but a token that cannot be used is an error
    /// ([`KeyError::Pkcs11Device`], UNAVAILABLE), not a wrong key.
    pub fn verify(&self, stored: &[u8]) -> Result<bool, KeyError> {
        match &self.0 {
            Check::Derived(check) => Ok(ct_eq(check, stored)),
            Check::Hsm { key, vault_id } => {
                if stored.len() != WRAPPED_KEY_LEN {
                    return Ok(false);
                }
                let (nonce, sealed) = stored.split_at(NONCE_LEN);
                let aad = hsm_aad(vault_id, LABEL_KEY_CHECK);
                let mut out = zeroed_key();
                match key.decrypt_key(nonce, aad.as_bytes(), sealed, &mut out) {
                    Ok(()) => Ok(ct_eq(&out[..], &[0u8; KEY_LEN])),
                    Err(pkcs11::HsmDecryptError::Authentication) => Ok(false),
                    Err(pkcs11::HsmDecryptError::Device(e)) => Err(e),
                }
            }
        }
    }

    /// The value to store in a vault (a new one on every call for a token's key).
    pub fn to_stored(&self) -> Result<Vec<u8>, KeyError> {
        match &self.0 {
            Check::Derived(check) => Ok(check.to_vec()),
            Check::Hsm { key, vault_id } => {
                let nonce: [u8; NONCE_LEN] = random_bytes();
                let aad = hsm_aad(vault_id, LABEL_KEY_CHECK);
                let sealed = key.encrypt(&nonce, aad.as_bytes(), &[0u8; KEY_LEN])?;
                Ok([&nonce[..], &sealed].concat())
            }
        }
    }

    /// The derived bytes (key bytes only), for tests.
    #[cfg(test)]
    pub(crate) fn derived(&self) -> [u8; 32] {
        match &self.0 {
            Check::Derived(c) => *c,
            Check::Hsm { .. } => panic!("a token's key check is not derived"),
        }
    }
}

impl std::fmt::Debug for KeyCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyCheck(..)")
    }
}

/// What a wrapped key is for; it becomes the wrapping AAD, so a wrapped key cannot be moved
/// to another purpose or version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyPurpose {
    Data(u32),
    Fingerprint,
    Audit,
    /// The seed of audit signing key number n.
    AuditSigning(u32),
    /// Fingerprint layer n (n >= 1), added by `keys rotate-master --rekey` number n.
    FingerprintLayer(u32),
    /// A replaced audit MAC key, kept to verify the records from sequence number `from`
    /// up to the next key's first record.
    RetiredAudit(u64),
}

/// Associated data, assembled on the stack when short (every wrap AAD; PAN AAD for tokens up
/// to `AAD_INLINE - 21` bytes) so the hot path does not allocate; on the heap otherwise.
const AAD_INLINE: usize = 128;

enum Aad {
    Inline { buf: [u8; AAD_INLINE], len: usize },
    Heap(Vec<u8>),
}

impl Aad {
    fn concat(parts: &[&[u8]]) -> Aad {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total > AAD_INLINE {
            return Aad::Heap(parts.concat());
        }
        let mut buf = [0u8; AAD_INLINE];
        let mut at = 0;
        for part in parts {
            buf[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        Aad::Inline { buf, len: total }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Aad::Inline { buf, len } => &buf[..*len],
            Aad::Heap(v) => v,
        }
    }
}

/// `tokenvault/v1/wrap/` followed by `data` || version u32 BE, `fingerprint` or `audit`.
/// The purpose names differ in their first byte and only `data` is followed by anything,
/// always exactly 4 bytes, so no two purposes share an encoding.
fn wrap_aad(purpose: KeyPurpose) -> Aad {
    match purpose {
        KeyPurpose::Data(version) => Aad::concat(&[LABEL_WRAP, b"data", &version.to_be_bytes()]),
        KeyPurpose::Fingerprint => Aad::concat(&[LABEL_WRAP, b"fingerprint"]),
        KeyPurpose::Audit => Aad::concat(&[LABEL_WRAP, b"audit"]),
        // `signing` starts with a byte no other purpose starts with, and is followed by
        // exactly 4 bytes, like `data`.
        KeyPurpose::AuditSigning(n) => Aad::concat(&[LABEL_WRAP, b"signing", &n.to_be_bytes()]),
        // `layer` and `retired-audit` also start with bytes of their own, and are followed by
        // exactly 4 and 8 bytes.
        KeyPurpose::FingerprintLayer(n) => Aad::concat(&[LABEL_WRAP, b"layer", &n.to_be_bytes()]),
        KeyPurpose::RetiredAudit(from) => {
            Aad::concat(&[LABEL_WRAP, b"retired-audit", &from.to_be_bytes()])
        }
    }
}

/// `tokenvault/v1/pan` || version u32 BE || token. The label is fixed-length and the version
/// is fixed-width, so the version always sits at bytes 17..21 and the token is everything
/// after: no (version, token) pair can be re-split into another, e.g. token bytes cannot
/// shift into the version field.
fn pan_aad(version: u32, token: &str) -> Aad {
    Aad::concat(&[LABEL_PAN, &version.to_be_bytes(), token.as_bytes()])
}

/// `tokenvault/v2/pan` || row format u32 BE || version u32 BE || len(token) u32 BE || token ||
/// metadata. Fixed-width fields first and the token length-prefixed, so the metadata (the
/// only other variable field, itself canonical and self-delimiting) cannot absorb token
/// bytes or the other way round.
fn pan_row_aad(version: u32, token: &str, meta: &[u8]) -> Aad {
    let token_len = u32::try_from(token.len()).expect("token shorter than 4 GiB");
    Aad::concat(&[
        LABEL_PAN_ROW,
        &ROW_FORMAT_BOUND_META.to_be_bytes(),
        &version.to_be_bytes(),
        &token_len.to_be_bytes(),
        token.as_bytes(),
        meta,
    ])
}

/// AES-256-GCM seal with an explicit nonce: returns ciphertext || tag. Encrypts in place in a
/// buffer sized for the tag, so the plaintext copy is overwritten and never reallocated.
/// The public API always passes a fresh random nonce; tests pass the published vectors' ones.
fn gcm_seal(cipher: &Aes256Gcm, nonce: &[u8; NONCE_LEN], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(plaintext.len() + TAG_LEN);
    out.extend_from_slice(plaintext);
    match cipher.encrypt_in_place_detached(Nonce::from_slice(nonce), aad, &mut out) {
        Ok(tag) => {
            out.extend_from_slice(&tag);
            out
        }
        Err(_) => {
            // Only for plaintexts over GCM's 64 GiB limit; wipe the copy before panicking.
            zeroize::Zeroize::zeroize(&mut out);
            panic!("AES-GCM plaintext exceeds the GCM length limit");
        }
    }
}

/// AES-256-GCM open of ciphertext || tag. Any malformed input is a DecryptError. The output
/// buffer zeroizes on drop, including on failure (aes-gcm 0.10.3 verifies before decrypting).
fn gcm_open(
    cipher: &Aes256Gcm,
    nonce: &[u8],
    aad: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, DecryptError> {
    if nonce.len() != NONCE_LEN || sealed.len() < TAG_LEN {
        return Err(DecryptError);
    }
    let (ciphertext, tag) = sealed.split_at(sealed.len() - TAG_LEN);
    let mut out = Zeroizing::new(Vec::with_capacity(ciphertext.len()));
    out.extend_from_slice(ciphertext);
    cipher
        .decrypt_in_place_detached(
            Nonce::from_slice(nonce),
            aad,
            &mut out,
            Tag::from_slice(tag),
        )
        .map_err(|_| DecryptError)?;
    Ok(out)
}

/// Builds the cipher on the heap: the key schedule is computed once and never copied by moves.
fn new_cipher(key: &KeyBytes) -> Box<Aes256Gcm> {
    Box::new(Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key[..])))
}

/// Random 256-bit key material (data, fingerprint or audit key) before it is put to use.
pub struct SecretKey(KeyBytes);

impl SecretKey {
    pub fn generate() -> SecretKey {
        SecretKey(random_key())
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// What wraps the stored keys: an AES-256-GCM key derived from master key bytes (never
/// stored), or the master key inside a PKCS#11 token, used through the token.
pub struct KeyWrappingKey(Kwk);

enum Kwk {
    Local(Box<Aes256Gcm>),
    Hsm {
        key: Arc<pkcs11::HsmKey>,
        vault_id: VaultId,
    },
}

impl KeyWrappingKey {
    fn from_key(key: &KeyBytes) -> KeyWrappingKey {
        KeyWrappingKey(Kwk::Local(new_cipher(key)))
    }

    /// nonce (12 bytes) || ciphertext || tag, AAD = `tokenvault/v1/wrap` + purpose (for a
    /// token's key prefixed by `tokenvault/v1/hsm/` ‖ vault id). Fails only when a token
    /// cannot be used.
    pub fn wrap(&self, key: &SecretKey, purpose: KeyPurpose) -> Result<Vec<u8>, KeyError> {
        let nonce: [u8; NONCE_LEN] = random_bytes();
        let aad = wrap_aad(purpose);
        let cipher = match &self.0 {
            Kwk::Local(cipher) => cipher,
            Kwk::Hsm { key: hsm, vault_id } => {
                let aad = hsm_aad(vault_id, aad.as_bytes());
                let sealed = hsm.encrypt(&nonce, aad.as_bytes(), &key.0[..])?;
                let mut out = Vec::with_capacity(WRAPPED_KEY_LEN);
                out.extend_from_slice(&nonce);
                out.extend_from_slice(&sealed);
                return Ok(out);
            }
        };
        // Exact capacity: the key bytes are encrypted in place and the buffer never moves.
        let mut out = Vec::with_capacity(WRAPPED_KEY_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&key.0[..]);
        let tag = cipher
            .encrypt_in_place_detached(
                Nonce::from_slice(&nonce),
                aad.as_bytes(),
                &mut out[NONCE_LEN..],
            )
            .expect("a 32-byte plaintext is within GCM limits");
        out.extend_from_slice(&tag);
        Ok(out)
    }

    pub fn unwrap(&self, wrapped: &[u8], purpose: KeyPurpose) -> Result<SecretKey, DecryptError> {
        self.try_unwrap(wrapped, purpose).map_err(|e| {
            if let UnwrapError::Device(e) = e {
                tracing::error!(error = %e, "unwrapping in the PKCS#11 token failed");
            }
            DecryptError
        })
    }

    /// Like [`KeyWrappingKey::unwrap`], telling a token that cannot be used (UNAVAILABLE)
    /// from a wrapped key that fails authentication (wrong key or altered: DATA_LOSS).
    pub fn try_unwrap(
        &self,
        wrapped: &[u8],
        purpose: KeyPurpose,
    ) -> Result<SecretKey, UnwrapError> {
        if wrapped.len() != WRAPPED_KEY_LEN {
            return Err(UnwrapError::Authentication);
        }
        let (nonce, rest) = wrapped.split_at(NONCE_LEN);
        let (ciphertext, tag) = rest.split_at(KEY_LEN);
        let aad = wrap_aad(purpose);
        // Decrypt straight into the key's final (boxed, zeroizing) home.
        let mut key = zeroed_key();
        let cipher = match &self.0 {
            Kwk::Local(cipher) => cipher,
            Kwk::Hsm { key: hsm, vault_id } => {
                let aad = hsm_aad(vault_id, aad.as_bytes());
                return match hsm.decrypt_key(nonce, aad.as_bytes(), rest, &mut key) {
                    Ok(()) => Ok(SecretKey(key)),
                    Err(pkcs11::HsmDecryptError::Authentication) => {
                        Err(UnwrapError::Authentication)
                    }
                    Err(pkcs11::HsmDecryptError::Device(e)) => Err(UnwrapError::Device(e)),
                };
            }
        };
        key.copy_from_slice(ciphertext);
        cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(nonce),
                aad.as_bytes(),
                &mut key[..],
                Tag::from_slice(tag),
            )
            .map_err(|_| UnwrapError::Authentication)?;
        Ok(SecretKey(key))
    }
}

impl KeyWrappingKey {
    /// Re-wraps a stored key under `new` without the key bytes leaving this module: unwraps
    /// into a zeroizing buffer, wraps again with a fresh nonce and the same purpose (AAD).
    pub fn rewrap(
        &self,
        new: &KeyWrappingKey,
        wrapped: &[u8],
        purpose: KeyPurpose,
    ) -> Result<Result<Vec<u8>, KeyError>, DecryptError> {
        self.rewrap_as(new, wrapped, purpose, purpose)
    }

    /// Like [`KeyWrappingKey::rewrap`], changing the purpose (an audit key being retired).
    pub fn rewrap_as(
        &self,
        new: &KeyWrappingKey,
        wrapped: &[u8],
        from: KeyPurpose,
        to: KeyPurpose,
    ) -> Result<Result<Vec<u8>, KeyError>, DecryptError> {
        let key = match self.try_unwrap(wrapped, from) {
            Ok(key) => key,
            Err(UnwrapError::Authentication) => return Err(DecryptError),
            // The token could not be used: an error of the token, not of the key.
            Err(UnwrapError::Device(e)) => return Ok(Err(e)),
        };
        Ok(new.wrap(&key, to))
    }
}

impl std::fmt::Debug for KeyWrappingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyWrappingKey(<redacted>)")
    }
}

/// A sealed PAN: the nonce and the ciphertext with its tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    pub nonce: [u8; NONCE_LEN],
    pub ciphertext: Vec<u8>,
}

/// One data-key version with its AES key schedule computed once.
pub struct DataKey {
    version: u32,
    cipher: Box<Aes256Gcm>,
}

impl DataKey {
    pub fn new(version: u32, key: SecretKey) -> DataKey {
        // `key` is dropped (and wiped) at the end of this call; only the schedule remains.
        DataKey {
            version,
            cipher: new_cipher(&key.0),
        }
    }
    pub fn version(&self) -> u32 {
        self.version
    }
    /// Fresh random nonce; sealed in [`ROW_FORMAT`]: the AAD binds this version, the token
    /// and the row's canonical metadata `meta` (see `store::TokenMeta::canonical`).
    pub fn seal(&self, token: &str, meta: &[u8], plaintext: &[u8]) -> Sealed {
        let mut nonce = [0u8; NONCE_LEN];
        public_random(&mut nonce);
        let aad = pan_row_aad(self.version, token, meta);
        let ciphertext = gcm_seal(&self.cipher, &nonce, aad.as_bytes(), plaintext);
        Sealed { nonce, ciphertext }
    }

    /// Opens a row sealed in `row_format` (what the row says; a row whose format column was
    /// edited fails like any other alteration). Format 1 ignores `meta`; an unknown format
    /// is a DecryptError.
    pub fn open(
        &self,
        row_format: u32,
        token: &str,
        meta: &[u8],
        nonce: &[u8],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, DecryptError> {
        let aad = match row_format {
            ROW_FORMAT_TOKEN_ONLY => pan_aad(self.version, token),
            ROW_FORMAT_BOUND_META => pan_row_aad(self.version, token, meta),
            _ => return Err(DecryptError),
        };
        gcm_open(&self.cipher, nonce, aad.as_bytes(), ciphertext)
    }

    /// Seals as row format 1 did, for tests of rows written before the metadata was bound.
    #[cfg(test)]
    pub(crate) fn seal_token_only(&self, token: &str, plaintext: &[u8]) -> Sealed {
        let nonce: [u8; NONCE_LEN] = random_bytes();
        let aad = pan_aad(self.version, token);
        let ciphertext = gcm_seal(&self.cipher, &nonce, aad.as_bytes(), plaintext);
        Sealed { nonce, ciphertext }
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataKey(v{}, <redacted>)", self.version)
    }
}

/// The keyed HMAC state, prepared once (see "Memory hygiene" in the module docs).
fn prepared_hmac(key: &SecretKey) -> Box<HmacSha256> {
    Box::new(
        <HmacSha256 as Mac>::new_from_slice(&key.0[..]).expect("HMAC accepts keys of any length"),
    )
}

/// HMAC-SHA256 key for the keyed PAN fingerprint behind `reuse_existing`.
pub struct FingerprintKey {
    mac: Box<HmacSha256>,
}

impl FingerprintKey {
    pub fn new(key: SecretKey) -> FingerprintKey {
        FingerprintKey {
            mac: prepared_hmac(&key),
        }
    }
    /// HMAC-SHA256(key, `tokenvault/v1/fingerprint\0` || data).
    pub fn fingerprint(&self, data: &[u8]) -> [u8; 32] {
        let mut mac = (*self.mac).clone();
        mac.update(LABEL_FINGERPRINT);
        mac.update(data);
        mac.finalize().into_bytes().into()
    }
    /// HMAC-SHA256(key, `tokenvault/v1/reuse-fingerprint\0` || len(scope) as u32 BE ||
    /// scope || data): the same card gives unrelated values in different scopes, so a
    /// lookup in one scope can never find, or hint at, a row of another.
    pub fn scoped_fingerprint(&self, scope: &str, data: &[u8]) -> [u8; 32] {
        let mut mac = (*self.mac).clone();
        mac.update(LABEL_REUSE_FINGERPRINT);
        mac.update(&(scope.len() as u32).to_be_bytes());
        mac.update(scope.as_bytes());
        mac.update(data);
        mac.finalize().into_bytes().into()
    }
    /// HMAC-SHA256(key, `tokenvault/v1/fingerprint-layer\0` || inner): a layer over a
    /// fingerprint already computed. `--rekey` adds one and applies it to every stored
    /// fingerprint without knowing the card (or the reuse scope); whoever holds only the
    /// inner keys cannot compute or test the outer value.
    pub fn layer(&self, inner: &[u8; 32]) -> [u8; 32] {
        let mut mac = (*self.mac).clone();
        mac.update(LABEL_FINGERPRINT_LAYER);
        mac.update(inner);
        mac.finalize().into_bytes().into()
    }
}

impl std::fmt::Debug for FingerprintKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FingerprintKey(<redacted>)")
    }
}

/// HMAC-SHA256 key that chains the audit records.
pub struct AuditKey {
    mac: Box<HmacSha256>,
}

impl AuditKey {
    pub fn new(key: SecretKey) -> AuditKey {
        AuditKey {
            mac: prepared_hmac(&key),
        }
    }

    /// label || len(prev) u32 BE || prev || record: the length prefix fixes where `prev` ends,
    /// so bytes cannot be moved between the previous MAC and the record.
    fn chain_state(&self, prev_mac: &[u8], record: &[u8]) -> HmacSha256 {
        let prev_len = u32::try_from(prev_mac.len()).expect("previous MAC shorter than 4 GiB");
        let mut mac = (*self.mac).clone();
        mac.update(LABEL_AUDIT);
        mac.update(&prev_len.to_be_bytes());
        mac.update(prev_mac);
        mac.update(record);
        mac
    }

    /// MAC over the previous record's MAC and this record's canonical bytes.
    pub fn chain_mac(&self, prev_mac: &[u8], record: &[u8]) -> [u8; 32] {
        self.chain_state(prev_mac, record)
            .finalize()
            .into_bytes()
            .into()
    }
    /// Constant-time check of a stored MAC.
    pub fn verify(&self, prev_mac: &[u8], record: &[u8], mac: &[u8]) -> bool {
        self.chain_state(prev_mac, record).verify_slice(mac).is_ok()
    }
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(<redacted>)")
    }
}

/// Hash of an empty audit chain: what the first record's hash chains from.
pub const AUDIT_GENESIS_HASH: [u8; 32] = [0u8; 32];

/// SHA-256(`tokenvault/v1/audit-hash\0` ‖ prev ‖ record): the public audit chain. `prev` is
/// fixed-length, so bytes cannot move between it and the record.
pub fn audit_chain_hash(prev: &[u8; 32], record: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update(LABEL_AUDIT_HASH)
        .chain_update(prev)
        .chain_update(record)
        .finalize()
        .into()
}

/// The Ed25519 key that signs audit checkpoints. The 32-byte seed is random, stored only
/// wrapped (purpose `signing` ‖ key number), and lives in a `SigningKey` that wipes itself on
/// drop (`ed25519-dalek`'s `zeroize` feature), boxed so moves leave no copy behind.
pub struct AuditSigningKey {
    key: Box<ed25519_dalek::SigningKey>,
}

impl AuditSigningKey {
    /// A fresh key and its seed wrapped under `kwk` for key number `n`.
    pub fn generate_wrapped(
        kwk: &KeyWrappingKey,
        n: u32,
    ) -> Result<(AuditSigningKey, Vec<u8>), KeyError> {
        let seed = SecretKey::generate();
        let wrapped = kwk.wrap(&seed, KeyPurpose::AuditSigning(n))?;
        Ok((AuditSigningKey::from_seed(seed), wrapped))
    }

    /// Unwraps the stored seed of key number `n`.
    pub fn unwrap(
        kwk: &KeyWrappingKey,
        wrapped: &[u8],
        n: u32,
    ) -> Result<AuditSigningKey, DecryptError> {
        Ok(AuditSigningKey::from_seed(
            kwk.unwrap(wrapped, KeyPurpose::AuditSigning(n))?,
        ))
    }

    fn from_seed(seed: SecretKey) -> AuditSigningKey {
        // The seed (zeroizing) is dropped at the end of this call.
        AuditSigningKey {
            key: Box::new(ed25519_dalek::SigningKey::from_bytes(&seed.0)),
        }
    }

    pub fn public_key(&self) -> AuditPublicKey {
        AuditPublicKey(self.key.verifying_key())
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        use ed25519_dalek::Signer;
        self.key.sign(message).to_bytes()
    }
}

impl std::fmt::Debug for AuditSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AuditSigningKey({}, <redacted>)",
            self.public_key().key_id()
        )
    }
}

/// The public half of an audit signing key. Text form: `ed25519:` + standard base64.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AuditPublicKey(ed25519_dalek::VerifyingKey);

impl AuditPublicKey {
    pub const PREFIX: &'static str = "ed25519:";

    pub fn from_bytes(bytes: &[u8]) -> Option<AuditPublicKey> {
        let bytes = <[u8; 32]>::try_from(bytes).ok()?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .ok()
            .filter(|k| !k.is_weak())
            .map(AuditPublicKey)
    }

    /// Parses `ed25519:BASE64` (the prefix is optional).
    pub fn parse(text: &str) -> Option<AuditPublicKey> {
        let text = text.trim();
        let b64 = text.strip_prefix(Self::PREFIX).unwrap_or(text);
        let bytes = BASE64_LENIENT_PAD.decode(b64).ok()?;
        AuditPublicKey::from_bytes(&bytes)
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    pub fn to_text(&self) -> String {
        format!(
            "{}{}",
            Self::PREFIX,
            base64::engine::general_purpose::STANDARD.encode(self.0.to_bytes())
        )
    }

    /// First 8 bytes of SHA-256(`tokenvault/v1/audit-key-id\0` ‖ key), in hex.
    pub fn key_id(&self) -> String {
        let digest = Sha256::new()
            .chain_update(LABEL_AUDIT_KEY_ID)
            .chain_update(self.0.as_bytes())
            .finalize();
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Strict verification (RFC 8032 with the checks against malleable signatures).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(sig) = <[u8; 64]>::try_from(signature) else {
            return false;
        };
        self.0
            .verify_strict(message, &ed25519_dalek::Signature::from_bytes(&sig))
            .is_ok()
    }
}

impl std::fmt::Debug for AuditPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuditPublicKey({})", self.to_text())
    }
}

/// SHA-256 of an API key secret; API keys are high-entropy so a fast hash is right here.
/// Input: `tokenvault/v1/api-key\0` || secret.
pub fn api_key_hash(secret: &str) -> [u8; 32] {
    Sha256::new()
        .chain_update(LABEL_API_KEY)
        .chain_update(secret.as_bytes())
        .finalize()
        .into()
}

/// Constant-time equality of two byte strings. Lengths are not secret: different lengths
/// return false at once.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// `N` bytes from the OS CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    OsRng.fill_bytes(&mut bytes);
    bytes
}
