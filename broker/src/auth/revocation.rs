//! Revoked agency certificates: the area CA's certificate revocation lists (`tls.crls`).
//!
//! The TLS layer (tonic's `ServerTlsConfig`) checks that a client certificate chains to the area CA but takes no
//! revocation lists, so the broker checks revocation where it names the caller ([`crate::transport::service`]): on
//! every request, and for each open delivery stream whenever the lists are reloaded and before every copy it is
//! about to carry, so that a list reloaded while an agent is connected applies to that connection at once. A certificate is revoked when a list signed by the CA
//! that issued it (a certificate of `tls.ca_cert` whose subject is the list's issuer) names its serial number.
//! Each list's signature is checked when it is loaded (x509-parser with ring), not on every request; a request then
//! costs a set lookup (the certificate's serial number is remembered with its agency).
//!
//! The lists are read at start (a list that does not load stops the start) and again whenever one of the files
//! changes ([`RevocationList::files_changed`], checked every two seconds): a changed set that does not load is
//! reported and the previous one stays in force, as for token keys. A list past its `nextUpdate` still applies
//! (the revocations it names stay true); the broker warns about it at each load, so the operator publishes a fresh
//! one.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::SystemTime,
};

use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, pem::PemObject};
use x509_parser::{
    certificate::X509Certificate, prelude::FromDer, revocation_list::CertificateRevocationList, time::ASN1Time,
};

/// The revocation list in force; replaced when its files change.
pub type CurrentRevocations = Arc<RwLock<Arc<RevocationList>>>;

/// The certificates the area CA has revoked, by (issuer, serial number).
#[derive(Debug, Default)]
pub struct RevocationList {
    revoked: HashSet<CertificateId>,
    /// The files read, with what they were when read.
    files: Vec<(PathBuf, Option<(SystemTime, u64)>)>,
}

impl RevocationList {
    /// No list configured: nothing is revoked.
    pub fn none() -> Self {
        Self::default()
    }

    /// Reads every list in `paths` (PEM, one or more `X509 CRL` blocks per file, or a single DER list), each of which
    /// must be signed by a certificate in the PEM file `ca_cert`. Returns every problem found.
    pub fn load(ca_cert: &Path, paths: &[PathBuf]) -> Result<Self, Vec<String>> {
        let mut list = Self::none();
        if paths.is_empty() {
            return Ok(list);
        }
        let mut problems = Vec::new();
        let ca_pem = match std::fs::read(ca_cert) {
            Ok(bytes) => bytes,
            Err(error) => return Err(vec![format!("`{}`: {error}", ca_cert.display())]),
        };
        let authorities: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&ca_pem).filter_map(Result::ok).collect();
        let mut issuers = Vec::new();
        for der in &authorities {
            match X509Certificate::from_der(der) {
                Ok((_, certificate)) => issuers.push(certificate),
                Err(error) => problems.push(format!("`{}`: a certificate does not parse: {error}", ca_cert.display())),
            }
        }
        if issuers.is_empty() {
            problems.push(format!("`{}` holds no CA certificate to check revocation lists against", ca_cert.display()));
        }
        let now = ASN1Time::now();
        for path in paths {
            list.files.push((path.clone(), stamp(path)));
            let bytes = match std::fs::read(path) {
                Ok(bytes) => bytes,
                Err(error) => {
                    problems.push(format!("`{}`: {error}", path.display()));
                    continue;
                }
            };
            let mut ders: Vec<Vec<u8>> = CertificateRevocationListDer::pem_slice_iter(&bytes)
                .filter_map(Result::ok)
                .map(|der| der.as_ref().to_vec())
                .collect();
            if ders.is_empty() && bytes.first() == Some(&0x30) {
                ders.push(bytes);
            }
            if ders.is_empty() {
                problems
                    .push(format!("`{}` holds no certificate revocation list (PEM `X509 CRL` or DER)", path.display()));
            }
            for der in ders {
                let crl = match CertificateRevocationList::from_der(&der) {
                    Ok((_, crl)) => crl,
                    Err(error) => {
                        problems.push(format!("`{}`: a revocation list does not parse: {error}", path.display()));
                        continue;
                    }
                };
                // Every CA of that name (an old and a new key of the same CA during a rollover share it).
                let named: Vec<&X509Certificate<'_>> =
                    issuers.iter().filter(|issuer| issuer.subject() == crl.issuer()).collect();
                if named.is_empty() {
                    problems.push(format!(
                        "`{}`: a revocation list's issuer `{}` is not a CA of `{}`",
                        path.display(),
                        crl.issuer(),
                        ca_cert.display()
                    ));
                    continue;
                }
                let verified = named.iter().map(|issuer| crl.verify_signature(issuer.public_key())).find(Result::is_ok);
                if verified.is_none() {
                    problems.push(format!(
                        "`{}`: a revocation list's signature does not verify against any CA named `{}` in `{}`",
                        path.display(),
                        crl.issuer(),
                        ca_cert.display()
                    ));
                    continue;
                }
                if crl.next_update().is_some_and(|next| next < now) {
                    tracing::warn!(
                        path = %path.display(),
                        "a certificate revocation list is past its next update: it still applies; publish a fresh one"
                    );
                }
                let issuer = crl.issuer().as_raw().to_vec();
                for revoked in crl.iter_revoked_certificates() {
                    list.revoked
                        .insert(CertificateId { issuer: issuer.clone(), serial: revoked.raw_serial().to_vec() });
                }
            }
        }
        if problems.is_empty() { Ok(list) } else { Err(problems) }
    }

    /// Whether the list revokes the certificate with this issuer (DER name) and serial number.
    pub fn revokes(&self, certificate: &CertificateId) -> bool {
        !self.revoked.is_empty() && self.revoked.contains(certificate)
    }

    /// How many certificates the list revokes.
    pub fn len(&self) -> usize {
        self.revoked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.revoked.is_empty()
    }

    /// Whether a file the list was read from has changed (or appeared, or gone) since.
    pub fn files_changed(&self) -> bool {
        self.files.iter().any(|(path, seen)| stamp(path) != *seen)
    }
}

