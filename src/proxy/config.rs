//! The `[proxy]` section of the configuration file and its `[[proxy.routes]]`: what the
//! file may say and the checks that need no filesystem (the CA files are read when the
//! server starts, by [`super::route::Route::load`]).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Default per-route upstream timeout (connect, request and the whole response).
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default per-route body limit, request and response alike.
pub const DEFAULT_ROUTE_MAX_BODY: u64 = 1 << 20;
/// Largest body limit a route may set: bodies are held in memory to be substituted and
/// scanned.
pub const MAX_ROUTE_MAX_BODY: u64 = 64 << 20;

/// `[proxy]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    /// HTTP listen address of the proxy (same as `serve --proxy-listen`); unset = no proxy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteSection>,
}

/// One `[[proxy.routes]]` entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    /// Called as `/v1/proxy/NAME/...`.
    pub name: String,
    /// Base URL: `https://host[:port][/base/path]`; `http://` only for a loopback host.
    pub upstream: String,
    /// PEM CA certificate(s) trusted for this upstream, and nothing else. Required for https.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Optional pin: hex SHA-256 of the upstream's leaf certificate (DER), checked in
    /// addition to the chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_sha256: Option<String>,
    /// Allowed HTTP methods, e.g. `["POST"]`.
    #[serde(default = "default_methods")]
    pub methods: Vec<String>,
    /// Principals that may use the route (they also need the `proxy` role).
    #[serde(default)]
    pub principals: Vec<String>,
    /// Headers in which placeholders are substituted (a placeholder in any other header is
    /// refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
    /// Upstream deadline: connect, send, and the whole response.
    #[serde(default = "default_timeout", with = "duration_text")]
    pub timeout: Duration,
    /// Largest request body and largest upstream response body, bytes or e.g. `"1MiB"`.
    #[serde(default = "default_max_body", with = "byte_size")]
    pub max_body: u64,
}

fn default_methods() -> Vec<String> {
    vec!["POST".to_owned()]
}
fn default_timeout() -> Duration {
    DEFAULT_ROUTE_TIMEOUT
}
fn default_max_body() -> u64 {
    DEFAULT_ROUTE_MAX_BODY
}

mod duration_text {
    use super::*;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::config::format_duration(*d))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        crate::config::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

mod byte_size {
    use super::*;
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }
    pub fn serialize<S: Serializer>(b: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*b)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(n),
            Raw::Text(t) => crate::config::parse_byte_size(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// An upstream base URL split into its parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing `/` (empty for the root).
    pub base_path: String,
}

impl Upstream {
    /// Parses and checks `https://host[:port][/path]` (or `http://` to a loopback host).
    pub fn parse(url: &str) -> Result<Upstream, String> {
        let uri: http::Uri = url
            .parse()
            .map_err(|_| format!("upstream {url:?} is not a URL"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("upstream {url:?}: the scheme must be https")),
        };
        let host = uri
            .host()
            .ok_or_else(|| format!("upstream {url:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(format!(
                "upstream {url:?}: credentials in the URL are not allowed"
            ));
        }
        if uri.query().is_some() {
            return Err(format!(
                "upstream {url:?}: a query is not allowed in the base"
            ));
        }
        if !https && !is_loopback_host(&host) {
            return Err(format!(
                "upstream {url:?}: plain http is allowed only to a loopback host; card numbers \
                 leave the vault only over TLS"
            ));
        }
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let base_path = uri.path().trim_end_matches('/').to_owned();
        super::route::check_rest(base_path.trim_start_matches('/'))
            .map_err(|e| format!("upstream {url:?}: {e}"))?;
        Ok(Upstream {
            https,
            host,
            port,
            base_path,
        })
    }
}

fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// True for a route name usable as one path segment.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

