//! The tamper-evident audit trail: records, their two chains, signed checkpoints, and the
//! verifiers that check them.
//!
//! **Hash chain (public).** Each record's `hash` is SHA-256 over the previous record's hash
//! and its canonical bytes ([`crate::crypto::audit_chain_hash`]). It needs no secret, so anyone
//! holding the records can recompute it.
//!
//! **Signed checkpoints (outside the database).** A running server signs the head of the
//! hash chain (vault id, sequence number, hash, time) with the vault's Ed25519 audit signing
//! key and appends it as one JSON line to a checkpoint file ([`Checkpoint`],
//! [`CheckpointFile`], [`spawn_checkpointer`]), at least once a second while records are
//! written and at shutdown. A checkpoint shipped off the host pins the history it covers:
//! whoever later controls the database (even with the master key) cannot truncate, edit,
//! reorder, roll back or fork that history without contradicting it. [`TrailVerifier`]
//! checks records against checkpoints using public information only (`audit verify
//! --checkpoints`, and `audit verify-export` on another machine).
//!
//! **HMAC chain (secret).** Each record also carries an HMAC-SHA256 under the vault's audit
//! key over its canonical bytes and the previous MAC ([`ChainVerifier`]). It is kept because
//! it covers what checkpoints cannot: the records written *after* the newest checkpoint that
//! left the host. Someone who can write the database but does not hold the master key (a
//! stolen backup, a compromised DBA account, a disk-level attacker) can recompute the public
//! hashes of a rewritten tail, and only the MAC chain shows the rewrite. Against a master-key
//! holder the MAC chain proves nothing; the checkpoints are what protects against them.
//!
//! **Signing key rotation.** `audit rotate-key` appends an `audit_key_rotate` record whose
//! reason carries the new public key and a handover signature by the previous key over
//! (vault, sequence, previous hash, new key) ([`handover_message`]); a verifier that trusts
//! the previous key learns the new one from the chain itself. The previous private key is
//! destroyed. A key signs checkpoints only for the stretch of the chain it was active for.
//!
//! Records are appended by the store's single writer in the same group commits as the data
//! they describe. A record never holds a PAN, a part of one beyond what `TokenInfo` shows,
//! or any hash of one.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::crypto::{
    audit_chain_hash, AuditKey, AuditPublicKey, AuditSigningKey, AUDIT_GENESIS_HASH,
};
use crate::model::{Caller, Micros};

/// MAC that precedes the first record.
pub const GENESIS_MAC: [u8; 32] = [0u8; 32];

/// A record to append; the writer assigns `seq` and `mac`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    pub at: Micros,
    pub principal: String,
    pub peer: String,
    pub action: String,
    /// Token, `key v3`, client name or empty.
    pub subject: String,
    /// "OK" or a gRPC code name.
    pub outcome: String,
    /// The caller's stated reason (detokenize), or a free-form detail.
    pub reason: String,
}

/// Stored instead of a reason that holds a card number (see [`AuditEntry::new`]).
pub const REASON_WITHHELD: &str = "[withheld: the reason contained a card number]";

impl AuditEntry {
    /// A record to append. A `reason` that holds a card number is never stored: the vault
    /// refuses such requests first, and this is the last line behind it.
    pub fn new(caller: &Caller, action: &str, subject: &str, outcome: &str, reason: &str) -> Self {
        let reason = if crate::card::contains_card_number(reason) {
            REASON_WITHHELD
        } else {
            reason
        };
        AuditEntry {
            at: crate::vault::now_micros(),
            principal: caller.principal.clone(),
            peer: caller.peer.clone(),
            action: action.to_owned(),
            subject: subject.to_owned(),
            outcome: outcome.to_owned(),
            reason: reason.to_owned(),
        }
    }

    /// The `audit_key_rotate` record: its reason is composed by the vault from key material
    /// alone ([`rotation_reason`]: the new public key, the old key's id, the handover
    /// signature), never from a caller's text, so it is stored as is. Through
    /// [`AuditEntry::new`] the card-number filter took a run of digits in that hex and base64
    /// for a card about once in 300 to 900 rotations, and a rotation record without its reason
    /// breaks every verification of the trail after it.
    pub(crate) fn key_rotation(caller: &Caller, subject: &str, reason: String) -> Self {
        AuditEntry {
            at: crate::vault::now_micros(),
            principal: caller.principal.clone(),
            peer: caller.peer.clone(),
            action: ROTATE_ACTION.to_owned(),
            subject: subject.to_owned(),
            outcome: "OK".to_owned(),
            reason,
        }
    }
}

