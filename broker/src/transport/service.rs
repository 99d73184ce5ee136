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
        revocation::{CertificateId, CurrentRevocations},
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
    pub fn new(
        exchange: Exchange,
        deliveries: Deliveries,
        tokens: CurrentTokens,
        revocations: CurrentRevocations,
        store: Store,
    ) -> Self {
        let authenticator = Authenticator::new(exchange.clone(), tokens, revocations, store);
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
    revocations: CurrentRevocations,
    store: Store,
    /// The agency each client certificate seen so far names, and what names it to a revocation list, by the
    /// certificate's exact bytes (see [`Authenticator::agency_of`]).
    agencies: Arc<std::sync::Mutex<std::collections::HashMap<Vec<u8>, KnownCertificate>>>,
}

/// The agency a client certificate names, and what names the certificate to a revocation list.
type KnownCertificate = (String, Arc<CertificateId>);

/// How many certificates [`Authenticator::agency_of`] remembers before it starts again (an area has tens of
/// agencies, each with a few certificates over time).
const REMEMBERED_CERTIFICATES: usize = 4096;

impl Authenticator {
    pub fn new(exchange: Exchange, tokens: CurrentTokens, revocations: CurrentRevocations, store: Store) -> Self {
        Self { exchange, tokens, revocations, store, agencies: Default::default() }
    }

    /// The agency a verified client certificate names ([`auth::agency_from_certificate`]), remembered by the
    /// certificate's exact bytes: the same bytes always name the same agency, and parsing the certificate on every
    /// request was ~3% of the broker's CPU with 64 sends in flight (PERFORMANCE.md). Only what the certificate says
    /// is remembered; whether the policy set knows the agency, whether the certificate is revoked, and the token are
    /// checked on every request.
    fn agency_of(&self, der: &[u8]) -> Result<KnownCertificate, AuthError> {
        let mut agencies = match self.agencies.lock() {
            Ok(agencies) => agencies,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(known) = agencies.get(der) {
            return Ok(known.clone());
        }
        let (agency, id) = auth::identify(der)?;
        if agencies.len() >= REMEMBERED_CERTIFICATES {
            agencies.clear();
        }
        let known = (agency, Arc::new(id));
        agencies.insert(der.to_vec(), known.clone());
        Ok(known)
    }

    /// Whether the revocation lists in force revoke this certificate (checked on every request, and by an open
    /// delivery stream before each copy, so a list reloaded meanwhile applies at once).
    pub fn revoked(&self, certificate: &CertificateId) -> bool {
        is_revoked(&self.revocations, certificate)
    }

    /// Who is calling: the agency from the verified client certificate, which the policy set must know, and the
    /// practitioner from a bearer token issued for that same agency.
    pub async fn caller<T>(&self, request: &Request<T>, operation: &str) -> Result<Caller, Status> {
        self.caller_and_certificate(request, operation).await.map(|(caller, _)| caller)
    }

    /// [`Self::caller`], and what names the caller's certificate to a revocation list.
    pub async fn caller_and_certificate<T>(
        &self,
        request: &Request<T>,
        operation: &str,
    ) -> Result<(Caller, Arc<CertificateId>), Status> {
        let certificates = request.peer_certs().ok_or(AuthError::NoCertificate)?;
        let leaf = certificates.first().ok_or(AuthError::NoCertificate)?;
        let (agency, certificate) = self.agency_of(leaf.as_ref())?;
        if self.exchange.policy().agency(&agency).is_none() {
            tracing::warn!(%agency, "refused a certificate naming an agency the policy set does not know");
            return Err(AuthError::UnknownAgency(agency).into());
        }
        if self.revoked(&certificate) {
            tracing::warn!(%agency, operation, "refused a revoked client certificate");
            self.audit_refusal(&agency, operation, "certificate-revoked").await?;
            return Err(AuthError::Revoked(agency).into());
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
            Ok(practitioner) => {
                Ok((Caller { agency, practitioner: practitioner.subject, roles: practitioner.roles }, certificate))
            }
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

fn is_revoked(revocations: &CurrentRevocations, certificate: &CertificateId) -> bool {
    match revocations.read() {
        Ok(current) => current.revokes(certificate),
        Err(poisoned) => poisoned.into_inner().revokes(certificate),
    }
}

/// A delivery stream that counts itself in the `connected_agents` metric while it is open, and ends (with
/// `UNAUTHENTICATED`, reason `certificate-revoked`) before the next copy once the agent's certificate is revoked.
pub struct CountedStream {
    inner: ReceiverStream<StreamItem>,
    agency: String,
    certificate: Arc<CertificateId>,
    revocations: CurrentRevocations,
    ended: bool,
}

impl tokio_stream::Stream for CountedStream {
    type Item = StreamItem;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<StreamItem>> {
        if self.ended {
            return std::task::Poll::Ready(None);
        }
        let next = std::pin::Pin::new(&mut self.inner).poll_next(context);
        if matches!(next, std::task::Poll::Ready(Some(Ok(_)))) && is_revoked(&self.revocations, &self.certificate) {
            // The copy taken stays in flight with the broker: it goes out again on the agency's next stream.
            self.ended = true;
            self.inner.close();
            tracing::warn!(agency = %self.agency, "ended the delivery stream of a revoked client certificate");
            return std::task::Poll::Ready(Some(Err(AuthError::Revoked(self.agency.clone()).into())));
        }
        next
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
        let (caller, certificate) = self.authenticator.caller_and_certificate(&request, "deliveries").await?;
        tracing::info!(agency = %caller.agency, "delivery stream opened");
        let receiver = self.deliveries.subscribe(&caller.agency);
        crate::metrics::metrics().connected_agents.inc();
        Ok(Response::new(CountedStream {
            inner: ReceiverStream::new(receiver),
            agency: caller.agency,
            certificate,
            revocations: self.authenticator.revocations.clone(),
            ended: false,
        }))
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
