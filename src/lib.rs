//! tokenvault
pub mod audit;
pub mod auth;
pub mod bench;
pub mod card;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod error;
pub mod grpc;
pub mod hardening;
pub mod keyring;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod probes;
pub mod proxy;
pub mod ratelimit;
pub mod store;
pub mod token;
pub mod vault;

/// The git commit this binary was built from (`unknown` without git), set by `build.rs`.
pub const GIT_COMMIT: &str = env!("TOKENVAULT_GIT_COMMIT");
/// `--version`: the crate version and the commit, e.g. `0.1.0 (0710e6b2c3d4)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("TOKENVAULT_GIT_COMMIT"),
    ")"
);
