//! The master key inside a PKCS#11 token (an HSM; SoftHSM2 in the tests), through `cryptoki`.
//!
//! The key is a non-extractable, sensitive AES-256 secret-key object. Its bytes never exist in
//! this process: the vault's keys are wrapped and unwrapped, and the key check is made and
//! verified, by `C_Encrypt`/`C_Decrypt` with `CKM_AES_GCM` inside the token. (SoftHSM2 offers
//! `CKM_AES_KEY_WRAP_PAD` as well, but only for objects: the vault's keys are stored as blobs,
//! and GCM gives the same authenticated wrap with the AAD that binds purpose and vault id, in
//! the same 60-byte format as a file key's wrap.) The IV is 96 random bits from this process.
//!
//! The key is named by an RFC 7512 URI:
//! `pkcs11:token=LABEL;object=LABEL?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/tokenvault/pin`.
//! Path attributes: `token`, `object` (required), `id`, `serial`, `slot-id`, `type`
//! (`secret-key` only); query attributes: `module-path` (required), `pin-source` (a file; the
//! PIN is never accepted inline, since URIs end up on command lines and in process lists).
//! Unknown attributes are refused rather than ignored, so a typo cannot select another key.
//!
//! A module is loaded and `C_Initialize`d once per process (the standard allows no more), so
//! the old and the new key of a rotation can live in the same token.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::{KeyError, KEY_LEN, NONCE_LEN, TAG_LEN};

/// Largest PIN file accepted.
const MAX_PIN_FILE_LEN: usize = 256;

/// A parsed `pkcs11:` URI. Holds no secret (the PIN is read from `pin_source` when needed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pkcs11Uri {
    pub module_path: PathBuf,
    pub token: Option<String>,
    pub serial: Option<String>,
    pub slot_id: Option<u64>,
    pub object: String,
    pub id: Option<Vec<u8>>,
    pub pin_source: Option<PathBuf>,
}

fn uri_error(detail: impl Into<String>) -> KeyError {
    KeyError::Pkcs11Uri(detail.into())
}

