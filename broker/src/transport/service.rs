//! The `safeguarding.v1.Broker` service: converts between the wire and [`crate::exchange`] / [`crate::delivery`].

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::{
    audit::{Actor, AuditEntry, EventType},
    auth::{
        self, AuthError, Caller,
        token::{TokenError, TokenVerifier},
    },
    delivery::{Deliveries, StreamItem},
    exchange::{Exchange, ExchangeError},
    store::{Commit, Store},
};
use proto::pb::{self, broker_server::Broker};

/// Longest retry delay an agent may ask for.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(24 * 60 * 60);

/// The token verifier in force; replaced when key files change.
pub type CurrentTokens = Arc<RwLock<Arc<TokenVerifier>>>;

pub struct BrokerService {
    exchange: Exchange,
    deliveries: Deliveries,
    authenticator: Authenticator,
}

impl BrokerService {
    pub fn new(exchange: Exchange, deliveries: Deliveries, tokens: CurrentTokens, store: Store) -> Self {
        let authenticator = Authenticator::new(exchange.clone(), tokens, store);
        Self { exchange, deliveries, authenticator }
    }

    async fn caller<T>(&self, request: &Request<T>, operation: &str) -> Result<Caller, Status> {
        self.authenticator.caller(request, operation).await
    }
}

/// Authenticates the callers of every service (`Broker` and `Audit`). Cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    exchange: Exchange,
    tokens: CurrentTokens,
    store: Store,
    /// The agency each client certificate seen so far names, by the certificate's exact bytes (see
    /// [`Authenticator::agency_of`]).
    agencies: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<Vec<u8>, String>>>,
}

/// How many certificates [`Authenticator::agency_of`] remembers before it starts again (an area has tens of
/// agencies, each with a few certificates over time).
const REMEMBERED_CERTIFICATES: usize = 4096;

impl Authenticator {
    pub fn new(exchange: Exchange, tokens: CurrentTokens, store: Store) -> Self {
        Self { exchange, tokens, store, agencies: Default::default() }
    }

