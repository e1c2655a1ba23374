//! Micro-benchmarks of the per-request CPU work of the vault: parsing a card number,
//! drawing a token, sealing and opening a PAN, and the keyed fingerprint.
//!
//! Run with `cargo bench --bench core`. The card numbers are synthetic test numbers.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use tokenvault::bench::pans::PanGenerator;
use tokenvault::card::Pan;
use tokenvault::crypto::{DataKey, FingerprintKey, SecretKey};
use tokenvault::token::{self, TokenFormat};

fn pan_parse(c: &mut Criterion) {
    let pans = PanGenerator::new(1).take(1024);
    let mut g = c.benchmark_group("pan_parse");
    g.throughput(Throughput::Elements(1));
    g.bench_function("digits_16", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % pans.len();
            black_box(Pan::parse(black_box(&pans[i])).is_ok())
        })
    });
    g.bench_function("grouped_4111", |b| {
        b.iter(|| black_box(Pan::parse(black_box("4111 1111 1111 1111")).is_ok()))
    });
    g.bench_function("reject_luhn", |b| {
        b.iter(|| black_box(Pan::parse(black_box("4111111111111112")).is_err()))
    });
    g.finish();
}

fn token_generate(c: &mut Criterion) {
    let pan = Pan::parse("4111111111111111").expect("test PAN");
    let mut g = c.benchmark_group("token_generate");
    g.throughput(Throughput::Elements(1));
    for (name, format) in [
        ("opaque", TokenFormat::Opaque),
        ("pan_shaped", TokenFormat::PanShaped),
        ("pan_shaped_keep_bin", TokenFormat::PanShapedKeepBin),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| black_box(token::generate(format, &pan)))
        });
    }
    g.finish();
}

fn seal_open(c: &mut Criterion) {
    let key = DataKey::new(1, SecretKey::generate());
    let token = "tok_AAAAAAAAAAAAAAAAAAAAAAAA";
    let digits = b"4111111111111111";
    // Canonical metadata of a typical row (row format 2 binds it).
    let meta = tokenvault::store::canonical_meta(1, 2, 16, "411111", "1111", 1 << 50, None);
    let sealed = key.seal(token, &meta, digits);
    let mut g = c.benchmark_group("crypto");
    g.throughput(Throughput::Elements(1));
    g.bench_function("seal", |b| {
        b.iter(|| black_box(key.seal(black_box(token), &meta, black_box(digits))))
    });
    g.bench_function("open", |b| {
        b.iter(|| {
            black_box(
                key.open(
                    tokenvault::crypto::ROW_FORMAT,
                    black_box(token),
                    &meta,
                    &sealed.nonce,
                    &sealed.ciphertext,
                )
                .is_ok(),
            )
        })
    });
    g.bench_function("data_key_schedule", |b| {
        b.iter_batched(
            SecretKey::generate,
            |k| black_box(DataKey::new(1, k)),
            BatchSize::SmallInput,
        )
    });
    let fp = FingerprintKey::new(SecretKey::generate());
    g.bench_function("fingerprint", |b| {
        b.iter(|| black_box(fp.fingerprint(black_box(digits))))
    });
    g.finish();
}

criterion_group!(benches, pan_parse, token_generate, seal_open);
criterion_main!(benches);