/// RFC 3986 percent-decoding into UTF-8 text (bytes for `id`).
fn percent_decode(text: &str) -> Result<Vec<u8>, KeyError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| uri_error("a `%` is not followed by two hex digits"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn percent_decode_text(name: &str, text: &str) -> Result<String, KeyError> {
    String::from_utf8(percent_decode(text)?)
        .map_err(|_| uri_error(format!("`{name}` is not UTF-8 after percent-decoding")))
}

impl Pkcs11Uri {
    pub fn parse(uri: &str) -> Result<Pkcs11Uri, KeyError> {
        let rest = uri
            .trim()
            .strip_prefix("pkcs11:")
            .ok_or_else(|| uri_error("it must start with `pkcs11:`"))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut parsed = Pkcs11Uri {
            module_path: PathBuf::new(),
            token: None,
            serial: None,
            slot_id: None,
            object: String::new(),
            id: None,
            pin_source: None,
        };
        let mut seen = Vec::new();
        let mut once = |name: &str| -> Result<(), KeyError> {
            if seen.iter().any(|s: &String| s == name) {
                return Err(uri_error(format!("`{name}` is given twice")));
            }
            seen.push(name.to_owned());
            Ok(())
        };
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (name, value) = attr
                .split_once('=')
                .ok_or_else(|| uri_error(format!("path attribute without `=`: {attr:?}")))?;
            once(name)?;
            match name {
                "token" => parsed.token = Some(percent_decode_text(name, value)?),
                "serial" => parsed.serial = Some(percent_decode_text(name, value)?),
                "object" => parsed.object = percent_decode_text(name, value)?,
                "id" => parsed.id = Some(percent_decode(value)?),
                "slot-id" => {
                    parsed.slot_id = Some(
                        value
                            .parse()
                            .map_err(|_| uri_error("`slot-id` is not a number"))?,
                    )
                }
                "type" => {
                    if value != "secret-key" {
                        return Err(uri_error(
                            "`type` must be `secret-key` (the master key is an AES key)",
                        ));
                    }
                }
                other => {
                    return Err(uri_error(format!(
                        "unsupported path attribute `{other}` (supported: token, object, id, \
                         serial, slot-id, type)"
                    )))
                }
            }
        }
        for attr in query.split('&').filter(|a| !a.is_empty()) {
            let (name, value) = attr
                .split_once('=')
                .ok_or_else(|| uri_error(format!("query attribute without `=`: {attr:?}")))?;
            once(name)?;
            match name {
                "module-path" => {
                    parsed.module_path = PathBuf::from(percent_decode_text(name, value)?)
                }
                "pin-source" => {
                    let source = percent_decode_text(name, value)?;
                    let path = source.strip_prefix("file:").unwrap_or(&source);
                    // `file:///etc/pin` as well as `file:/etc/pin`.
                    let path = path.strip_prefix("//").unwrap_or(path);
                    if path.is_empty() || path.contains(':') && !path.starts_with('/') {
                        return Err(uri_error(
                            "`pin-source` must name a file (`file:/path` or `/path`)",
                        ));
                    }
                    parsed.pin_source = Some(PathBuf::from(path));
                }
                "pin-value" => {
                    return Err(uri_error(
                        "`pin-value` is refused: a PIN in a URI ends up in command lines and \
                         process lists; put it in a file (mode 0600) and use pin-source=file:PATH",
                    ))
                }
                other => {
                    return Err(uri_error(format!(
                        "unsupported query attribute `{other}` (supported: module-path, \
                         pin-source)"
                    )))
                }
            }
        }
        if parsed.module_path.as_os_str().is_empty() {
            return Err(uri_error(
                "`module-path` is required (e.g. ?module-path=/usr/lib/softhsm/libsofthsm2.so)",
            ));
        }
        if parsed.object.is_empty() {
            return Err(uri_error("`object` (the key's label) is required"));
        }
        if parsed.token.is_none() && parsed.serial.is_none() && parsed.slot_id.is_none() {
            return Err(uri_error(
                "name the token: `token=LABEL`, `serial=` or `slot-id=`",
            ));
        }
        Ok(parsed)
    }

    /// Where the key lives, for status output and logs: no PIN, no secret.
    pub fn location(&self) -> String {
        let mut out = String::from("PKCS#11");
        if let Some(t) = &self.token {
            out.push_str(&format!(" token \"{t}\""));
        }
        if let Some(s) = &self.serial {
            out.push_str(&format!(" serial {s}"));
        }
        if let Some(s) = self.slot_id {
            out.push_str(&format!(" slot {s}"));
        }
        out.push_str(&format!(
            ", object \"{}\", module {}",
            self.object,
            self.module_path.display()
        ));
        out
    }
}

/// Modules loaded by this process, by path: each is initialized once.
fn module(path: &Path) -> Result<Pkcs11, KeyError> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut modules = MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(m) = modules.get(path) {
        return Ok(m.clone());
    }
    let module_error = |detail: String| KeyError::Pkcs11Module {
        path: path.display().to_string(),
        detail,
    };
    if !path.exists() {
        return Err(module_error("no such file".into()));
    }
    let ctx = Pkcs11::new(path).map_err(|e| module_error(e.to_string()))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(module_error(format!("C_Initialize: {e}"))),
    }
    modules.insert(path.to_owned(), ctx.clone());
    Ok(ctx)
}

fn device(what: &str, e: CkError) -> KeyError {
    KeyError::Pkcs11Device(format!("{what}: {e}"))
}

/// Reads the PIN file: owner-only, small, one line (the trailing newline is not part of it).
fn read_pin(path: &Path) -> Result<Zeroizing<String>, KeyError> {
    use std::io::Read;
    let source = || path.display().to_string();
    let mut file = std::fs::File::open(path).map_err(|e| KeyError::Pkcs11PinSource {
        path: source(),
        detail: e.to_string(),
    })?;
    let meta = file.metadata().map_err(|e| KeyError::Pkcs11PinSource {
        path: source(),
        detail: e.to_string(),
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Pkcs11PinSource {
                path: source(),
                detail: format!(
                    "accessible by group or others (mode {mode:o}); run chmod 600 on it"
                ),
            });
        }
    }
    if !meta.is_file() || meta.len() as usize > MAX_PIN_FILE_LEN {
        return Err(KeyError::Pkcs11PinSource {
            path: source(),
            detail: format!("not a regular file of at most {MAX_PIN_FILE_LEN} bytes"),
        });
    }
    let mut text = Zeroizing::new(String::with_capacity(MAX_PIN_FILE_LEN + 1));
    file.read_to_string(&mut text)
        .map_err(|e| KeyError::Pkcs11PinSource {
            path: source(),
            detail: e.to_string(),
        })?;
    let len = text.trim_end_matches(['\n', '\r']).len();
    text.truncate(len);
    if text.is_empty() {
        return Err(KeyError::Pkcs11PinSource {
            path: source(),
            detail: "the file is empty".into(),
        });
    }
    Ok(text)
}

