//! Development and test certificates, made with rcgen.
//!
//! A real area runs one certificate authority and issues each agency a client certificate naming it (see
//! deploy/README.md). For development (`broker serve --dev`) and for the integration tests this module plays that
//! authority: it makes a CA, a server certificate for `localhost` and `127.0.0.1`, and one client certificate per
//! agency carrying the agency's identity as the URI subject alternative name `urn:agency:<id>`
//! ([`AGENCY_URI_PREFIX`]), which is the scheme [`crate::auth`] reads.

use std::{fs, path::Path};

use rustls::pki_types::pem::PemObject;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams,
    SanType, SerialNumber,
};

/// Certificates name their agency with a URI subject alternative name of this form: `urn:agency:beds-police`.
pub const AGENCY_URI_PREFIX: &str = "urn:agency:";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("could not generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("could not read or write `{path}`: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("`{0}` is not a valid agency id for a certificate (use lowercase letters, digits and `-`)")]
    BadAgencyId(String),
}

/// A PEM certificate and its PEM private key.
#[derive(Clone, Debug)]
pub struct CertifiedKeyPem {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A certificate authority that can issue server and agency certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

impl CertificateAuthority {
    /// Makes a new self-signed CA for an area.
    pub fn generate(area_name: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, format!("{area_name} safeguarding broker development CA"));
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Self { issuer: Issuer::new(params, key), cert_pem: cert.pem(), key_pem })
    }

    /// Loads a CA written earlier by [`CertificateAuthority::write`].
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self { issuer, cert_pem: cert_pem.to_owned(), key_pem: key_pem.to_owned() })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues the broker's server certificate for the given DNS names and IP addresses.
    pub fn issue_server(&self, names: &[&str]) -> Result<CertifiedKeyPem, PkiError> {
        let mut params = CertificateParams::new(names.iter().map(|name| (*name).to_owned()).collect::<Vec<_>>())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "safeguarding broker");
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        self.issue(params)
    }

    /// Issues an agency's client certificate naming it as `urn:agency:<agency_id>`.
    pub fn issue_agency(&self, agency_id: &str) -> Result<CertifiedKeyPem, PkiError> {
        if !is_valid_agency_id(agency_id) {
            return Err(PkiError::BadAgencyId(agency_id.to_owned()));
        }
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let uri = format!("{AGENCY_URI_PREFIX}{agency_id}");
        params.subject_alt_names = vec![SanType::URI(uri.as_str().try_into()?)];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, agency_id);
        dn.push(DnType::OrganizationName, agency_id);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.issue(params)
    }

    /// A certificate revocation list (PEM) revoking the given certificates (PEM), valid for a week from now: what the
    /// area CA publishes for the broker's `tls.crls` when an agency's certificate or key is lost or compromised.
    pub fn revocation_list(&self, revoked_cert_pems: &[&str], number: u64) -> Result<String, PkiError> {
        let now = time::OffsetDateTime::now_utc();
        let mut revoked_certs = Vec::new();
        for pem in revoked_cert_pems {
            let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
                .map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
            let (_, certificate) =
                x509_parser::parse_x509_certificate(&der).map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
            let serial_number = SerialNumber::from(certificate.serial.to_bytes_be());
            revoked_certs.push(RevokedCertParams {
                serial_number,
                revocation_time: now,
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::days(7),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }

    fn issue(&self, params: CertificateParams) -> Result<CertifiedKeyPem, PkiError> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKeyPem { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// Agency ids are short, lowercase and safe in file names, URIs and delivery ids.
pub fn is_valid_agency_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
}

/// Writes `contents` to `path` (creating parent folders), readable only by the owner when it is a key.
pub fn write_file(path: &Path, contents: &str) -> Result<(), PkiError> {
    let io_err = |source| PkiError::Io { path: path.display().to_string(), source };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_err)?;
    }
    fs::write(path, contents).map_err(io_err)?;
    #[cfg(unix)]
    if path.extension().is_some_and(|ext| ext == "key") {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agency_certificate_carries_the_agency_uri() {
        let ca = CertificateAuthority::generate("Test").unwrap();
        let issued = ca.issue_agency("beds-police").unwrap();
        let der = rustls_pemfile_first_cert(&issued.cert_pem);
        let agency = crate::auth::agency_from_certificate(&der).unwrap();
        assert_eq!(agency, "beds-police");
    }

    #[test]
    fn a_loaded_ca_issues_certificates() {
        let ca = CertificateAuthority::generate("Test").unwrap();
        let loaded = CertificateAuthority::load(ca.cert_pem(), ca.key_pem()).unwrap();
        assert!(loaded.issue_agency("luton-csc").is_ok());
    }

    #[test]
    fn agency_ids_are_checked() {
        assert!(is_valid_agency_id("luton-csc"));
        assert!(!is_valid_agency_id("Luton CSC"));
        assert!(!is_valid_agency_id("../etc"));
        assert!(!is_valid_agency_id(""));
    }

    fn rustls_pemfile_first_cert(pem: &str) -> Vec<u8> {
        use base64::Engine;
        let body: String = pem.lines().filter(|line| !line.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD.decode(body).unwrap()
    }
}
