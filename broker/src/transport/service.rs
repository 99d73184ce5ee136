//! The `safeguarding.v1.Broker` service: converts between the wire and [`crate::exchange`] / [`crate::delivery`].

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
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
    /// Ticks whenever the revocation lists or the policy set are reloaded (see [`CountedStream`]).
    revocation_reloads: watch::Receiver<u64>,
}

impl BrokerService {
    pub fn new(
        exchange: Exchange,
        deliveries: Deliveries,
        tokens: CurrentTokens,
        (revocations, revocation_reloads): (CurrentRevocations, watch::Receiver<u64>),
        store: Store,
    ) -> Self {
        let authenticator = Authenticator::new(exchange.clone(), tokens, revocations, store);
        Self { exchange, deliveries, authenticator, revocation_reloads }
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
    /// How many refusals of each kind were recorded this minute ([`Authenticator::audit_refusal`]).
    refusals: Arc<std::sync::Mutex<RefusalLimiter>>,
}

/// The agency a client certificate names, and what names the certificate to a revocation list.
type KnownCertificate = (String, Arc<CertificateId>);

/// How many certificates [`Authenticator::agency_of`] remembers before it starts again (an area has tens of
/// agencies, each with a few certificates over time).
const REMEMBERED_CERTIFICATES: usize = 4096;

impl Authenticator {
    pub fn new(exchange: Exchange, tokens: CurrentTokens, revocations: CurrentRevocations, store: Store) -> Self {
        Self { exchange, tokens, revocations, store, agencies: Default::default(), refusals: Default::default() }
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
        self.identify(request, operation).await.map(|identified| identified.caller)
    }

    /// [`Self::caller`], with what names the caller's certificate to a revocation list and how long its token is
    /// valid.
    pub async fn identify<T>(&self, request: &Request<T>, operation: &str) -> Result<Identified, Status> {
        let certificates = request.peer_certs().ok_or(AuthError::NoCertificate)?;
        let leaf = certificates.first().ok_or(AuthError::NoCertificate)?;
        let (agency, certificate) = self.agency_of(leaf.as_ref())?;
        if self.exchange.policy().agency(&agency).is_none() {
            tracing::warn!(%agency, "refused a certificate naming an agency the policy set does not know");
            self.audit_refusal(&agency_only(&agency), operation, "unknown-agency").await?;
            return Err(AuthError::UnknownAgency(agency).into());
        }
        if self.revoked(&certificate) {
            tracing::warn!(%agency, operation, "refused a revoked client certificate");
            self.audit_refusal(&agency_only(&agency), operation, "certificate-revoked").await?;
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
            Ok(practitioner) => Ok(Identified {
                caller: Caller { agency, practitioner: practitioner.subject, roles: practitioner.roles },
                certificate,
                token_valid_until: practitioner.valid_until,
            }),
            Err(error) => {
                tracing::warn!(%agency, reason = error.reason(), operation, "refused a request's token");
                self.audit_refusal(&agency_only(&agency), operation, error.reason()).await?;
                Err(error.into())
            }
        }
    }