/// A logged-in session on the token and the handle of the master key object in it.
pub struct HsmKey {
    /// Keeps the module loaded for as long as the key is used.
    _ctx: Pkcs11,
    /// The session and the key object's handle in it; replaced when the token dropped the
    /// session (see [`is_session_fault`]).
    session: Mutex<(Session, ObjectHandle)>,
    /// To open a fresh session.
    uri: Pkcs11Uri,
    location: String,
}

/// Token errors after which a fresh session may work: the session or the login was lost
/// (token reset, `C_CloseAllSessions`, HSM restart or fail-over), or the device had a fault.
/// Any of them is UNAVAILABLE to a caller, never a wrong key or altered data.
pub fn is_session_fault(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::UserNotLoggedIn
            | RvError::DeviceError
            | RvError::DeviceRemoved
            | RvError::DeviceMemory
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::KeyHandleInvalid
            | RvError::ObjectHandleInvalid
            | RvError::CryptokiNotInitialized
    )
}

impl std::fmt::Debug for HsmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HsmKey({})", self.location)
    }
}

/// Why a decryption in the token failed.
pub enum HsmDecryptError {
    /// The tag did not verify: wrong key or altered blob.
    Authentication,
    /// The token could not be used (removed, session closed, …).
    Device(KeyError),
}

impl HsmKey {
    /// Opens the token the URI names, logs in with the PIN from `pin-source`, and finds the
    /// key object; `create` generates it when absent (for `init` and `keys rotate-master`).
    pub fn open(uri: &Pkcs11Uri, create: bool) -> Result<HsmKey, KeyError> {
        let (ctx, session, handle) = Self::connect(uri, create)?;
        Ok(HsmKey {
            _ctx: ctx,
            session: Mutex::new((session, handle)),
            uri: uri.clone(),
            location: uri.location(),
        })
    }

    /// A logged-in session and the key object's handle in it.
    fn connect(uri: &Pkcs11Uri, create: bool) -> Result<(Pkcs11, Session, ObjectHandle), KeyError> {
        let ctx = module(&uri.module_path)?;
        let slot = find_slot(&ctx, uri)?;
        let token_name = uri
            .token
            .clone()
            .or_else(|| uri.serial.clone())
            .unwrap_or_else(|| format!("slot {}", slot.id()));
        let session = ctx
            .open_rw_session(slot)
            .map_err(|e| device("C_OpenSession", e))?;
        match &uri.pin_source {
            Some(path) => {
                let pin = read_pin(path)?;
                let pin = AuthPin::from(pin.as_str());
                match session.login(UserType::User, Some(&pin)) {
                    Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
                    Err(CkError::Pkcs11(RvError::PinIncorrect, _))
                    | Err(CkError::Pkcs11(RvError::PinLenRange, _)) => {
                        return Err(KeyError::Pkcs11WrongPin {
                            token: token_name,
                            source_path: path.display().to_string(),
                        })
                    }
                    Err(CkError::Pkcs11(RvError::PinLocked, _)) => {
                        return Err(KeyError::Pkcs11PinLocked(token_name))
                    }
                    Err(e) => return Err(device("C_Login", e)),
                }
            }
            None => {
                return Err(uri_error(
                    "`pin-source` is required: the master key is a private object, visible \
                     only after login",
                ))
            }
        }
        let mut template = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(uri.object.as_bytes().to_vec()),
        ];
        if let Some(id) = &uri.id {
            template.push(Attribute::Id(id.clone()));
        }
        let found = session
            .find_objects(&template)
            .map_err(|e| device("C_FindObjects", e))?;
        let handle = match found.as_slice() {
            [one] => *one,
            [] if create => generate(&session, uri)?,
            [] => {
                return Err(KeyError::Pkcs11ObjectMissing {
                    object: uri.object.clone(),
                    token: token_name,
                })
            }
            _ => {
                return Err(KeyError::Pkcs11BadObject {
                    object: uri.object.clone(),
                    detail: format!(
                        "{} secret-key objects carry this label; add `id=` to the URI",
                        found.len()
                    ),
                })
            }
        };
        check_object(&session, handle, &uri.object)?;
        Ok((ctx, session, handle))
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    /// Runs `op` in the session; when the token lost the session (or had a fault), opens a
    /// fresh one and runs it once more. The second failure is returned as it is.
    fn with_session<T>(
        &self,
        op: impl Fn(&Session, ObjectHandle) -> Result<T, CkError>,
    ) -> Result<T, CkError> {
        let mut guard = self.session.lock().unwrap_or_else(|e| e.into_inner());
        match op(&guard.0, guard.1) {
            Err(CkError::Pkcs11(rv, f)) if is_session_fault(rv) => {
                tracing::warn!(error = %CkError::Pkcs11(rv, f), "PKCS#11 session lost; opening a fresh one");
                match Self::connect(&self.uri, false) {
                    Ok((_, session, handle)) => {
                        *guard = (session, handle);
                        op(&guard.0, guard.1)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot open a fresh PKCS#11 session");
                        Err(CkError::Pkcs11(rv, f))
                    }
                }
            }
            r => r,
        }
    }

