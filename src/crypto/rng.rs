//! Randomness for values that are public once used: the GCM nonce of each sealed PAN and the
//! random part of each token.
//!
//! Both are drawn on every tokenize, and one `getrandom` system call each cost about 8% of
//! the server's CPU in a TokenizeBatch profile (the kernel's per-call CRNG set-up, not the
//! bytes). Here each thread reads the kernel's CSPRNG 1 KiB at a time and hands every byte out
//! once, so the values are the same kernel output, fetched in fewer calls. Bytes are wiped as
//! they are handed out (and the rest when the thread ends), so a memory image shows no value
//! already used. Keys, API secrets and anything else secret keep drawing straight from
//! [`OsRng`] ([`super::random_bytes`]): a secret should not sit in a buffer before its use.

use std::cell::RefCell;

use rand::rngs::OsRng;
use rand::RngCore;
use zeroize::{Zeroize, Zeroizing};

const POOL_LEN: usize = 1024;

struct Pool {
    buf: Zeroizing<[u8; POOL_LEN]>,
    next: usize,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool {
        buf: Zeroizing::new([0; POOL_LEN]),
        next: POOL_LEN,
    });
}

/// Fills `out` with bytes of the OS CSPRNG, each used only once, for values that are public
/// once used (nonces, token bodies). Not for keys or secrets: [`super::random_bytes`].
pub fn public_random(out: &mut [u8]) {
    if out.len() > POOL_LEN / 4 {
        OsRng.fill_bytes(out);
        return;
    }
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let mut filled = 0;
        while filled < out.len() {
            if pool.next == POOL_LEN {
                OsRng.fill_bytes(&mut pool.buf[..]);
                pool.next = 0;
            }
            let n = (out.len() - filled).min(POOL_LEN - pool.next);
            let from = pool.next;
            out[filled..filled + n].copy_from_slice(&pool.buf[from..from + n]);
            pool.buf[from..from + n].zeroize();
            pool.next += n;
            filled += n;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_is_handed_out_once_across_refills() {
        // 3 pools' worth in odd sizes: no two draws of 12 bytes repeat, and the pool's
        // used bytes are wiped.
        let mut seen = std::collections::HashSet::new();
        for _ in 0..(3 * POOL_LEN / 12) {
            let mut nonce = [0u8; 12];
            public_random(&mut nonce);
            assert!(seen.insert(nonce), "a nonce repeated");
        }
        POOL.with(|p| {
            let p = p.borrow();
            assert!(p.buf[..p.next].iter().all(|&b| b == 0));
        });
    }

    #[test]
    fn large_requests_bypass_the_pool_and_are_random() {
        let (mut a, mut b) = ([0u8; POOL_LEN], [0u8; POOL_LEN]);
        public_random(&mut a);
        public_random(&mut b);
        assert_ne!(a, b);
        assert!(a.iter().any(|&x| x != 0));
    }
}
