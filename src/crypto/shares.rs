//! Split knowledge for a master key held as bytes: Shamir's scheme over GF(256) (the `blahaj`
//! crate, a maintained fork of `sharks` that zeroizes its shares), one polynomial per key
//! byte, so any K of the N shares rebuild the key and K−1 reveal nothing about it.
//!
//! A share file is text a custodian can read (and print):
//!
//! ```text
//! tokenvault master-key share v1
//! vault: 0123456789abcdef0123456789abcdef
//! set: 89abcdef01234567
//! index: 2
//! shares: 5
//! threshold: 3
//! share: <base64 of x ‖ y (33 bytes)>
//! ```
//!
//! `set` is random per split: shares of different splits (say, before and after a custodian
//! left) are refused together instead of combining into garbage. Neither `vault` nor `set`
//! is secret; the header lines are checked against each other before any share is used, and
//! every refusal names only the offending file's own fields, never another share's.

use base64::Engine as _;
use zeroize::{Zeroize, Zeroizing};

use super::{random_bytes, KeyError, MasterKey, VaultId, KEY_LEN};

const MAGIC: &str = "tokenvault master-key share v1";

/// One parsed share file. The share bytes are wiped on drop; `Debug` shows only the header.
pub struct Share {
    pub vault: VaultId,
    pub set: [u8; 8],
    pub index: u8,
    pub shares: u8,
    pub threshold: u8,
    share: blahaj::Share,
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Share(vault {}, index {} of {}, threshold {}, <redacted>)",
            self.vault.to_hex(),
            self.index,
            self.shares,
            self.threshold
        )
    }
}

fn bad(detail: impl Into<String>) -> KeyError {
    KeyError::Share(detail.into())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Share {
    /// The file's text (it holds the share: write it with mode 0600).
    pub fn to_text(&self) -> Zeroizing<String> {
        let mut bytes = Zeroizing::new(Vec::<u8>::from(&self.share));
        let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&bytes[..]));
        bytes.zeroize();
        Zeroizing::new(format!(
            "{MAGIC}\nvault: {}\nset: {}\nindex: {}\nshares: {}\nthreshold: {}\nshare: {}\n",
            self.vault.to_hex(),
            hex(&self.set),
            self.index,
            self.shares,
            self.threshold,
            b64.as_str()
        ))
    }

    pub fn parse(text: &str) -> Result<Share, KeyError> {
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        if lines.next() != Some(MAGIC) {
            return Err(bad(format!(
                "not a share file (the first line must be `{MAGIC}`)"
            )));
        }
        let (mut vault, mut set, mut index, mut shares, mut threshold, mut share) =
            (None, None, None, None, None, None);
        for line in lines {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| bad("a line without `name: value`"))?;
            let value = value.trim();
            match name.trim() {
                "vault" => vault = Some(unhex::<16>(value).ok_or_else(|| bad("bad vault id"))?),
                "set" => set = Some(unhex::<8>(value).ok_or_else(|| bad("bad set id"))?),
                "index" => index = value.parse::<u8>().ok(),
                "shares" => shares = value.parse::<u8>().ok(),
                "threshold" => threshold = value.parse::<u8>().ok(),
                "share" => {
                    let bytes = Zeroizing::new(
                        base64::engine::general_purpose::STANDARD
                            .decode(value)
                            .map_err(|_| bad("the share is not base64"))?,
                    );
                    if bytes.len() != KEY_LEN + 1 {
                        return Err(bad("the share has the wrong length"));
                    }
                    share = Some(
                        blahaj::Share::try_from(&bytes[..]).map_err(|_| bad("malformed share"))?,
                    );
                }
                _ => return Err(bad("unknown line in the share file")),
            }
        }
        let missing = |what: &str| bad(format!("the share file has no valid `{what}` line"));
        let share = Share {
            vault: VaultId(vault.ok_or_else(|| missing("vault"))?),
            set: set.ok_or_else(|| missing("set"))?,
            index: index.ok_or_else(|| missing("index"))?,
            shares: shares.ok_or_else(|| missing("shares"))?,
            threshold: threshold.ok_or_else(|| missing("threshold"))?,
            share: share.ok_or_else(|| missing("share"))?,
        };
        if share.threshold < 2
            || share.threshold > share.shares
            || share.index == 0
            || share.index > share.shares
            || share.share.x.0 != share.index
        {
            return Err(bad("inconsistent index, shares and threshold"));
        }
        Ok(share)
    }
}

/// Splits a master key held as bytes into `shares` shares, any `threshold` of which rebuild
/// it. Refused for a key inside a token (its bytes are not here to split).
pub fn split(
    master: &MasterKey,
    vault: &VaultId,
    shares: u8,
    threshold: u8,
) -> Result<Vec<Share>, KeyError> {
    let Some(bytes) = master.bytes() else {
        return Err(bad(
            "a master key inside a PKCS#11 token cannot be split: its bytes never leave the token",
        ));
    };
    if threshold < 2 || threshold > shares {
        return Err(bad(format!(
            "need 2 <= threshold <= shares (got threshold {threshold}, shares {shares})"
        )));
    }
    let set: [u8; 8] = random_bytes();
    // The dealer numbers its shares x = 1, 2, …
    Ok(blahaj::Sharks(threshold)
        .dealer(&bytes[..])
        .take(shares as usize)
        .map(|share| Share {
            vault: *vault,
            set,
            index: share.x.0,
            shares,
            threshold,
            share,
        })
        .collect())
}

