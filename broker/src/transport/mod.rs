//! gRPC over mutual TLS: the server, the `Broker` service and the error-to-status mapping.
//!
//! rustls (through tonic) requires a client certificate that chains to the area CA; a certificate that does not is
//! refused during the handshake. Each handler then reads the agency from the certificate ([`crate::auth`]) and checks
//! the policy set knows it, before doing anything else.

pub mod audit_service;
pub mod service;
pub mod status;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::config::TlsPaths;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("could not read `{path}`: {source}")]
    Read { path: String, source: std::io::Error },
}

/// The server's TLS settings: its own certificate and key, and the CA that client certificates must chain to.
pub fn server_tls(paths: &TlsPaths) -> Result<ServerTlsConfig, TlsError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })
    };
    let identity = Identity::from_pem(read(&paths.cert)?, read(&paths.key)?);
    let ca = Certificate::from_pem(read(&paths.ca_cert)?);
    Ok(ServerTlsConfig::new().identity(identity).client_ca_root(ca).client_auth_optional(false))
}
