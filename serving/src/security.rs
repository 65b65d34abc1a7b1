//! Who may connect: TLS for listeners and clients (rustls through tonic), mutual TLS between edge
//! and cloud, the rule that a non-loopback listener needs TLS unless the operator says
//! `--insecure`, and the optional bearer token of the edge's local API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};

use crate::error::ServeError;

/// Certificate files given on the command line.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// PEM certificate chain of this process.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// PEM CA certificate(s): what peers' certificates must chain to.
    pub ca: Option<PathBuf>,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, ServeError> {
    let data = std::fs::read(path)
        .map_err(|e| ServeError::InvalidArgument(format!("cannot read the {what} {}: {e}", path.display())))?;
    if !data.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(ServeError::InvalidArgument(format!(
            "the {what} {} is not PEM (expected a '-----BEGIN ...' block)",
            path.display()
        )));
    }
    Ok(data)
}

impl TlsFiles {
    /// Whether TLS was asked for at all.
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.ca.is_some()
    }

    fn identity(&self) -> Result<Option<Identity>, ServeError> {
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Ok(Some(Identity::from_pem(read(c, "certificate")?, read(k, "private key")?))),
            (None, None) => Ok(None),
            (Some(_), None) => Err(ServeError::InvalidArgument("--tls-cert needs --tls-key".into())),
            (None, Some(_)) => Err(ServeError::InvalidArgument("--tls-key needs --tls-cert".into())),
        }
    }

    /// A server config; with a CA, clients must present a certificate that chains to it
    /// (mutual TLS), and the handshake fails for any other client.
    pub fn server(&self) -> Result<Option<ServerTlsConfig>, ServeError> {
        if !self.enabled() {
            return Ok(None);
        }
        let id = self.identity()?.ok_or_else(|| {
            ServeError::InvalidArgument("a TLS listener needs its certificate and key (--tls-cert, --tls-key)".into())
        })?;
        let mut cfg = ServerTlsConfig::new().identity(id);
        if let Some(ca) = &self.ca {
            cfg = cfg.client_ca_root(Certificate::from_pem(read(ca, "CA certificate")?)).client_auth_optional(false);
        }
        Ok(Some(cfg))
    }

    /// A client config: the server's certificate must chain to `ca`; `cert`/`key` are this
    /// client's identity for mutual TLS. `domain` overrides the name checked in the server's
    /// certificate (default: the host of the address).
    pub fn client(&self, domain: Option<&str>) -> Result<Option<ClientTlsConfig>, ServeError> {
        if !self.enabled() {
            return Ok(None);
        }
        let ca = self.ca.as_ref().ok_or_else(|| {
            ServeError::InvalidArgument("TLS to the cloud needs the CA that signed its certificate (--tls-ca)".into())
        })?;
        let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, "CA certificate")?));
        if let Some(id) = self.identity()? {
            cfg = cfg.identity(id);
        }
        if let Some(d) = domain {
            cfg = cfg.domain_name(d);
        }
        Ok(Some(cfg))
    }
}

/// Refuses to serve in clear text beyond this machine unless the operator insists.
pub fn check_listener(addr: &SocketAddr, tls: bool, insecure: bool, flag_prefix: &str) -> Result<(), ServeError> {
    if tls || insecure || addr.ip().is_loopback() {
        return Ok(());
    }
    Err(ServeError::InvalidArgument(format!(
        "refusing to listen on {addr} without TLS: traffic beyond this machine would be readable and forgeable. \
         Give --tls-cert and --tls-key (and --tls-ca for mutual TLS; env {flag_prefix}_TLS_CERT, ...), listen on \
         127.0.0.1, or pass --insecure to accept the risk"
    )))
}

/// Checks `authorization: Bearer <token>` on every call when a token is configured.
#[derive(Clone)]
pub struct BearerAuth {
    token: Option<std::sync::Arc<str>>,
}

impl BearerAuth {
    pub fn new(token: Option<String>) -> BearerAuth {
        BearerAuth { token: token.filter(|t| !t.is_empty()).map(Into::into) }
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(want) = &self.token else { return Ok(req) };
        let got = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
        match got.and_then(|v| v.strip_prefix("Bearer ")) {
            // Compared in constant time: the token must not leak through response timing.
            Some(t) if t.len() == want.len() && t.bytes().zip(want.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0 => {
                Ok(req)
            }
            Some(_) => Err(Status::unauthenticated("the bearer token is not valid for this edge")),
            None => Err(Status::unauthenticated(
                "this edge requires `authorization: Bearer <token>` metadata (--api-token)",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn clear_text_is_refused_beyond_loopback() {
        let lo: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:1".parse().unwrap();
        assert!(check_listener(&lo, false, false, "X").is_ok());
        assert!(check_listener(&any, true, false, "X").is_ok());
        assert!(check_listener(&any, false, true, "X").is_ok());
        let e = check_listener(&any, false, false, "CLOUD_SERVER").unwrap_err().to_string();
        assert!(e.contains("refusing to listen on 0.0.0.0:1 without TLS") && e.contains("--insecure"), "{e}");
    }

    #[test]
    fn bearer_token_is_checked() {
        let mut auth = BearerAuth::new(Some("s3cret".into()));
        let mut req = Request::new(());
        assert_eq!(auth.call(Request::new(())).unwrap_err().code(), tonic::Code::Unauthenticated);
        req.metadata_mut().insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(auth.call(req).is_ok());
        let mut bad = Request::new(());
        bad.metadata_mut().insert("authorization", "Bearer s3crex".parse().unwrap());
        assert!(auth.call(bad).unwrap_err().message().contains("not valid"));
        assert!(BearerAuth::new(None).call(Request::new(())).is_ok());
    }

    #[test]
    fn unreadable_or_incomplete_tls_files_are_explained() {
        let f = TlsFiles { cert: Some("/nonexistent.pem".into()), key: None, ca: None };
        assert!(f.server().unwrap_err().to_string().contains("--tls-cert needs --tls-key"));
        let f = TlsFiles { cert: Some("/nonexistent.pem".into()), key: Some("/k".into()), ca: None };
        assert!(f.server().unwrap_err().to_string().contains("cannot read the certificate /nonexistent.pem"));
        let f = TlsFiles { cert: None, key: None, ca: None };
        assert!(f.server().unwrap().is_none() && f.client(None).unwrap().is_none());
    }
}
