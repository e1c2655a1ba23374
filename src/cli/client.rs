//! The client commands: `tokenize`, `detokenize`, `info`, `delete`, `health`. They talk to a
//! running server over gRPC, like any other client.
//!
//! `tokenize` reads the card number from standard input, never from the command line (which
//! other local users can see and shells keep in history); on a terminal it is not echoed.

use std::io::Read;

use clap::{Args, ValueEnum};
use zeroize::Zeroizing;

use super::common::{format_time, CliError};
use crate::grpc::client::{tls_endpoint, with_auth, BearerAuth, Client, ClientTlsFiles};
use crate::grpc::convert::{micros_to_timestamp, timestamp_to_micros};
use crate::grpc::pb;

/// How to reach the server and who we are. (No `Debug`: it holds the API key.)
#[derive(Args, Clone)]
pub struct ConnectArgs {
    /// Server address.
    #[arg(
        long,
        env = "TOKENVAULT_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub addr: String,
    /// API key. Prefer the TOKENVAULT_API_KEY environment variable: command lines are
    /// visible to other local users.
    #[arg(
        long,
        env = "TOKENVAULT_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<String>,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// TLS options of the client commands (an `https://` address needs `--tls-ca`).
#[derive(Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// PEM CA certificate that signed the server's certificate.
    #[arg(long, env = "TOKENVAULT_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate for mutual TLS.
    #[arg(
        long,
        env = "TOKENVAULT_CLIENT_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(
        long,
        env = "TOKENVAULT_CLIENT_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<std::path::PathBuf>,
    /// Server name to verify the certificate against (default: the address's host).
    #[arg(long, value_name = "NAME")]
    pub tls_domain: Option<String>,
}