/// A stored record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub at: Micros,
    pub principal: String,
    pub peer: String,
    pub action: String,
    pub subject: String,
    pub outcome: String,
    pub reason: String,
    #[serde(skip)]
    pub mac: Vec<u8>,
    /// The public chain hash (32 bytes).
    #[serde(skip)]
    pub hash: Vec<u8>,
}

/// Length-prefixed fields so no two different records share canonical bytes.
pub fn canonical_bytes(seq: u64, e: &AuditEntry) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + e.principal.len() + e.subject.len() + e.reason.len());
    out.extend_from_slice(b"tokenvault/v1/audit-record\0");
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&e.at.to_be_bytes());
    for field in [
        &e.principal,
        &e.peer,
        &e.action,
        &e.subject,
        &e.outcome,
        &e.reason,
    ] {
        out.extend_from_slice(&(field.len() as u32).to_be_bytes());
        out.extend_from_slice(field.as_bytes());
    }
    out
}

impl AuditRecord {
    pub fn entry(&self) -> AuditEntry {
        AuditEntry {
            at: self.at,
            principal: self.principal.clone(),
            peer: self.peer.clone(),
            action: self.action.clone(),
            subject: self.subject.clone(),
            outcome: self.outcome.clone(),
            reason: self.reason.clone(),
        }
    }
    pub fn time_rfc3339(&self) -> String {
        chrono::DateTime::from_timestamp_micros(self.at)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
            .unwrap_or_default()
    }
}

/// Result of walking the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verification {
    Ok {
        records: u64,
    },
    /// First sequence number at which the chain no longer holds.
    Broken {
        seq: u64,
        why: &'static str,
    },
    /// The first checkpoint (by line of the checkpoint file) that the trail contradicts.
    Contradicted {
        line: usize,
        seq: u64,
        why: String,
    },
}

impl Verification {
    pub fn is_ok(&self) -> bool {
        matches!(self, Verification::Ok { .. })
    }
    /// One line for people.
    pub fn describe(&self) -> String {
        match self {
            Verification::Ok { records } => format!("{records} records, chain intact"),
            Verification::Broken { seq, why } => format!("BROKEN at sequence {seq}: {why}"),
            Verification::Contradicted { line, seq, why } => {
                format!("CONTRADICTS checkpoint at line {line} (sequence {seq}): {why}")
            }
        }
    }
}

/// Incremental check of the HMAC chain: feed records in ascending `seq` order.
pub struct ChainVerifier {
    prev_mac: Vec<u8>,
    expected_seq: u64,
    count: u64,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        ChainVerifier::new()
    }
}

