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
pub mod metrics;
pub mod probes;
pub mod ratelimit;
pub mod store;
pub mod token;
pub mod vault;