/// What names a certificate to a revocation list: its issuer's DER name and its serial number (the DER integer's
/// content bytes, as both certificates and lists encode it).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CertificateId {
    pub issuer: Vec<u8>,
    pub serial: Vec<u8>,
}

impl CertificateId {
    pub fn of(certificate: &X509Certificate<'_>) -> Self {
        Self { issuer: certificate.issuer().as_raw().to_vec(), serial: certificate.raw_serial().to_vec() }
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::CertificateAuthority;

    /// A folder holding a new CA's certificate as `ca.pem`.
    fn area() -> (tempfile::TempDir, CertificateAuthority, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("Test").unwrap();
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca.cert_pem()).unwrap();
        (dir, ca, ca_path)
    }

    /// Writes a revocation list signed by `signer`, revoking `revoked` (PEM certificates), as `dir/name`.
    fn list_file(dir: &Path, name: &str, signer: &CertificateAuthority, revoked: &[&str]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, signer.revocation_list(revoked, 1).unwrap()).unwrap();
        path
    }

    fn id_of(pem: &str) -> CertificateId {
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        CertificateId::of(&X509Certificate::from_der(&der).unwrap().1)
    }

    #[test]
    fn a_list_signed_by_the_ca_revokes_the_certificates_it_names_and_no_others() {
        let (dir, ca, ca_path) = area();
        let lost = ca.issue_agency("luton-oakwood-primary").unwrap();
        let kept = ca.issue_agency("luton-oakwood-primary").unwrap();
        let crl_path = list_file(dir.path(), "area.crl.pem", &ca, &[&lost.cert_pem]);
        let list = RevocationList::load(&ca_path, std::slice::from_ref(&crl_path)).unwrap();
        assert_eq!(list.len(), 1);
        assert!(list.revokes(&id_of(&lost.cert_pem)));
        assert!(!list.revokes(&id_of(&kept.cert_pem)));
        assert!(!list.files_changed());
        std::fs::write(&crl_path, ca.revocation_list(&[&lost.cert_pem, &kept.cert_pem], 2).unwrap()).unwrap();
        assert!(list.files_changed());
        assert_eq!(RevocationList::load(&ca_path, &[crl_path]).unwrap().len(), 2);
    }

    #[test]
    fn a_list_from_another_ca_or_a_broken_file_is_refused_with_every_problem() {
        let (dir, _ca, ca_path) = area();
        let other = CertificateAuthority::generate("Other").unwrap();
        let stranger = other.issue_agency("beds-police").unwrap();
        let foreign = list_file(dir.path(), "foreign.crl.pem", &other, &[&stranger.cert_pem]);
        let broken = dir.path().join("broken.crl.pem");
        std::fs::write(&broken, "not a list").unwrap();
        let missing = dir.path().join("missing.crl.pem");
        let problems = RevocationList::load(&ca_path, &[foreign, broken, missing]).unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("is not a CA of"), "{}", problems[0]);
        assert!(problems[1].contains("holds no certificate revocation list"), "{}", problems[1]);
        assert!(problems[2].contains("missing.crl.pem"), "{}", problems[2]);
    }

    /// During a CA key rollover both certificates, of the same name, are in `tls.ca_cert`: a list signed by either
    /// key loads.
    #[test]
    fn a_list_signed_by_either_key_of_a_rolled_over_ca_loads() {
        let (dir, old, ca_path) = area();
        let new = CertificateAuthority::generate("Test").unwrap();
        std::fs::write(&ca_path, format!("{}{}", old.cert_pem(), new.cert_pem())).unwrap();
        let agency = new.issue_agency("beds-police").unwrap();
        let crl_path = list_file(dir.path(), "area.crl.pem", &new, &[&agency.cert_pem]);
        let list = RevocationList::load(&ca_path, &[crl_path]).unwrap();
        assert!(list.revokes(&id_of(&agency.cert_pem)));
    }

    /// A list naming the CA as its issuer but signed by another key (same name, other CA) is refused.
    #[test]
    fn a_list_whose_signature_does_not_verify_is_refused() {
        let (dir, ca, ca_path) = area();
        let impostor = CertificateAuthority::generate("Test").unwrap();
        let agency = ca.issue_agency("beds-police").unwrap();
        let forged = list_file(dir.path(), "forged.crl.pem", &impostor, &[&agency.cert_pem]);
        let problems = RevocationList::load(&ca_path, &[forged]).unwrap_err();
        assert!(problems[0].contains("signature does not verify"), "{problems:?}");
    }
}