impl ChainVerifier {
    pub fn new() -> Self {
        ChainVerifier {
            prev_mac: GENESIS_MAC.to_vec(),
            expected_seq: 1,
            count: 0,
        }
    }
    /// `Err` names the first broken sequence number.
    pub fn feed(&mut self, key: &AuditKey, rec: &AuditRecord) -> Result<(), Verification> {
        if rec.seq != self.expected_seq {
            // A gap means a removed record; a smaller number means reordering or insertion.
            return Err(Verification::Broken {
                seq: self.expected_seq,
                why: "record missing or out of order",
            });
        }
        let bytes = canonical_bytes(rec.seq, &rec.entry());
        if !key.verify(&self.prev_mac, &bytes, &rec.mac) {
            return Err(Verification::Broken {
                seq: rec.seq,
                why: "record altered or chain broken",
            });
        }
        self.prev_mac = rec.mac.clone();
        self.expected_seq += 1;
        self.count += 1;
        Ok(())
    }
    pub fn finish(self) -> Verification {
        Verification::Ok {
            records: self.count,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Signed checkpoints

/// First line of every signed checkpoint message.
pub const CHECKPOINT_LABEL: &str = "tokenvault/v1/audit-checkpoint";
/// First line of every key handover message.
pub const HANDOVER_LABEL: &str = "tokenvault/v1/audit-key-handover";
/// Action of the record that rotates the audit signing key.
pub const ROTATE_ACTION: &str = "audit_key_rotate";

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

fn rfc3339(at: Micros) -> String {
    chrono::DateTime::from_timestamp_micros(at)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_default()
}

/// A signed statement "the audit chain of vault V has record `seq` with chain hash `hash`",
/// one JSON line of a checkpoint file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Vault id, hex.
    pub vault: String,
    pub seq: u64,
    /// Chain hash of record `seq`, hex.
    pub hash: String,
    /// `at` in RFC 3339, for people (not signed; `at` is).
    pub time: String,
    /// Signing time, microseconds since the Unix epoch.
    pub at: Micros,
    /// Id of the signing key (see [`AuditPublicKey::key_id`]).
    pub key_id: String,
    /// Ed25519 signature over [`Checkpoint::signed_message`], base64.
    pub signature: String,
}

impl Checkpoint {
    /// `tokenvault/v1/audit-checkpoint\n` vault `\n` seq `\n` hash `\n` at `\n` key id `\n`:
    /// one field a line, none of which can contain a newline.
    pub fn signed_message(&self) -> Vec<u8> {
        format!(
            "{CHECKPOINT_LABEL}\n{}\n{}\n{}\n{}\n{}\n",
            self.vault, self.seq, self.hash, self.at, self.key_id
        )
        .into_bytes()
    }

    pub fn sign(vault: &str, seq: u64, hash: &[u8; 32], at: Micros, key: &AuditSigningKey) -> Self {
        let mut cp = Checkpoint {
            vault: vault.to_owned(),
            seq,
            hash: hex(hash),
            time: rfc3339(at),
            at,
            key_id: key.public_key().key_id(),
            signature: String::new(),
        };
        cp.signature = b64(&key.sign(&cp.signed_message()));
        cp
    }

    pub fn verify_signature(&self, key: &AuditPublicKey) -> bool {
        let single_line = |f: &str| !f.contains('\n');
        single_line(&self.vault)
            && single_line(&self.hash)
            && single_line(&self.key_id)
            && unb64(&self.signature).is_some_and(|sig| key.verify(&self.signed_message(), &sig))
    }

    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn parse(line: &str) -> Result<Checkpoint, String> {
        serde_json::from_str(line).map_err(|e| format!("not a checkpoint: {e}"))
    }
}

/// A checkpoint file's lines: line number (from 1) and the checkpoint, or why it is none.
pub type CheckpointLines = Vec<(usize, Result<Checkpoint, String>)>;

/// The lines of a checkpoint file, numbered from 1; a malformed line is kept as an error (it
/// contradicts the trail). A write torn by a crash (a final line without its newline, or a
/// line that is a cut-off JSON object, which [`CheckpointFile::open`] terminates before
/// appending again) is skipped: it cannot vouch for anything.
pub fn read_checkpoints(path: &Path) -> std::io::Result<CheckpointLines> {
    let text = std::fs::read_to_string(path)?;
    Ok(parse_checkpoints(&text))
}

pub fn parse_checkpoints(text: &str) -> CheckpointLines {
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .filter_map(|(i, l)| match serde_json::from_str::<Checkpoint>(l) {
            Ok(cp) => Some((i + 1, Ok(cp))),
            Err(e) if e.is_eof() => None,
            Err(e) => Some((i + 1, Err(format!("not a checkpoint: {e}")))),
        })
        .collect()
}

/// What the previous signing key signs when it hands over to the next one: the rotation
/// record's position (vault, sequence, previous chain hash), its own id and the new key.
pub fn handover_message(
    vault: &str,
    seq: u64,
    prev_hash: &[u8; 32],
    old_key_id: &str,
    new_key: &AuditPublicKey,
) -> Vec<u8> {
    format!(
        "{HANDOVER_LABEL}\n{vault}\n{seq}\n{}\n{old_key_id}\n{}\n",
        hex(prev_hash),
        new_key.to_text()
    )
    .into_bytes()
}

/// The reason field of an `audit_key_rotate` record.
pub fn rotation_reason(new_key: &AuditPublicKey, old_key_id: &str, handover: &[u8; 64]) -> String {
    format!(
        "new_key={} old_key={old_key_id} handover={}",
        new_key.to_text(),
        b64(handover)
    )
}

fn parse_rotation_reason(reason: &str) -> Option<(AuditPublicKey, String, Vec<u8>)> {
    let mut new_key = None;
    let mut old = None;
    let mut sig = None;
    for part in reason.split(' ') {
        match part.split_once('=') {
            Some(("new_key", v)) => new_key = AuditPublicKey::parse(v),
            Some(("old_key", v)) => old = Some(v.to_owned()),
            // base64 may end in '=': split only at the first one.
            Some(("handover", v)) => sig = unb64(v),
            _ => {}
        }
    }
    Some((new_key?, old?, sig?))
}

/// Where a key may sign: the stretch of the chain it was the active key for.
struct KeyWindow {
    key: AuditPublicKey,
    from: u64,
    until: Option<u64>,
}

/// The outcome of [`TrailVerifier::finish`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrailReport {
    pub verification: Verification,
    /// Checkpoints checked against the trail (all of them when the trail passes).
    pub checkpoints: usize,
    /// Newest sequence number a valid checkpoint covers.
    pub last_checkpoint_seq: Option<u64>,
    /// Last record seen and its chain hash.
    pub head_seq: u64,
    pub head_hash: [u8; 32],
}

/// Checks records against the public hash chain and against signed checkpoints, with public
/// information only. Feed every record from sequence 1 in order. It keeps walking after a
/// break, so that a checkpoint contradicted further on is still named.
pub struct TrailVerifier {
    vault: String,
    expected_seq: u64,
    prev_hash: [u8; 32],
    count: u64,
    keys: HashMap<String, KeyWindow>,
    /// Well-formed checkpoints sorted by sequence number.
    checkpoints: Vec<(usize, Checkpoint)>,
    next: usize,
    checked: usize,
    last_checkpoint_seq: Option<u64>,
    broken: Option<(u64, &'static str)>,
    contradictions: Vec<(usize, u64, String)>,
}

impl TrailVerifier {
    /// `vault`: hex id of the vault the trail belongs to; `trusted`: public keys trusted from
    /// outside (keys rotated in later are learned from the chain).
    pub fn new(
        vault: &str,
        trusted: &[AuditPublicKey],
        checkpoints: CheckpointLines,
    ) -> TrailVerifier {
        let mut contradictions = Vec::new();
        let mut good = Vec::new();
        for (line, cp) in checkpoints {
            match cp {
                Ok(cp) => good.push((line, cp)),
                Err(e) => contradictions.push((line, 0, e)),
            }
        }
        good.sort_by_key(|(line, cp)| (cp.seq, *line));
        let keys = trusted
            .iter()
            .map(|k| {
                (
                    k.key_id(),
                    KeyWindow {
                        key: *k,
                        from: 0,
                        until: None,
                    },
                )
            })
            .collect();
        let mut v = TrailVerifier {
            vault: vault.to_owned(),
            expected_seq: 1,
            prev_hash: AUDIT_GENESIS_HASH,
            count: 0,
            keys,
            checkpoints: good,
            next: 0,
            checked: 0,
            last_checkpoint_seq: None,
            broken: None,
            contradictions,
        };
        // A checkpoint of the empty trail.
        v.check_checkpoints_up_to(0, AUDIT_GENESIS_HASH);
        v
    }