    /// AES-256-GCM in the token: ciphertext ‖ tag (16).
    pub fn encrypt(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, KeyError> {
        let out = self
            .with_session(|session, handle| {
                let mut iv = *nonce;
                let params = GcmParams::new(&mut iv, aad, ((TAG_LEN * 8) as u64).into())?;
                session.encrypt(&Mechanism::AesGcm(params), handle, plaintext)
            })
            .map_err(|e| device("C_Encrypt", e))?;
        if out.len() != plaintext.len() + TAG_LEN {
            return Err(KeyError::Pkcs11Device(format!(
                "C_Encrypt returned {} bytes for {}",
                out.len(),
                plaintext.len()
            )));
        }
        Ok(out)
    }

    /// Opens ciphertext ‖ tag into exactly `KEY_LEN` bytes, written straight into `out`; the
    /// buffer the binding returns is wiped.
    pub fn decrypt_key(
        &self,
        nonce: &[u8],
        aad: &[u8],
        sealed: &[u8],
        out: &mut [u8; KEY_LEN],
    ) -> Result<(), HsmDecryptError> {
        let mut iv = [0u8; NONCE_LEN];
        if nonce.len() != NONCE_LEN || sealed.len() != KEY_LEN + TAG_LEN {
            return Err(HsmDecryptError::Authentication);
        }
        iv.copy_from_slice(nonce);
        let plain = self
            .with_session(|session, handle| {
                let mut iv = iv;
                let params = GcmParams::new(&mut iv, aad, ((TAG_LEN * 8) as u64).into())?;
                session.decrypt(&Mechanism::AesGcm(params), handle, sealed)
            })
            .map(Zeroizing::new);
        match plain {
            Ok(plain) if plain.len() == KEY_LEN => {
                out.copy_from_slice(&plain);
                Ok(())
            }
            Ok(_) => Err(HsmDecryptError::Authentication),
            // SoftHSM2 (and other OpenSSL-backed tokens) report a GCM tag that does not
            // verify as CKR_GENERAL_ERROR: a wrong key, not a device fault (those are
            // DEVICE_ERROR and the session faults, retried above).
            Err(CkError::Pkcs11(RvError::EncryptedDataInvalid, _))
            | Err(CkError::Pkcs11(RvError::EncryptedDataLenRange, _))
            | Err(CkError::Pkcs11(RvError::GeneralError, _)) => {
                Err(HsmDecryptError::Authentication)
            }
            Err(e) => Err(HsmDecryptError::Device(device("C_Decrypt", e))),
        }
    }
}

fn find_slot(ctx: &Pkcs11, uri: &Pkcs11Uri) -> Result<Slot, KeyError> {
    let slots = ctx
        .get_slots_with_initialized_token()
        .map_err(|e| device("C_GetSlotList", e))?;
    for slot in slots {
        if uri.slot_id.is_some_and(|id| id != slot.id()) {
            continue;
        }
        let info = ctx
            .get_token_info(slot)
            .map_err(|e| device("C_GetTokenInfo", e))?;
        if uri.token.as_deref().is_some_and(|t| t != info.label()) {
            continue;
        }
        if uri
            .serial
            .as_deref()
            .is_some_and(|s| s != info.serial_number())
        {
            continue;
        }
        return Ok(slot);
    }
    let mut what = Vec::new();
    if let Some(t) = &uri.token {
        what.push(format!("label \"{t}\""));
    }
    if let Some(s) = &uri.serial {
        what.push(format!("serial {s}"));
    }
    if let Some(s) = uri.slot_id {
        what.push(format!("slot {s}"));
    }
    Err(KeyError::Pkcs11TokenMissing {
        token: what.join(", "),
        module: uri.module_path.display().to_string(),
    })
}

/// A new AES-256 key in the token: persistent, private, sensitive, never extractable, usable
/// only to encrypt and decrypt.
fn generate(session: &Session, uri: &Pkcs11Uri) -> Result<ObjectHandle, KeyError> {
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen((KEY_LEN as u64).into()),
        Attribute::Label(uri.object.as_bytes().to_vec()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
    ];
    if let Some(id) = &uri.id {
        template.push(Attribute::Id(id.clone()));
    }
    session
        .generate_key(&Mechanism::AesKeyGen, &template)
        .map_err(|e| device("C_GenerateKey", e))
}

/// Refuses a key object whose bytes could leave the token, or that is not AES-256.
fn check_object(session: &Session, handle: ObjectHandle, object: &str) -> Result<(), KeyError> {
    let attrs = session
        .get_attributes(
            handle,
            &[
                AttributeType::KeyType,
                AttributeType::ValueLen,
                AttributeType::Sensitive,
                AttributeType::Extractable,
            ],
        )
        .map_err(|e| device("C_GetAttributeValue", e))?;
    let bad = |detail: &str| KeyError::Pkcs11BadObject {
        object: object.to_owned(),
        detail: detail.to_owned(),
    };
    let (mut aes, mut len, mut sensitive, mut extractable) = (false, 0u64, false, true);
    for attr in attrs {
        match attr {
            Attribute::KeyType(t) => aes = t == KeyType::AES,
            Attribute::ValueLen(l) => len = l.into(),
            Attribute::Sensitive(s) => sensitive = s,
            Attribute::Extractable(e) => extractable = e,
            _ => {}
        }
    }
    if !aes || len != KEY_LEN as u64 {
        return Err(bad("it is not an AES-256 key"));
    }
    if !sensitive || extractable {
        return Err(bad(
            "it is extractable or not sensitive, so its bytes could leave the token; create \
             the master key with CKA_SENSITIVE=true and CKA_EXTRACTABLE=false",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{DecryptError, KeyPurpose, MasterKey, SecretKey, VaultId};

    /// One SoftHSM2 token for this test process (a module is initialized once per process,
    /// with the configuration it finds then). None outside CI when SoftHSM2 is missing.
    fn token() -> Option<&'static (tempfile::TempDir, String)> {
        static TOKEN: OnceLock<Option<(tempfile::TempDir, String)>> = OnceLock::new();
        TOKEN
            .get_or_init(|| {
                let module = "/usr/lib/softhsm/libsofthsm2.so";
                if !Path::new(module).exists() {
                    assert!(
                        std::env::var("CI").map_or(true, |v| v != "true"),
                        "SoftHSM2 missing in CI"
                    );
                    eprintln!("*** SKIPPED: SoftHSM2 is not installed ***");
                    return None;
                }
                let dir = tempfile::tempdir().unwrap();
                let tokens = dir.path().join("tokens");
                std::fs::create_dir(&tokens).unwrap();
                let conf = dir.path().join("softhsm2.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "directories.tokendir = {}\nlog.level = ERROR\n",
                        tokens.display()
                    ),
                )
                .unwrap();
                std::env::set_var("SOFTHSM2_CONF", &conf);
                let ok = std::process::Command::new("softhsm2-util")
                    .args(["--init-token", "--free", "--label", "unit", "--pin", "1234"])
                    .args(["--so-pin", "5678"])
                    .output()
                    .unwrap()
                    .status
                    .success();
                assert!(ok, "softhsm2-util --init-token");
                let pin = dir.path().join("pin");
                std::fs::write(&pin, "1234\n").unwrap();
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
                let uri = format!(
                    "pkcs11:token=unit;object=OBJ?module-path={module}&pin-source=file:{}",
                    pin.display()
                );
                Some((dir, uri))
            })
            .as_ref()
    }

    fn hsm_master(object: &str) -> Option<MasterKey> {
        let (_, uri) = token()?;
        Some(MasterKey::open_pkcs11(&uri.replace("OBJ", object), true).unwrap())
    }

    #[test]
    fn token_wraps_bind_purpose_and_vault_and_check_detects_a_wrong_key() {
        let Some(master) = hsm_master("unit-a") else {
            return;
        };
        let other = hsm_master("unit-b").unwrap();
        assert!(master.is_pkcs11());
        let (vault_a, vault_b) = (VaultId([1; 16]), VaultId([2; 16]));
        let (kwk, check) = master.derive(&vault_a);
        let key = SecretKey::generate();
        let wrapped = kwk.wrap(&key, KeyPurpose::Data(3)).unwrap();
        assert_eq!(wrapped.len(), crate::crypto::WRAPPED_KEY_LEN);
        let back = kwk.unwrap(&wrapped, KeyPurpose::Data(3)).unwrap();
        assert_eq!(&back.0[..], &key.0[..]);
        // Another purpose, another vault under the same token key, another token key, or
        // one flipped bit: the same opaque failure.
        assert_eq!(
            kwk.unwrap(&wrapped, KeyPurpose::Data(4)).err(),
            Some(DecryptError)
        );
        let (kwk_b, check_b) = master.derive(&vault_b);
        assert_eq!(
            kwk_b.unwrap(&wrapped, KeyPurpose::Data(3)).err(),
            Some(DecryptError)
        );
        let (kwk_other, check_other) = other.derive(&vault_a);
        assert_eq!(
            kwk_other.unwrap(&wrapped, KeyPurpose::Data(3)).err(),
            Some(DecryptError)
        );
        for i in 0..wrapped.len() {
            let mut bad = wrapped.clone();
            bad[i] ^= 1;
            assert_eq!(
                kwk.unwrap(&bad, KeyPurpose::Data(3)).err(),
                Some(DecryptError)
            );
        }
        // The key check: made and verified by the token, bound to the vault.
        let stored = check.to_stored().unwrap();
        assert!(check.matches(&stored));
        assert!(!check_b.matches(&stored));
        assert!(!check_other.matches(&stored));
        assert!(!check.matches(&stored[..59]));
        // A file key never matches a token's check, nor the other way round.
        let (_, file_check) = MasterKey::generate().derive(&vault_a);
        assert!(!file_check.matches(&stored));
        assert!(!check.matches(&file_check.to_stored().unwrap()));
        // The key's bytes cannot be written out.
        let dir = tempfile::tempdir().unwrap();
        assert!(master.write_new_file(&dir.path().join("k")).is_err());
        assert!(!format!("{master:?}").contains("pin"));
    }

    const MODULE: &str = "?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/pin";

    #[test]
    fn parses_the_documented_uri() {
        let uri =
            Pkcs11Uri::parse(&format!("pkcs11:token=tokenvault;object=master{MODULE}")).unwrap();
        assert_eq!(
            uri.module_path,
            PathBuf::from("/usr/lib/softhsm/libsofthsm2.so")
        );
        assert_eq!(uri.token.as_deref(), Some("tokenvault"));
        assert_eq!(uri.object, "master");
        assert_eq!(uri.pin_source, Some(PathBuf::from("/run/pin")));
        let uri = Pkcs11Uri::parse(&format!(
            "pkcs11:token=my%20vault;object=k;id=%01%ff;type=secret-key{MODULE}"
        ))
        .unwrap();
        assert_eq!(uri.token.as_deref(), Some("my vault"));
        assert_eq!(uri.id, Some(vec![1, 0xff]));
        assert!(!uri.location().contains("pin"));
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        for (bad, says) in [
            (
                "token=t;object=o?module-path=/m&pin-value=1234",
                "pin-value",
            ),
            ("token=t;object=o?pin-source=/p", "module-path"),
            ("token=t?module-path=/m", "object"),
            ("object=o?module-path=/m", "token"),
            ("token=t;object=o;objekt=x?module-path=/m", "objekt"),
            ("token=t;object=o;type=private?module-path=/m", "type"),
            ("token=t;token=u;object=o?module-path=/m", "twice"),
            ("token=t%2;object=o?module-path=/m", "hex"),
        ] {
            let e = Pkcs11Uri::parse(&format!("pkcs11:{bad}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert!(Pkcs11Uri::parse("token=t;object=o").is_err());
    }
}
