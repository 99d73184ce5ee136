//! Who is calling: the TLS client certificate names the agency; the bearer token names the practitioner.
//!
//! The certificate has already been checked against the area's CA by rustls during the handshake (a certificate
//! that does not chain to it never reaches this module). Here the broker reads the agency from the certificate's
//! URI subject alternative name `urn:agency:<id>` and checks that the policy set knows that agency, and that the area
//! CA's revocation lists ([`revocation`]) do not name the certificate.
//! INVARIANT: the sending agency is always taken from here, never from anything in a message (DESIGN.md invariant 2).

pub mod revocation;
pub mod token;

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::pki::{AGENCY_URI_PREFIX, is_valid_agency_id};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no client certificate was presented")]
    NoCertificate,
    #[error("the client certificate could not be parsed")]
    BadCertificate,
    #[error("the client certificate names no agency (expected a URI subject alternative name `urn:agency:<id>`)")]
    NoAgency,
    #[error("the client certificate names more than one agency")]
    SeveralAgencies,
    #[error("the client certificate names agency `{0}`, which the policy set does not know")]
    UnknownAgency(String),
    #[error("the client certificate of agency `{0}` has been revoked by the area CA: use the agency's new certificate")]
    Revoked(String),
    #[error(
        "the bearer token that opened agency `{0}`'s delivery stream has expired: open the stream again with a fresh token"
    )]
    StreamTokenExpired(String),
}

/// Reads the agency id from a DER certificate's `urn:agency:<id>` URI SAN.
pub fn agency_from_certificate(der: &[u8]) -> Result<String, AuthError> {
    identify(der).map(|(agency, _)| agency)
}

/// The agency a DER certificate names ([`agency_from_certificate`]) and what names the certificate to a revocation
/// list.
pub fn identify(der: &[u8]) -> Result<(String, revocation::CertificateId), AuthError> {
    let (_, certificate) = X509Certificate::from_der(der).map_err(|_| AuthError::BadCertificate)?;
    let id = revocation::CertificateId::of(&certificate);
    let names = certificate.subject_alternative_name().map_err(|_| AuthError::BadCertificate)?;
    let mut agencies =
        names.iter().flat_map(|extension| extension.value.general_names.iter()).filter_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(AGENCY_URI_PREFIX),
            _ => None,
        });
    let agency = agencies.next().ok_or(AuthError::NoAgency)?;
    if agencies.next().is_some() {
        return Err(AuthError::SeveralAgencies);
    }
    if !is_valid_agency_id(agency) {
        return Err(AuthError::NoAgency);
    }
    Ok((agency.to_owned(), id))
}

/// The authenticated caller of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The agency named by the client certificate.
    pub agency: String,
    /// The practitioner named by the bearer token (subject), or empty when the agency's system itself calls.
    pub practitioner: String,
    /// Roles the token grants.
    pub roles: Vec<String>,
}