    /// `stored_hash`: the hash stored beside the record (database column or export field).
    pub fn feed(&mut self, rec: &AuditRecord, stored_hash: Option<&[u8]>) {
        if self.broken.is_none() && rec.seq != self.expected_seq {
            self.broken = Some((self.expected_seq, "record missing or out of order"));
        }
        let hash = audit_chain_hash(&self.prev_hash, &canonical_bytes(rec.seq, &rec.entry()));
        if self.broken.is_none() && stored_hash.is_some_and(|h| h != hash) {
            self.broken = Some((rec.seq, "record altered or chain broken (hash)"));
        }
        if rec.action == ROTATE_ACTION && rec.outcome == "OK" {
            self.learn_rotation(rec);
        }
        // A checkpoint for a sequence number the trail skipped names a missing record.
        while let Some((line, cp)) = self.checkpoints.get(self.next) {
            if cp.seq >= rec.seq {
                break;
            }
            self.contradictions.push((
                *line,
                cp.seq,
                format!("the trail has no record {} (removed or reordered)", cp.seq),
            ));
            self.next += 1;
        }
        self.check_checkpoints_up_to(rec.seq, hash);
        self.prev_hash = hash;
        self.expected_seq = rec.seq.max(self.expected_seq) + 1;
        self.count += 1;
    }