/// Why shares could not be combined yet, or at all.
#[derive(Debug, PartialEq, Eq)]
pub enum Combine {
    /// `have` consistent shares so far, `need` in all.
    NeedMore { have: usize, need: usize },
}

/// Collects shares one at a time (the unseal socket) or all at once (`master-key combine`).
/// A share that does not fit those already accepted (another vault, another split, a
/// repeated index) is refused without touching them.
#[derive(Default)]
pub struct Collector {
    shares: Vec<Share>,
}

impl Collector {
    pub fn new() -> Collector {
        Collector::default()
    }

    pub fn len(&self) -> usize {
        self.shares.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shares.is_empty()
    }

    /// Accepts `share` for vault `vault`. The message of a refusal speaks only of this share.
    pub fn add(&mut self, vault: &VaultId, share: Share) -> Result<(), KeyError> {
        if share.vault != *vault {
            return Err(bad(format!(
                "this share is for vault {}, not this vault",
                share.vault.to_hex()
            )));
        }
        if let Some(first) = self.shares.first() {
            if share.set != first.set
                || share.shares != first.shares
                || share.threshold != first.threshold
            {
                return Err(bad(
                    "this share belongs to a different split of the master key than the shares \
                     already given",
                ));
            }
        }
        if self.shares.iter().any(|s| s.index == share.index) {
            return Err(bad(format!("share {} was already given", share.index)));
        }
        self.shares.push(share);
        Ok(())
    }

    /// The key, once enough shares are in; check it against the vault before use (a share
    /// altered in its `share:` line rebuilds a wrong key, which only the key check detects).
    pub fn combine(&self) -> Result<Result<MasterKey, KeyError>, Combine> {
        let need = self.shares.first().map_or(2, |s| s.threshold as usize);
        if self.shares.len() < need {
            return Err(Combine::NeedMore {
                have: self.shares.len(),
                need,
            });
        }
        let shares: Vec<&blahaj::Share> = self.shares.iter().map(|s| &s.share).collect();
        Ok(match blahaj::Sharks(need as u8).recover(shares) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                MasterKey::from_bytes(&bytes)
            }
            Err(_) => Err(bad("the shares could not be combined")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_k_of_n_rebuild_the_key_and_k_minus_1_do_not() {
        let master = MasterKey::generate();
        let vault = VaultId::generate();
        let shares = split(&master, &vault, 5, 3).unwrap();
        let texts: Vec<_> = shares.iter().map(|s| s.to_text()).collect();
        for pick in [[0, 1, 2], [4, 2, 0], [1, 3, 4]] {
            let mut c = Collector::new();
            for i in pick {
                c.add(&vault, Share::parse(&texts[i]).unwrap()).unwrap();
            }
            let key = c.combine().unwrap().unwrap();
            assert_eq!(&key.0[..], &master.0[..]);
        }
        let mut c = Collector::new();
        c.add(&vault, Share::parse(&texts[0]).unwrap()).unwrap();
        c.add(&vault, Share::parse(&texts[1]).unwrap()).unwrap();
        assert_eq!(
            c.combine().err(),
            Some(Combine::NeedMore { have: 2, need: 3 })
        );
        // The share text never carries the key, and Debug hides the share.
        let b64 = base64::engine::general_purpose::STANDARD.encode(&master.0[..]);
        assert!(texts.iter().all(|t| !t.contains(&b64)));
        assert!(!format!("{:?}", shares[0]).contains(texts[0].lines().last().unwrap()));
    }

    #[test]
    fn foreign_repeated_and_mixed_shares_are_refused_alone() {
        let master = MasterKey::generate();
        let vault = VaultId::generate();
        let a = split(&master, &vault, 5, 3).unwrap();
        let b = split(&master, &vault, 5, 3).unwrap();
        let other = split(&MasterKey::generate(), &VaultId::generate(), 5, 3).unwrap();
        let mut c = Collector::new();
        let p = |s: &Share| Share::parse(&s.to_text()).unwrap();
        c.add(&vault, p(&a[0])).unwrap();
        let e = c.add(&vault, p(&other[1])).unwrap_err().to_string();
        assert!(e.contains("not this vault"), "{e}");
        let e = c.add(&vault, p(&b[1])).unwrap_err().to_string();
        assert!(e.contains("different split"), "{e}");
        let e = c.add(&vault, p(&a[0])).unwrap_err().to_string();
        assert!(e.contains("already given"), "{e}");
        assert_eq!(c.len(), 1, "refusals leave the accepted shares alone");
        assert!(Share::parse("hello").is_err());
        assert!(split(&master, &vault, 3, 4).is_err());
        assert!(split(&master, &vault, 3, 1).is_err());
    }
}