    /// A request refused at the door is itself an audit entry (who tried what, and why it was refused), up to
    /// [`REFUSALS_RECORDED_PER_MINUTE`] a minute for each agency and reason ([`RefusalLimiter`]): a client looping on a
    /// bad token or a revoked certificate would otherwise grow the permanent log, and the disk, without bound.
    /// `actor` is who was refused: the certificate's agency, and the practitioner and role too when the token was
    /// valid (a refusal for the role or agency the call needs).
    pub async fn audit_refusal(&self, actor: &Actor, operation: &str, reason: &str) -> Result<(), Status> {
        let agency = actor.agency.as_str();
        let admitted = match self.refusals.lock() {
            Ok(mut refusals) => refusals.admit(agency, reason, std::time::Instant::now()),
            Err(poisoned) => poisoned.into_inner().admit(agency, reason, std::time::Instant::now()),
        };
        let detail = match admitted {
            Admitted::No => return Ok(()),
            Admitted::Yes { not_recorded_before: 0 } => operation.to_owned(),
            Admitted::Yes { not_recorded_before } => {
                format!("{operation}; {not_recorded_before} more such refusals not recorded one by one before this")
            }
        };
        let entry = AuditEntry {
            time_micros: AuditEntry::now_micros(),
            event: Some(EventType::RequestRefused),
            actor: actor.clone(),
            reason_code: reason.to_owned(),
            detail,
            ..AuditEntry::default()
        };
        self.store
            .commit(Commit { audit: vec![entry], writes: Vec::new() })
            .await
            .map(|_| ())
            .map_err(|error| crate::transport::status::store_status(&error))
    }
}

/// An authenticated caller ([`Authenticator::identify`]).
pub struct Identified {
    pub caller: Caller,
    /// What names the caller's certificate to a revocation list.
    pub certificate: Arc<CertificateId>,
    /// The last second (Unix time) the caller's token is accepted ([`crate::auth::token::Practitioner::valid_until`]).
    pub token_valid_until: u64,
}

/// Refused requests recorded in the audit log per agency and reason in each minute; the rest are counted, and the
/// count goes into the next one recorded.
pub const REFUSALS_RECORDED_PER_MINUTE: u32 = 60;

/// Whether a refusal is recorded ([`Authenticator::audit_refusal`]).
#[derive(Debug, PartialEq, Eq)]
enum Admitted {
    /// Recorded, saying how many of its kind were not recorded since the last one that was.
    Yes { not_recorded_before: u64 },
    /// Counted only: this minute's refusals of its kind are all recorded.
    No,
}

/// Counts refusals per (agency, reason) in fixed one-minute windows.
#[derive(Debug, Default)]
struct RefusalLimiter {
    window_started: Option<std::time::Instant>,
    /// Refusals recorded this window, and refusals not recorded since the last recorded one.
    counts: std::collections::HashMap<(String, String), (u32, u64)>,
}

impl RefusalLimiter {
    fn admit(&mut self, agency: &str, reason: &str, now: std::time::Instant) -> Admitted {
        let new_window =
            self.window_started.is_none_or(|started| now.duration_since(started) >= Duration::from_secs(60));
        if new_window {
            self.window_started = Some(now);
            // Only the counts not yet reported are kept (and forgotten for a kind with none).
            self.counts.retain(|_, (recorded, not_recorded)| {
                *recorded = 0;
                *not_recorded > 0
            });
        }
        let (recorded, not_recorded) = self.counts.entry((agency.to_owned(), reason.to_owned())).or_default();
        if *recorded >= REFUSALS_RECORDED_PER_MINUTE {
            if *not_recorded == 0 {
                tracing::warn!(
                    %agency,
                    reason,
                    "refusals of this kind are now counted, not each recorded in the audit log, until the minute ends"
                );
            }
            *not_recorded += 1;
            return Admitted::No;
        }
        *recorded += 1;
        Admitted::Yes { not_recorded_before: std::mem::take(not_recorded) }
    }
}

/// The actor of a refusal made before the token was verified: the certificate's agency alone.
fn agency_only(agency: &str) -> Actor {
    Actor { agency: agency.to_owned(), practitioner: String::new(), role: String::new() }
}

fn is_revoked(revocations: &CurrentRevocations, certificate: &CertificateId) -> bool {
    match revocations.read() {
        Ok(current) => current.revokes(certificate),
        Err(poisoned) => poisoned.into_inner().revokes(certificate),
    }
}

/// Whether the agent holding a delivery stream may still receive: its token not expired, its certificate not
/// revoked, its agency still in the policy set.
type StillAllowed = Arc<dyn Fn() -> Result<(), AuthError> + Send + Sync>;

/// A delivery stream that counts itself in the `connected_agents` metric while it is open, and ends (with
/// `UNAUTHENTICATED`, reason `token-expired`, `certificate-revoked` or `unknown-agency`) once its agent may no longer
/// receive: when the token that opened it expires (its `exp` plus the leeway), as soon as revocation lists that
/// revoke its certificate, or a policy set without its agency, are loaded, and in any case before it would carry
/// another copy (a race with the announcement). The agent opens it again with its fresh token.
pub struct CountedStream {
    inner: crate::delivery::DeliveryReceiver,
    agency: String,
    still_allowed: StillAllowed,
    /// Yields whenever the revocation lists or the policy set are reloaded; `None` once the broker stops reloading.
    reloads: Option<WatchStream<u64>>,
    /// Fires when the token that opened the stream is no longer accepted.
    token_expiry: std::pin::Pin<Box<tokio::time::Sleep>>,
    ended: bool,
}

/// The instant a token accepted until `valid_until` (Unix seconds, inclusive) stops being accepted.
fn expiry_instant(valid_until: u64) -> tokio::time::Instant {
    // A token valid for centuries (a far `exp`) would overflow the clocks; a year is as good as never for a stream.
    const FAR: Duration = Duration::from_secs(365 * 24 * 60 * 60);
    let left = std::time::UNIX_EPOCH
        .checked_add(Duration::from_secs(valid_until.saturating_add(1)))
        .map_or(FAR, |ends| ends.duration_since(std::time::SystemTime::now()).unwrap_or_default());
    tokio::time::Instant::now() + left.min(FAR)
}

/// Whether a token accepted until `valid_until` (Unix seconds, inclusive) has expired.
fn token_expired(valid_until: u64) -> bool {
    jsonwebtoken::get_current_timestamp() > valid_until
}

impl CountedStream {
    /// Ends the stream; the receiver is closed, so the recipient's actor puts the copies in flight on it back in its
    /// queue (for the agency's next stream, with a valid certificate, while the policy set knows it).
    fn end(&mut self, why: AuthError) -> StreamItem {
        self.ended = true;
        self.inner.close();
        tracing::warn!(agency = %self.agency, reason = %why, "ended a delivery stream whose agent may no longer receive");
        Err(why.into())
    }
}

impl tokio_stream::Stream for CountedStream {
    type Item = StreamItem;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<StreamItem>> {
        use std::task::Poll;
        if self.ended {
            return Poll::Ready(None);
        }
        if self.token_expiry.as_mut().poll(context).is_ready() {
            let why = AuthError::StreamTokenExpired(self.agency.clone());
            return Poll::Ready(Some(self.end(why)));
        }
        while let Some(reloads) = self.reloads.as_mut() {
            match std::pin::Pin::new(reloads).poll_next(context) {
                Poll::Ready(Some(_)) => {
                    if let Err(why) = (self.still_allowed)() {
                        return Poll::Ready(Some(self.end(why)));
                    }
                }
                Poll::Ready(None) => self.reloads = None,
                Poll::Pending => break,
            }
        }
        let next = self.inner.poll_recv(context);
        if matches!(next, Poll::Ready(Some(Ok(_))))
            && let Err(why) = (self.still_allowed)()
        {
            // The copy taken stays in flight with the broker: it goes out again on the agency's next stream.
            return Poll::Ready(Some(self.end(why)));
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
        let Identified { caller, certificate, token_valid_until } =
            self.authenticator.identify(&request, "deliveries").await?;
        tracing::info!(agency = %caller.agency, "delivery stream opened");
        let receiver = self.deliveries.subscribe(&caller.agency);
        crate::metrics::metrics().connected_agents.inc();
        let still_allowed: StillAllowed = {
            let (exchange, revocations, agency) =
                (self.exchange.clone(), self.authenticator.revocations.clone(), caller.agency.clone());
            Arc::new(move || {
                if token_expired(token_valid_until) {
                    Err(AuthError::StreamTokenExpired(agency.clone()))
                } else if is_revoked(&revocations, &certificate) {
                    Err(AuthError::Revoked(agency.clone()))
                } else if exchange.policy().agency(&agency).is_none() {
                    Err(AuthError::UnknownAgency(agency.clone()))
                } else {
                    Ok(())
                }
            })
        };
        Ok(Response::new(CountedStream {
            inner: receiver,
            agency: caller.agency,
            still_allowed,
            reloads: Some(WatchStream::from_changes(self.revocation_reloads.clone())),
            token_expiry: Box::pin(tokio::time::sleep_until(expiry_instant(token_valid_until))),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Up to the limit a minute each refusal of a kind is recorded; past it they are counted, and the next one recorded
    /// (in a later minute) carries the count. Kinds (agency, reason) are limited apart.
    #[test]
    fn refusals_past_the_limit_are_counted_into_the_next_one_recorded() {
        let mut limiter = RefusalLimiter::default();
        let start = std::time::Instant::now();
        for _ in 0..REFUSALS_RECORDED_PER_MINUTE {
            assert_eq!(limiter.admit("beds-police", "token-expired", start), Admitted::Yes { not_recorded_before: 0 });
        }
        for _ in 0..5 {
            assert_eq!(limiter.admit("beds-police", "token-expired", start), Admitted::No);
        }
        assert_eq!(limiter.admit("beds-police", "bad-signature", start), Admitted::Yes { not_recorded_before: 0 });
        assert_eq!(limiter.admit("luton-csc", "token-expired", start), Admitted::Yes { not_recorded_before: 0 });
        let later = start + Duration::from_secs(61);
        assert_eq!(limiter.admit("beds-police", "token-expired", later), Admitted::Yes { not_recorded_before: 5 });
        assert_eq!(limiter.admit("beds-police", "token-expired", later), Admitted::Yes { not_recorded_before: 0 });
        assert_eq!(limiter.counts.len(), 1, "kinds with nothing left to report are forgotten at each new minute");
    }
    /// A delivery stream of the school over a bare channel (its sender returned), with these checks.
    fn test_stream(
        still_allowed: StillAllowed,
        token_expiry: tokio::time::Sleep,
    ) -> (tokio::sync::mpsc::Sender<StreamItem>, CountedStream) {
        let (copies, receiver) = tokio::sync::mpsc::channel(4);
        crate::metrics::metrics().connected_agents.inc();
        let stream = CountedStream {
            inner: crate::delivery::DeliveryReceiver::detached(receiver),
            agency: "luton-oakwood-primary".to_owned(),
            still_allowed,
            reloads: None,
            token_expiry: Box::pin(token_expiry),
            ended: false,
        };
        (copies, stream)
    }

    /// A stream ends when the token that opened it stops being accepted, though no copy is due: the copy before
    /// then goes out, and the end says the token expired (so the agent opens it again with its fresh token).
    #[tokio::test]
    async fn a_stream_ends_when_its_token_expires_with_no_copy_due() {
        let valid_until = jsonwebtoken::get_current_timestamp() + 1;
        let expired = move || {
            if token_expired(valid_until) {
                Err(AuthError::StreamTokenExpired("luton-oakwood-primary".to_owned()))
            } else {
                Ok(())
            }
        };
        let (copies, mut stream) =
            test_stream(Arc::new(expired), tokio::time::sleep_until(expiry_instant(valid_until)));
        copies.send(Ok(pb::Delivery::default())).await.unwrap();
        assert!(stream.next().await.unwrap().is_ok(), "the token is valid: the copy goes out");
        let started = std::time::Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap().unwrap().unwrap_err();
        assert!(started.elapsed() <= Duration::from_millis(2100), "ended {:?} after", started.elapsed());
        assert!(jsonwebtoken::get_current_timestamp() > valid_until, "not before the token expired");
        assert_eq!(ended.code(), tonic::Code::Unauthenticated);
        assert!(ended.message().contains("expired"), "{}", ended.message());
        assert!(stream.next().await.is_none(), "and then nothing more");
        assert!(copies.is_closed(), "the actor sees the stream closed");

        // A token past its time is refused before a copy even if the timer has not fired (the checks race).
        let (copies, mut stream) = test_stream(Arc::new(expired), tokio::time::sleep(Duration::from_secs(3600)));
        copies.send(Ok(pb::Delivery::default())).await.unwrap();
        assert!(stream.next().await.unwrap().is_err(), "the copy does not go out");
        assert!(copies.is_closed());
    }

    #[test]
    fn a_far_expiry_does_not_overflow_the_timer() {
        let far = expiry_instant(u64::MAX);
        assert!(far > tokio::time::Instant::now() + Duration::from_secs(364 * 24 * 60 * 60));
        assert!(expiry_instant(0) <= tokio::time::Instant::now(), "long expired: at once");
    }

    use crate::{auth::revocation::RevocationList, pki::CertificateAuthority};
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    use tokio_stream::StreamExt;
    use x509_parser::prelude::{FromDer, X509Certificate};

    /// Lists revoking the stream's certificate that are in force without a reload being announced (a race with the
    /// announcement): the stream ends instead of carrying its next copy, and its receiver is closed, which is how the
    /// recipient's actor learns to put the copy back in its queue.
    #[tokio::test]
    async fn a_stream_of_a_revoked_certificate_ends_before_its_next_copy() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("Test").unwrap();
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca.cert_pem()).unwrap();
        let school = ca.issue_agency("luton-oakwood-primary").unwrap();
        let crl_path = dir.path().join("area.crl.pem");
        std::fs::write(&crl_path, ca.revocation_list(&[&school.cert_pem], 1).unwrap()).unwrap();
        let der = CertificateDer::from_pem_slice(school.cert_pem.as_bytes()).unwrap();
        let certificate = CertificateId::of(&X509Certificate::from_der(&der).unwrap().1);

        let revocations: CurrentRevocations = Arc::new(RwLock::new(Arc::new(RevocationList::none())));
        let still_allowed: StillAllowed = {
            let (revocations, certificate) = (revocations.clone(), Arc::new(certificate));
            Arc::new(move || {
                if is_revoked(&revocations, &certificate) {
                    Err(AuthError::Revoked("luton-oakwood-primary".to_owned()))
                } else {
                    Ok(())
                }
            })
        };
        let (copies, mut stream) = test_stream(still_allowed, tokio::time::sleep(Duration::from_secs(3600)));
        copies.send(Ok(pb::Delivery::default())).await.unwrap();
        assert!(stream.next().await.unwrap().is_ok(), "not revoked yet: the copy goes out");

        *revocations.write().unwrap() = Arc::new(RevocationList::load(&ca_path, &[crl_path]).unwrap());
        copies.send(Ok(pb::Delivery::default())).await.unwrap();
        let ended = stream.next().await.unwrap().unwrap_err();
        assert_eq!(ended.code(), tonic::Code::Unauthenticated);
        assert!(ended.message().contains("revoked"), "{}", ended.message());
        assert!(stream.next().await.is_none(), "and then nothing more");
        assert!(copies.is_closed(), "the actor sees the stream closed");
    }
}