    fn learn_rotation(&mut self, rec: &AuditRecord) {
        let Some((new_key, old_id, sig)) = parse_rotation_reason(&rec.reason) else {
            if self.broken.is_none() {
                self.broken = Some((rec.seq, "malformed audit key rotation record"));
            }
            return;
        };
        let Some(old) = self.keys.get(&old_id).map(|w| w.key) else {
            // Not a key this verifier trusts: the rotation grants no trust.
            return;
        };
        let message = handover_message(&self.vault, rec.seq, &self.prev_hash, &old_id, &new_key);
        if !old.verify(&message, &sig) {
            if self.broken.is_none() {
                self.broken = Some((rec.seq, "audit key rotation not signed by the previous key"));
            }
            return;
        }
        if let Some(w) = self.keys.get_mut(&old_id) {
            w.until = Some(rec.seq);
        }
        self.keys.insert(
            new_key.key_id(),
            KeyWindow {
                key: new_key,
                from: rec.seq,
                until: None,
            },
        );
    }

    fn check_checkpoints_up_to(&mut self, seq: u64, hash: [u8; 32]) {
        while let Some((line, cp)) = self.checkpoints.get(self.next) {
            if cp.seq != seq {
                break;
            }
            let (line, cp) = (*line, cp.clone());
            self.next += 1;
            self.checked += 1;
            if let Some(why) = self.contradiction(&cp, &hash) {
                self.contradictions.push((line, cp.seq, why));
            } else {
                self.last_checkpoint_seq = Some(cp.seq);
            }
        }
    }

    fn contradiction(&self, cp: &Checkpoint, hash: &[u8; 32]) -> Option<String> {
        if cp.vault != self.vault {
            return Some(format!("a checkpoint of another vault ({})", cp.vault));
        }
        if cp.time != rfc3339(cp.at) {
            return Some("its time does not match its signed timestamp".into());
        }
        let Some(window) = self.keys.get(&cp.key_id) else {
            return Some(format!(
                "signed by key {}, which is not a trusted audit key of this vault",
                cp.key_id
            ));
        };
        if !cp.verify_signature(&window.key) {
            return Some("bad signature (forged or altered checkpoint)".into());
        }
        if cp.seq < window.from || window.until.is_some_and(|u| cp.seq > u) {
            return Some(format!(
                "signed by key {} outside the part of the chain it was active for",
                cp.key_id
            ));
        }
        if unhex(&cp.hash).as_deref() != Some(&hash[..]) {
            return Some(format!(
                "record {} has chain hash {} but the checkpoint says {}: the trail up to it was \
                 altered, reordered or replaced (a fork, or a vault restored from another copy)",
                cp.seq,
                hex(hash),
                cp.hash
            ));
        }
        None
    }

