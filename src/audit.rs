//! The tamper-evident audit trail.
//!
//! Each record carries an HMAC-SHA256 (under the vault's random audit key, stored wrapped by
//! the master key) over its canonical bytes and the previous record's MAC, so changing,
//! removing, inserting or reordering a record breaks the chain from that point on, and nobody
//! without the master key can forge a consistent chain. Records are appended by the store's
//! single writer in the same group commits as the data they describe.
//!
//! A record never holds a PAN, a part of one beyond what `TokenInfo` shows, or any hash of one.

use serde::Serialize;

use crate::crypto::AuditKey;
use crate::vault::{Caller, Micros};

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
}

/// Incremental verifier: feed records in ascending `seq` order.
pub struct ChainVerifier<'k> {
    key: &'k AuditKey,
    prev_mac: Vec<u8>,
    expected_seq: u64,
    count: u64,
}

impl<'k> ChainVerifier<'k> {
    pub fn new(key: &'k AuditKey) -> Self {
        ChainVerifier {
            key,
            prev_mac: GENESIS_MAC.to_vec(),
            expected_seq: 1,
            count: 0,
        }
    }
    /// `Err` names the first broken sequence number.
    pub fn feed(&mut self, rec: &AuditRecord) -> Result<(), Verification> {
        if rec.seq != self.expected_seq {
            // A gap means a removed record; a smaller number means reordering or insertion.
            return Err(Verification::Broken {
                seq: self.expected_seq,
                why: "record missing or out of order",
            });
        }
        let bytes = canonical_bytes(rec.seq, &rec.entry());
        if !self.key.verify(&self.prev_mac, &bytes, &rec.mac) {
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
