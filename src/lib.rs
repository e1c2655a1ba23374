//! tokenvault
pub mod audit;
pub mod auth;
pub mod card;
pub mod cli;
pub mod crypto;
pub mod error;
pub mod grpc;
pub mod keyring;
pub mod store;
pub mod token;
pub mod vault;