    pub fn finish(mut self) -> TrailReport {
        let last = self.expected_seq - 1;
        for (line, cp) in &self.checkpoints[self.next..] {
            self.contradictions.push((
                *line,
                cp.seq,
                format!(
                    "it covers record {} but the trail ends at {last}: records are missing (a \
                     truncated tail, or a vault rolled back to an older copy)",
                    cp.seq
                ),
            ));
        }
        let verification = if let Some((line, seq, why)) = self
            .contradictions
            .into_iter()
            .min_by_key(|(line, ..)| *line)
        {
            Verification::Contradicted { line, seq, why }
        } else if let Some((seq, why)) = self.broken {
            Verification::Broken { seq, why }
        } else {
            Verification::Ok {
                records: self.count,
            }
        };
        TrailReport {
            verification,
            checkpoints: self.checked,
            last_checkpoint_seq: self.last_checkpoint_seq,
            head_seq: last,
            head_hash: self.prev_hash,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Export: Elastic Common Schema (ECS) JSON lines

/// ECS outcome: `success`, `failure`, or `unknown` for records that are not a yes/no.
fn ecs_outcome(outcome: &str) -> &'static str {
    match outcome {
        "OK" => "success",
        "" => "unknown",
        _ => "failure",
    }
}

/// One exported record as an ECS document. PCI DSS 10.2.2: user (`user.name`), type of event
/// (`event.action`), date and time (`@timestamp`), success or failure (`event.outcome`),
/// origination (`source.address`), affected data or resource (`tokenvault.subject`).
/// `tokenvault.*` carries what the chain hash needs byte for byte.
pub fn export_line(vault: &str, r: &AuditRecord) -> serde_json::Value {
    serde_json::json!({
        "@timestamp": r.time_rfc3339(),
        "event": {
            "kind": "event",
            "dataset": "tokenvault.audit",
            "id": format!("{vault}-{}", r.seq),
            "sequence": r.seq,
            "action": r.action,
            "outcome": ecs_outcome(&r.outcome),
            "reason": r.reason,
            "hash": hex(&r.hash),
        },
        "user": { "name": r.principal },
        "source": { "address": r.peer },
        "service": { "type": "tokenvault", "id": vault },
        "tokenvault": {
            "at_us": r.at,
            "outcome": r.outcome,
            "subject": r.subject,
        },
    })
}

/// Parses an [`export_line`] back into the vault id and the record (with its hash).
pub fn parse_export_line(line: &str) -> Result<(String, AuditRecord), String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let s = |ptr: &str| -> Result<String, String> {
        v.pointer(ptr)
            .and_then(|x| x.as_str())
            .map(str::to_owned)
            .ok_or_else(|| format!("missing {ptr}"))
    };
    let n = |ptr: &str| -> Result<i64, String> {
        v.pointer(ptr)
            .and_then(|x| x.as_i64())
            .ok_or_else(|| format!("missing {ptr}"))
    };
    let hash = unhex(&s("/event/hash")?).ok_or("event.hash is not hex")?;
    let rec = AuditRecord {
        seq: u64::try_from(n("/event/sequence")?).map_err(|_| "negative event.sequence")?,
        at: n("/tokenvault/at_us")?,
        principal: s("/user/name")?,
        peer: s("/source/address")?,
        action: s("/event/action")?,
        subject: s("/tokenvault/subject")?,
        outcome: s("/tokenvault/outcome")?,
        reason: s("/event/reason")?,
        mac: Vec::new(),
        hash,
    };
    Ok((s("/service/id")?, rec))
}

// ---------------------------------------------------------------------------------------
// The checkpoint file and the task that writes it

/// A checkpoint file opened for appending only (O_APPEND): the server never truncates or
/// rewrites it. Every line is synced to disk before the next is written.
pub struct CheckpointFile {
    file: std::fs::File,
    path: PathBuf,
}

impl CheckpointFile {
    pub fn open(path: &Path) -> std::io::Result<CheckpointFile> {
        use std::os::unix::fs::OpenOptionsExt;
        let existed = path.exists();
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .read(true)
            .create(true)
            .mode(0o640)
            .open(path)?;
        if existed && !ends_with_newline(&mut file)? {
            // A line torn by a crash: end it, so the next checkpoint starts a line of its own
            // (appending only; the torn bytes stay, and verifiers skip them).
            tracing::warn!(path = %path.display(), "the audit checkpoint file ends in a torn line");
            file.write_all(b"\n")?;
            file.sync_data()?;
        }
        if !existed {
            // Make the new directory entry durable too.
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(CheckpointFile {
            file,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One line, written with one `write` on an O_APPEND descriptor, then fsync'd.
    pub fn append(&mut self, cp: &Checkpoint) -> std::io::Result<()> {
        let mut line = cp.to_line();
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.file.sync_data()
    }
}

fn ends_with_newline(file: &mut std::fs::File) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(true);
    }
    file.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

/// How often the checkpointer looks at the chain's head.
pub const CHECKPOINT_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// The running checkpoint writer of a server.
pub struct Checkpointer {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Option<(u64, String)>>,
    file: Arc<Mutex<CheckpointFile>>,
    vault: crate::vault::Vault,
}

/// Refuses to append to a checkpoint file whose newest checkpoint this vault contradicts
/// (restored from an older backup, or another vault): its checkpoints would describe a
/// different history. Acknowledge a deliberate restore by starting a new file.
pub async fn check_file_against_vault(
    vault: &crate::vault::Vault,
    path: &Path,
) -> crate::error::Result<()> {
    use crate::error::Error;
    let lines = match read_checkpoints(path) {
        Ok(lines) => lines,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(Error::Unavailable(format!(
                "cannot read the audit checkpoint file {}: {e}",
                path.display()
            )))
        }
    };
    let Some((line, newest)) = lines
        .into_iter()
        .filter_map(|(l, c)| c.ok().map(|c| (l, c)))
        .max_by_key(|(l, _)| *l)
    else {
        return Ok(());
    };
    let ours = vault.audit_vault_id().await?;
    let record = vault.audit_records(newest.seq, 1).await?;
    let contained = newest.vault == ours
        && record
            .first()
            .is_some_and(|r| r.seq == newest.seq && hex(&r.hash) == newest.hash);
    if contained {
        return Ok(());
    }
    Err(Error::FailedPrecondition(format!(
        "the audit checkpoint file {} (line {line}) records sequence {} with a chain hash this \
         vault does not have: the vault was rolled back (restored from an older backup), \
         altered, or is another vault. Investigate with `tokenvault audit verify --checkpoints \
         {}`; to acknowledge a deliberate restore, keep that file as evidence and start a new \
         checkpoint file",
        path.display(),
        newest.seq,
        path.display()
    )))
}

/// Starts the task that appends a signed checkpoint whenever the chain's head moved, polled
/// every [`CHECKPOINT_POLL`]. It reads the head after commits, on a reader, so signing and
/// fsyncing the file never sit on the writer's path.
pub fn spawn_checkpointer(vault: crate::vault::Vault, file: CheckpointFile) -> Checkpointer {
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let file = Arc::new(Mutex::new(file));
    let (v, f) = (vault.clone(), file.clone());
    let task = tokio::spawn(async move {
        let mut last: Option<(u64, String)> = None;
        let mut tick = tokio::time::interval(CHECKPOINT_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopped.changed() => break,
            }
            write_if_moved(&v, &f, &mut last).await;
        }
        last
    });
    Checkpointer {
        stop,
        task,
        file,
        vault,
    }
}

async fn write_if_moved(
    vault: &crate::vault::Vault,
    file: &Arc<Mutex<CheckpointFile>>,
    last: &mut Option<(u64, String)>,
) {
    let cp = match vault.audit_checkpoint().await {
        Ok(Some(cp)) => cp,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(error = %e, "cannot sign an audit checkpoint");
            return;
        }
    };
    if last.as_ref() == Some(&(cp.seq, cp.hash.clone())) {
        return;
    }
    let seq_hash = (cp.seq, cp.hash.clone());
    let file = file.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
        file.append(&cp)
            .map_err(|e| format!("{}: {e}", file.path().display()))
    })
    .await;
    match result {
        Ok(Ok(())) => *last = Some(seq_hash),
        Ok(Err(e)) => tracing::error!(error = %e, "cannot append an audit checkpoint"),
        Err(e) => tracing::error!(error = %e, "audit checkpoint writer failed"),
    }
}

impl Checkpointer {
    /// Stops polling and writes the final checkpoint (call after the last audit record, e.g.
    /// `server_stop`, is committed and before the vault closes).
    pub async fn finish(self) {
        let _ = self.stop.send(true);
        let mut last = self.task.await.unwrap_or_default();
        write_if_moved(&self.vault, &self.file, &mut last).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Ed25519 base point: a valid public key.
    const KEY: &str = "ed25519:WGZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmY=";

    #[test]
    fn a_rotation_record_keeps_a_reason_whose_key_id_reads_like_a_card() {
        let new_key = AuditPublicKey::parse(KEY).expect("valid key");
        // A real old key id (from a run that broke the trail): 12 digits between letters.
        let reason = rotation_reason(&new_key, "c520676337360a37", &[7u8; 64]);
        assert!(
            crate::card::contains_card_number(&reason),
            "the filter reads this reason as holding a card"
        );
        let caller = Caller::new("system", "local");
        let entry = AuditEntry::key_rotation(&caller, "audit key 2", reason.clone());
        assert_eq!(entry.reason, reason);
        assert_eq!(entry.action, ROTATE_ACTION);
        let (key, old, sig) = parse_rotation_reason(&entry.reason).expect("parses");
        assert_eq!(
            (key, old.as_str(), sig),
            (new_key, "c520676337360a37", vec![7u8; 64])
        );
        // Any other record's reason keeps the filter.
        let other = AuditEntry::new(&caller, "detokenize", "tok", "OK", &reason);
        assert_eq!(other.reason, REASON_WITHHELD);
    }
}
