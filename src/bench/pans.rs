//! Synthetic test card numbers for load generation: valid (Luhn-correct, 12..=19 digits),
//! varied across brands and lengths, and reproducible from a seed.
//!
//! The numbers are random, not real cards, but they are shaped like real ones, so they are
//! treated as card data all the same: nothing in the bench ever prints them.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::card::luhn_check_digit;

/// (weight, IIN prefixes (one is drawn), total length) of one brand profile.
struct Profile {
    weight: u32,
    prefixes: &'static [&'static str],
    len: usize,
}

/// Roughly the mix of a card-present acquirer, with every supported shape represented.
const PROFILES: &[Profile] = &[
    // Visa 16 (and the rarer 19).
    Profile {
        weight: 40,
        prefixes: &["4"],
        len: 16,
    },
    Profile {
        weight: 2,
        prefixes: &["4"],
        len: 19,
    },
    // Mastercard 16: the 51-55 range and the 2-series (2221-2720).
    Profile {
        weight: 18,
        prefixes: &["51", "52", "53", "54", "55"],
        len: 16,
    },
    Profile {
        weight: 7,
        prefixes: &["2221", "2300", "2500", "2720"],
        len: 16,
    },
    // American Express 15.
    Profile {
        weight: 10,
        prefixes: &["34", "37"],
        len: 15,
    },
    // Discover 16.
    Profile {
        weight: 6,
        prefixes: &["6011", "644", "649", "65"],
        len: 16,
    },
    // JCB 16.
    Profile {
        weight: 4,
        prefixes: &["3528", "3550", "3589"],
        len: 16,
    },
    // Diners Club 14.
    Profile {
        weight: 3,
        prefixes: &["300", "305", "36", "38"],
        len: 14,
    },
    // UnionPay 16 and 19 (62, outside Discover's co-branded 622126-622925).
    Profile {
        weight: 4,
        prefixes: &["620", "624", "625"],
        len: 16,
    },
    Profile {
        weight: 3,
        prefixes: &["620", "624", "625"],
        len: 19,
    },
    // Maestro 12..19 and Mir 16.
    Profile {
        weight: 2,
        prefixes: &["6759", "6304"],
        len: 18,
    },
    Profile {
        weight: 1,
        prefixes: &["2200", "2204"],
        len: 16,
    },
];

/// Generates Luhn-valid card numbers of several brands from a seed.
pub struct PanGenerator {
    rng: StdRng,
    total_weight: u32,
}

impl PanGenerator {
    pub fn new(seed: u64) -> PanGenerator {
        PanGenerator {
            rng: StdRng::seed_from_u64(seed),
            total_weight: PROFILES.iter().map(|p| p.weight).sum(),
        }
    }

    /// The next card number: digits only.
    pub fn next_pan(&mut self) -> String {
        let mut pick = self.rng.gen_range(0..self.total_weight);
        let profile = PROFILES
            .iter()
            .find(|p| {
                if pick < p.weight {
                    true
                } else {
                    pick -= p.weight;
                    false
                }
            })
            .unwrap_or(&PROFILES[0]);
        let prefix = profile.prefixes[self.rng.gen_range(0..profile.prefixes.len())];
        let mut digits = Vec::with_capacity(profile.len);
        digits.extend_from_slice(prefix.as_bytes());
        while digits.len() < profile.len - 1 {
            digits.push(b'0' + self.rng.gen_range(0..10u8));
        }
        let check = luhn_check_digit(&digits);
        digits.push(check);
        // Only ASCII digits were pushed.
        String::from_utf8(digits).unwrap_or_default()
    }

    /// `n` card numbers.
    pub fn take(&mut self, n: usize) -> Vec<String> {
        (0..n).map(|_| self.next_pan()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::card::{Brand, Pan};
    use std::collections::HashSet;

    #[test]
    fn valid_varied_and_reproducible() {
        let a = PanGenerator::new(7).take(5000);
        let b = PanGenerator::new(7).take(5000);
        assert_eq!(a, b);
        assert_ne!(a, PanGenerator::new(8).take(5000));
        let mut brands = HashSet::new();
        let mut lens = HashSet::new();
        for p in &a {
            let pan = Pan::parse(p).expect("generated PAN parses");
            brands.insert(pan.brand());
            lens.insert(pan.len());
        }
        for b in [
            Brand::Visa,
            Brand::Mastercard,
            Brand::Amex,
            Brand::Discover,
            Brand::Jcb,
            Brand::DinersClub,
            Brand::UnionPay,
            Brand::Maestro,
            Brand::Mir,
        ] {
            assert!(brands.contains(&b), "{b:?} missing");
        }
        for l in [14, 15, 16, 18, 19] {
            assert!(lens.contains(&l), "length {l} missing");
        }
        assert!(!brands.contains(&Brand::Unknown));
    }
}