impl ProxySection {
    /// Checks the section without touching the filesystem: names, URLs, methods, limits.
    /// `tls`: whether the server has a certificate (a non-loopback proxy listener needs
    /// one, unless `transport` is false, as for `server.listen`).
    pub fn check(&self, tls: bool, transport: bool) -> Result<Vec<String>, String> {
        let mut warnings = Vec::new();
        if let Some(listen) = &self.listen {
            let host = listen
                .rsplit_once(':')
                .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
                .ok_or_else(|| format!("proxy.listen = {listen:?}: expected HOST:PORT"))?;
            if transport && !tls && !is_loopback_host(host) {
                return Err(format!(
                    "proxy.listen = {listen}: a non-loopback address requires TLS (tls.cert and \
                     tls.key)"
                ));
            }
            if self.routes.is_empty() {
                warnings.push("proxy.listen is set but no [[proxy.routes]] are configured".into());
            }
        }
        let mut names = std::collections::HashSet::new();
        for r in &self.routes {
            let at = |m: String| format!("proxy.routes {:?}: {m}", r.name);
            if !valid_name(&r.name) {
                return Err(at(
                    "name must be 1-64 letters, digits, '-' or '_'".to_owned()
                ));
            }
            if !names.insert(r.name.as_str()) {
                return Err(at("the name is used twice".to_owned()));
            }
            let upstream = Upstream::parse(&r.upstream).map_err(at)?;
            if upstream.https && r.ca_file.is_none() {
                return Err(at(
                    "ca_file is required: the route trusts only the CA it names".to_owned(),
                ));
            }
            if r.ca_file.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(at("ca_file is an empty path".to_owned()));
            }
            if let Some(pin) = &r.pin_sha256 {
                if !matches!(crate::audit::unhex(pin), Some(b) if b.len() == 32) {
                    return Err(at("pin_sha256 must be 64 hex digits".to_owned()));
                }
            }
            if r.methods.is_empty() {
                return Err(at("methods is empty".to_owned()));
            }
            for m in &r.methods {
                if http::Method::from_bytes(m.as_bytes()).is_err() || m.to_uppercase() != *m {
                    return Err(at(format!("method {m:?} is not an upper-case HTTP method")));
                }
            }
            if r.principals.is_empty() {
                warnings.push(at("no principals: nobody may use this route".to_owned()));
            }
            for h in &r.headers {
                if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    return Err(at(format!("header {h:?} is not a header name")));
                }
            }
            if r.timeout.is_zero() {
                return Err(at("timeout must be more than 0".to_owned()));
            }
            if r.max_body == 0 || r.max_body > MAX_ROUTE_MAX_BODY {
                return Err(at(format!(
                    "max_body must be 1 to {MAX_ROUTE_MAX_BODY} bytes (bodies are held in memory)"
                )));
            }
        }
        Ok(warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(upstream: &str) -> RouteSection {
        RouteSection {
            name: "psp".into(),
            upstream: upstream.into(),
            ca_file: Some("/etc/ca.pem".into()),
            pin_sha256: None,
            methods: vec!["POST".into()],
            principals: vec!["payments".into()],
            headers: vec![],
            timeout: DEFAULT_ROUTE_TIMEOUT,
            max_body: DEFAULT_ROUTE_MAX_BODY,
        }
    }

    #[test]
    fn parses_the_issue_example() {
        let cfg: crate::config::Config = crate::config::Config::from_toml(
            r#"
            [proxy]
            listen = "127.0.0.1:8443"
            [[proxy.routes]]
            name = "psp"
            upstream = "https://api.psp.example"
            ca_file = "/etc/tokenvault/psp-ca.pem"
            methods = ["POST"]
            principals = ["payments"]
            timeout = "10s"
            max_body = "1MiB"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.proxy.routes.len(), 1);
        assert_eq!(cfg.proxy.routes[0].max_body, 1 << 20);
        assert!(cfg.validate().unwrap().is_empty());
        // And it survives `config check`'s rendering.
        let again = crate::config::Config::from_toml(&toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(again.proxy, cfg.proxy);
    }

    #[test]
    fn upstreams() {
        let u = Upstream::parse("https://api.psp.example:8443/v2/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.base_path.as_str()),
            ("api.psp.example", 8443, "/v2")
        );
        assert!(Upstream::parse("http://127.0.0.1:9000").is_ok());
        assert!(Upstream::parse("http://localhost:9000").is_ok());
        for bad in [
            "http://api.psp.example",
            "ftp://x",
            "https://user:pw@x.example",
            "https://x.example/a/../b",
            "https://x.example/?q=1",
            "not a url",
        ] {
            assert!(Upstream::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn routes_are_checked() {
        let ok = ProxySection {
            listen: Some("127.0.0.1:8443".into()),
            routes: vec![route("https://x.example")],
        };
        assert!(ok.check(false, true).unwrap().is_empty());
        let mut no_ca = ok.clone();
        no_ca.routes[0].ca_file = None;
        assert!(no_ca.check(false, true).unwrap_err().contains("ca_file"));
        let mut twice = ok.clone();
        twice.routes.push(route("https://y.example"));
        assert!(twice.check(false, true).unwrap_err().contains("twice"));
        let mut bad_name = ok.clone();
        bad_name.routes[0].name = "../x".into();
        assert!(bad_name.check(false, true).is_err());
        let open = ProxySection {
            listen: Some("0.0.0.0:8443".into()),
            routes: vec![route("https://x.example")],
        };
        assert!(open.check(false, true).unwrap_err().contains("TLS"));
        assert!(open.check(true, true).is_ok());
    }
}