    /// The agency a verified client certificate names ([`auth::agency_from_certificate`]), remembered by the
    /// certificate's exact bytes: the same bytes always name the same agency, and parsing the certificate on every
    /// request was ~3% of the broker's CPU with 64 sends in flight (PERFORMANCE.md). Only what the certificate says
    /// is remembered; whether the policy set knows the agency, and the token, are checked on every request.
    fn agency_of(&self, der: &[u8]) -> Result<String, AuthError> {
        let mut agencies = match self.agencies.lock() {
            Ok(agencies) => agencies,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(agency) = agencies.get(der) {
            return Ok(agency.clone());
        }
        let agency = auth::agency_from_certificate(der)?;
        if agencies.len() >= REMEMBERED_CERTIFICATES {
            agencies.clear();
        }
        agencies.insert(der.to_vec(), agency.clone());
        Ok(agency)
    }

    /// Who is calling: the agency from the verified client certificate, which the policy set must know, and the
    /// practitioner from a bearer token issued for that same agency.
    pub async fn caller<T>(&self, request: &Request<T>, operation: &str) -> Result<Caller, Status> {
        let certificates = request.peer_certs().ok_or(AuthError::NoCertificate)?;
        let leaf = certificates.first().ok_or(AuthError::NoCertificate)?;
        let agency = self.agency_of(leaf.as_ref())?;
        if self.exchange.policy().agency(&agency).is_none() {
            tracing::warn!(%agency, "refused a certificate naming an agency the policy set does not know");
            return Err(AuthError::UnknownAgency(agency).into());
        }
        let verifier = match self.tokens.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
            .map(str::trim);
        let verified = match token {
            Some(token) if !token.is_empty() => verifier.verify(&agency, token),
            _ => Err(TokenError::Missing),
        };
        match verified {
            Ok(practitioner) => Ok(Caller { agency, practitioner: practitioner.subject, roles: practitioner.roles }),
            Err(error) => {
                tracing::warn!(%agency, reason = error.reason(), operation, "refused a request's token");
                self.audit_refusal(&agency, operation, error.reason()).await?;
                Err(error.into())
            }
        }
    }

    /// A request refused at the door is itself an audit entry (who tried what, and why it was refused).
    pub async fn audit_refusal(&self, agency: &str, operation: &str, reason: &str) -> Result<(), Status> {
        let entry = AuditEntry {
            time_micros: AuditEntry::now_micros(),
            event: Some(EventType::RequestRefused),
            actor: Actor { agency: agency.to_owned(), practitioner: String::new(), role: String::new() },
            reason_code: reason.to_owned(),
            detail: operation.to_owned(),
            ..AuditEntry::default()
        };
        self.store
            .commit(Commit { audit: vec![entry], writes: Vec::new() })
            .await
            .map(|_| ())
            .map_err(|error| crate::transport::status::store_status(&error))
    }
}

/// A delivery stream that counts itself in the `connected_agents` metric while it is open.
pub struct CountedStream {
    inner: ReceiverStream<StreamItem>,
}

impl tokio_stream::Stream for CountedStream {
    type Item = StreamItem;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<StreamItem>> {
        std::pin::Pin::new(&mut self.inner).poll_next(context)
    }
}

impl Drop for CountedStream {
    fn drop(&mut self) {
        crate::metrics::metrics().connected_agents.dec();
    }
}

pub fn actor_of(caller: &Caller) -> Actor {
    Actor {
        agency: caller.agency.clone(),
        practitioner: caller.practitioner.clone(),
        role: caller.roles.first().cloned().unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl Broker for BrokerService {
    async fn send(&self, request: Request<pb::SendRequest>) -> Result<Response<pb::SendResponse>, Status> {
        let caller = self.caller(&request, "send").await?;
        let envelope = request
            .into_inner()
            .envelope
            .ok_or(ExchangeError::InvalidArgument { field: "envelope", description: "is required".to_owned() })?;
        let receipt = self.exchange.send(&caller, envelope).await?;
        Ok(Response::new(receipt))
    }

    type DeliveriesStream = CountedStream;

    async fn deliveries(
        &self,
        request: Request<pb::DeliveriesRequest>,
    ) -> Result<Response<Self::DeliveriesStream>, Status> {
        let caller = self.caller(&request, "deliveries").await?;
        tracing::info!(agency = %caller.agency, "delivery stream opened");
        let receiver = self.deliveries.subscribe(&caller.agency);
        crate::metrics::metrics().connected_agents.inc();
        Ok(Response::new(CountedStream { inner: ReceiverStream::new(receiver) }))
    }

    async fn acknowledge(
        &self,
        request: Request<pb::AcknowledgeRequest>,
    ) -> Result<Response<pb::AcknowledgeResponse>, Status> {
        let caller = self.caller(&request, "acknowledge").await?;
        let delivery_id = request.into_inner().delivery_id;
        if delivery_id.is_empty() {
            return Err(
                ExchangeError::InvalidArgument { field: "delivery_id", description: "is required".to_owned() }.into()
            );
        }
        self.deliveries.acknowledge(&caller.agency, &delivery_id, actor_of(&caller)).await?;
        Ok(Response::new(pb::AcknowledgeResponse {}))
    }

    async fn negative_acknowledge(
        &self,
        request: Request<pb::NegativeAcknowledgeRequest>,
    ) -> Result<Response<pb::NegativeAcknowledgeResponse>, Status> {
        let caller = self.caller(&request, "negative-acknowledge").await?;
        let request = request.into_inner();
        if request.delivery_id.is_empty() {
            return Err(
                ExchangeError::InvalidArgument { field: "delivery_id", description: "is required".to_owned() }.into()
            );
        }
        if request.retry_after_millis < 0 {
            return Err(ExchangeError::InvalidArgument {
                field: "retry_after_millis",
                description: "must not be negative".to_owned(),
            }
            .into());
        }
        let delay = (request.retry_after_millis > 0)
            .then(|| Duration::from_millis(request.retry_after_millis as u64).min(MAX_RETRY_DELAY));
        let dead_lettered = self
            .deliveries
            .negative_acknowledge(&caller.agency, &request.delivery_id, actor_of(&caller), delay, request.reason)
            .await?;
        Ok(Response::new(pb::NegativeAcknowledgeResponse { dead_lettered }))
    }

    async fn track(&self, request: Request<pb::TrackRequest>) -> Result<Response<pb::TrackResponse>, Status> {
        let caller = self.caller(&request, "track").await?;
        let message_id = request.into_inner().message_id;
        Ok(Response::new(self.exchange.track(&caller, &message_id)?))
    }
}
