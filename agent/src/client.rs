//! The connection to the broker: mutual TLS with the agency's client certificate, and the bearer-token interceptor
//! on every call.

use std::time::Duration;

use tonic::{
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::{
    AgentError,
    config::AgentConfig,
    token::{BearerInterceptor, TokenSource},
};

/// The broker client the agent uses: a TLS channel whose every request passes through [`BearerInterceptor`].
pub type BrokerClient = proto::pb::broker_client::BrokerClient<InterceptedService<Channel, BearerInterceptor>>;

/// How long establishing a connection may take before the attempt counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds the endpoint: URL, TLS settings and certificates read from the configured files.
fn endpoint(config: &AgentConfig) -> Result<Endpoint, AgentError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|error| AgentError::Io { path: path.to_path_buf(), error })
    };
    let ca_certificate = Certificate::from_pem(read(&config.ca_cert)?);
    let identity = Identity::from_pem(read(&config.cert)?, read(&config.key)?);
    let tls = ClientTlsConfig::new()
        .ca_certificate(ca_certificate)
        .identity(identity)
        .domain_name(config.server_name.clone());
    Endpoint::from_shared(config.broker_url.clone())
        .and_then(|endpoint| endpoint.tls_config(tls))
        .map(|endpoint| {
            endpoint
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_keepalive(Some(Duration::from_secs(30)))
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_while_idle(true)
        })
        .map_err(|source| AgentError::Endpoint { url: config.broker_url.clone(), reason: source.to_string() })
}

fn client(config: &AgentConfig, channel: Channel) -> BrokerClient {
    let interceptor = BearerInterceptor::new(TokenSource::new(config.token.clone()));
    proto::pb::broker_client::BrokerClient::with_interceptor(channel, interceptor)
}

/// Connects to the broker now, failing if it cannot be reached or the TLS handshake fails.
///
/// # Errors
/// Unreadable certificate files, a bad URL, or a failed connection.
pub async fn connect(config: &AgentConfig) -> Result<BrokerClient, AgentError> {
    let endpoint = endpoint(config)?;
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| AgentError::Connect { url: config.broker_url.clone(), reason: error_chain(&source) })?;
    Ok(client(config, channel))
}

/// A client that connects on first use and reconnects by itself after failures: for the long-running agent, which
/// must not stop because the broker is briefly away.
///
/// # Errors
/// Unreadable certificate files or a bad URL.
pub fn connect_lazily(config: &AgentConfig) -> Result<BrokerClient, AgentError> {
    Ok(client(config, endpoint(config)?.connect_lazy()))
}

/// Formats an error with its sources, since transport errors keep the useful part ("connection refused",
/// "certificate unknown") in the chain.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}