impl TlsArgs {
    pub(crate) fn files(&self) -> ClientTlsFiles {
        ClientTlsFiles {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            domain: self.tls_domain.clone(),
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FormatArg {
    Opaque,
    PanShaped,
    PanShapedKeepBin,
}

impl FormatArg {
    fn to_pb(self) -> pb::TokenFormat {
        match self {
            FormatArg::Opaque => pb::TokenFormat::Opaque,
            FormatArg::PanShaped => pb::TokenFormat::PanShaped,
            FormatArg::PanShapedKeepBin => pb::TokenFormat::PanShapedKeepBin,
        }
    }
}

/// Tokenize the card number read from standard input; prints the token.
#[derive(Args, Clone)]
pub struct TokenizeArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Token format.
    #[arg(long, value_enum, default_value_t = FormatArg::Opaque)]
    pub format: FormatArg,
    /// Return the existing live token for this card and format instead of a new one.
    #[arg(long)]
    pub reuse_existing: bool,
    /// Make the token expire this long from now: seconds, or e.g. 90m, 30d, 2w.
    #[arg(long, value_name = "DURATION", value_parser = parse_expires_in)]
    pub expires_in: Option<u32>,
    /// Print the full response as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Reveal the card number behind a token; prints the digits.
#[derive(Args, Clone)]
pub struct DetokenizeArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    pub token: String,
    /// Why the card number is needed; recorded in the audit trail.
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Print the full response as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A command on one token.
#[derive(Args, Clone)]
pub struct TokenArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    pub token: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Ask the server's health service whether it is serving.
#[derive(Args, Clone, Debug)]
pub struct HealthArgs {
    /// Server address.
    #[arg(
        long,
        env = "TOKENVAULT_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub addr: String,
    /// Service to ask about; empty means the whole server.
    #[arg(long, default_value = "")]
    pub service: String,
    #[command(flatten)]
    pub tls: TlsArgs,
}

pub async fn tokenize(args: TokenizeArgs) -> Result<(), CliError> {
    let pan = read_pan()?;
    let expires_at = args
        .expires_in
        .map(|s| micros_to_timestamp(crate::vault::now_micros() + i64::from(s) * 1_000_000));
    let mut client = connect(&args.connect).await?;
    let request = pb::TokenizeRequest {
        pan: pan.as_str().to_owned(),
        format: args.format.to_pb() as i32,
        reuse_existing: args.reuse_existing,
        expires_at,
    };
    // The request owns a copy of the digits; it is dropped as soon as the call returns.
    let response = client.tokenize(request).await?.into_inner();
    if args.json {
        let v = serde_json::json!({
            "token": response.token,
            "created": response.created,
            "info": response.info.as_ref().map(info_json),
        });
        println!("{v}");
    } else {
        println!("{}", response.token);
    }
    Ok(())
}

pub async fn detokenize(args: DetokenizeArgs) -> Result<(), CliError> {
    let mut client = connect(&args.connect).await?;
    let request = pb::DetokenizeRequest {
        token: args.token,
        reason: args.reason,
    };
    let response = client.detokenize(request).await?.into_inner();
    let pan = Zeroizing::new(response.pan);
    if args.json {
        let v = serde_json::json!({
            "pan": pan.as_str(),
            "info": response.info.as_ref().map(info_json),
        });
        println!("{v}");
    } else {
        println!("{}", pan.as_str());
    }
    Ok(())
}

pub async fn info(args: TokenArgs) -> Result<(), CliError> {
    let mut client = connect(&args.connect).await?;
    let request = pb::GetTokenInfoRequest { token: args.token };
    let info = client
        .get_token_info(request)
        .await?
        .into_inner()
        .info
        .unwrap_or_default();
    if args.json {
        println!("{}", info_json(&info));
    } else {
        let field = |k: &str, v: String| println!("{k:<12} {v}");
        field("token:", info.token.clone());
        field("masked_pan:", info.masked_pan.clone());
        field("last4:", info.last4.clone());
        field(
            "bin:",
            if info.bin.is_empty() {
                "-".into()
            } else {
                info.bin.clone()
            },
        );
        field("brand:", brand_name(info.brand));
        field("pan_length:", info.pan_length.to_string());
        field("format:", format_name(info.format));
        field("created_at:", time_text(info.created_at.as_ref()));
        field("expires_at:", time_text(info.expires_at.as_ref()));
        field("key_version:", info.key_version.to_string());
    }
    Ok(())
}

pub async fn delete(args: TokenArgs) -> Result<(), CliError> {
    let mut client = connect(&args.connect).await?;
    let request = pb::DeleteTokenRequest { token: args.token };
    let deleted = client.delete_token(request).await?.into_inner().deleted;
    if args.json {
        println!("{}", serde_json::json!({ "deleted": deleted }));
    } else if deleted {
        println!("deleted");
    } else {
        println!("nothing to delete (unknown, expired or already deleted)");
    }
    Ok(())
}

pub async fn health(args: HealthArgs) -> Result<(), CliError> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let channel = channel(&args.addr, &args.tls).await?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest {
        service: args.service,
    };
    let status = client.check(request).await?.into_inner().status();
    println!("{}", status.as_str_name());
    if status == ServingStatus::Serving {
        Ok(())
    } else {
        Err(CliError::Other(format!(
            "server is {}",
            status.as_str_name()
        )))
    }
}

pub(crate) async fn channel(
    addr: &str,
    tls: &TlsArgs,
) -> Result<tonic::transport::Channel, CliError> {
    let addr = if addr.contains("://") {
        addr.to_owned()
    } else if tls.tls_ca.is_some() {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    };
    let ep =
        tls_endpoint(&addr, &tls.files()).map_err(|e| CliError::Usage(format!("--addr {e}")))?;
    ep.connect().await.map_err(|e| CliError::Connect {
        addr,
        detail: crate::grpc::client::error_chain(&e),
    })
}

async fn connect(args: &ConnectArgs) -> Result<Client, CliError> {
    let key = args.api_key.as_deref().filter(|k| !k.trim().is_empty());
    // A client certificate can identify the caller on its own (mutual TLS).
    if key.is_none() && args.tls.tls_cert.is_none() {
        return Err(CliError::Usage(
            "no API key: set TOKENVAULT_API_KEY (or pass --api-key), or use a client \
             certificate (--tls-cert/--tls-key)"
                .into(),
        ));
    }
    let auth = BearerAuth::new(key).map_err(|e| CliError::Usage(e.into()))?;
    Ok(with_auth(channel(&args.addr, &args.tls).await?, auth))
}

/// `--expires-in`: the one duration grammar ([`crate::config::parse_timeout`]), in whole
/// seconds.
fn parse_expires_in(text: &str) -> Result<u32, String> {
    let d = crate::config::parse_timeout(text)?;
    if d.subsec_nanos() != 0 {
        return Err(format!("{text:?}: whole seconds only"));
    }
    u32::try_from(d.as_secs()).map_err(|_| format!("{text:?}: at most {} seconds", u32::MAX))
}

/// One card number from standard input, in a buffer that is wiped on drop. Refuses more
/// than one line so a file of cards is not silently cut to its first.
fn read_pan() -> Result<Zeroizing<String>, CliError> {
    const LIMIT: usize = 4096;
    let stdin = std::io::stdin();
    // Capacity reserved up front so the buffer never reallocates (leaving unwiped copies).
    let mut text = Zeroizing::new(String::with_capacity(LIMIT + 1));
    let read = if std::io::IsTerminal::is_terminal(&stdin) {
        // rpassword prompts on the terminal with echo off and restores it afterwards, also
        // on error; its line is wiped as soon as it is copied.
        rpassword::prompt_password("Card number (input hidden): ").map(|line| {
            let line = Zeroizing::new(line);
            let mut end = line.len().min(LIMIT);
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            text.push_str(&line[..end]);
            end
        })
    } else {
        stdin.lock().take(LIMIT as u64).read_to_string(&mut text)
    };
    read.map_err(|e| CliError::Other(format!("cannot read standard input: {e}")))?;
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().ok_or_else(|| {
        CliError::Usage(
            "no card number on standard input (e.g. `echo $PAN | tokenvault tokenize`)".into(),
        )
    })?;
    if lines.next().is_some() {
        return Err(CliError::Usage(
            "expected one card number on standard input, found several lines".into(),
        ));
    }
    let mut pan = Zeroizing::new(String::with_capacity(first.len()));
    pan.push_str(first);
    Ok(pan)
}

fn brand_name(value: i32) -> String {
    pb::CardBrand::try_from(value)
        .map(|b| {
            b.as_str_name()
                .trim_start_matches("CARD_BRAND_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| value.to_string())
}

fn format_name(value: i32) -> String {
    pb::TokenFormat::try_from(value)
        .map(|f| {
            f.as_str_name()
                .trim_start_matches("TOKEN_FORMAT_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| value.to_string())
}

fn time_text(ts: Option<&prost_types::Timestamp>) -> String {
    match ts {
        None => "-".into(),
        Some(ts) => timestamp_to_micros(ts, "t").map_or_else(|_| "invalid".into(), format_time),
    }
}

fn info_json(info: &pb::TokenInfo) -> serde_json::Value {
    serde_json::json!({
        "token": info.token,
        "masked_pan": info.masked_pan,
        "last4": info.last4,
        "bin": info.bin,
        "brand": brand_name(info.brand),
        "pan_length": info.pan_length,
        "format": format_name(info.format),
        "created_at": info.created_at.as_ref().map(|t| time_text(Some(t))),
        "expires_at": info.expires_at.as_ref().map(|t| time_text(Some(t))),
        "key_version": info.key_version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(brand_name(pb::CardBrand::DinersClub as i32), "diners_club");
        assert_eq!(
            format_name(pb::TokenFormat::PanShapedKeepBin as i32),
            "pan_shaped_keep_bin"
        );
        assert_eq!(brand_name(99), "99");
    }
}
