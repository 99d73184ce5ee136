//! Practitioner identity: bearer JWTs issued by each agency's own identity provider.
//!
//! Trust model: the client certificate says which agency's system is calling; the token says which person. The
//! broker trusts an issuer **for one agency only** ([`TrustedIssuer::agency`]), so a token is checked against the
//! issuers of the agency named by the certificate and nothing else, and its `agency` claim must name that same
//! agency. Only asymmetric algorithms are accepted (RS256, ES256, EdDSA), and each issuer lists the ones it uses:
//! `alg: none` does not parse, and an HMAC token signed with a trusted public key as its secret (algorithm
//! confusion) is refused before any key is touched. Signature, issuer, audience, expiry and not-before are checked
//! with a small leeway. Errors say what is wrong without echoing the token or any key material.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::SystemTime,
};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind, jwk::JwkSet};
use serde::{Deserialize, Serialize};

/// The most clock skew `tokens.leeway_seconds` may allow.
pub const MAX_LEEWAY_SECONDS: u64 = 300;

/// The claims the broker reads. `roles` may also be given as a single `role`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// The agency the practitioner works for: must be the certificate's agency.
    pub agency: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// The verified person behind a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Practitioner {
    pub subject: String,
    pub name: String,
    pub roles: Vec<String>,
    /// The last second (Unix time) the token is accepted: its `exp` claim plus the configured leeway. A delivery
    /// stream opened with the token ends then ([`crate::transport::service::CountedStream`]).
    pub valid_until: u64,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("no bearer token: send `authorization: Bearer <jwt>` from your agency's identity provider")]
    Missing,
    #[error("the bearer token is not a well-formed JWT")]
    Malformed,
    #[error("the token's algorithm `{0}` is not allowed for this agency (allowed: RS256, ES256, EdDSA as configured)")]
    AlgorithmNotAllowed(String),
    #[error("the broker trusts no token issuer for agency `{0}`")]
    NoTrustedIssuer(String),
    #[error("the token's issuer is not trusted for this agency")]
    UnknownIssuer,
    #[error("the token's key id is not one of the issuer's keys")]
    UnknownKey,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token is for another audience")]
    WrongAudience,
    #[error("the token lacks the `{0}` claim")]
    MissingClaim(String),
    #[error("the token is for another agency than the client certificate")]
    AgencyMismatch,
}

impl TokenError {
    /// Machine-readable reason for `google.rpc.ErrorInfo`.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Missing => "missing-token",
            TokenError::Malformed => "malformed-token",
            TokenError::AlgorithmNotAllowed(_) => "algorithm-not-allowed",
            TokenError::NoTrustedIssuer(_) => "no-trusted-issuer",
            TokenError::UnknownIssuer => "unknown-issuer",
            TokenError::UnknownKey => "unknown-key",
            TokenError::BadSignature => "bad-signature",
            TokenError::Expired => "token-expired",
            TokenError::NotYetValid => "token-not-yet-valid",
            TokenError::WrongAudience => "wrong-audience",
            TokenError::MissingClaim(_) => "missing-claim",
            TokenError::AgencyMismatch => "agency-mismatch",
        }
    }

    /// True when the token is genuine but for the wrong agency: `PERMISSION_DENIED` rather than `UNAUTHENTICATED`.
    pub fn is_permission(&self) -> bool {
        matches!(self, TokenError::AgencyMismatch)
    }
}

/// One identity provider the broker trusts, for one agency.
#[derive(Clone)]
pub struct TrustedIssuer {
    pub agency: String,
    pub issuer: String,
    pub algorithms: Vec<Algorithm>,
    /// Keys by key id (`None` for a key without one, tried when the token names no `kid`).
    pub keys: Vec<(Option<String>, DecodingKey)>,
}

/// Settings for [`TokenVerifier`].
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokensFile {
    /// The audience tokens must name (`aud`).
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds (default 30).
    pub leeway_seconds: Option<u64>,
    #[serde(default)]
    pub issuers: Vec<IssuerFile>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IssuerFile {
    pub agency: String,
    pub issuer: String,
    /// Any of `RS256`, `ES256`, `EdDSA`.
    pub algorithms: Vec<String>,
    /// Public keys as PEM files, each with the key id tokens name in their header.
    #[serde(default)]
    pub public_keys: Vec<PublicKeyFile>,
    /// A JWKS file (the issuer's published key set), as an alternative or in addition.
    pub jwks: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PublicKeyFile {
    pub kid: Option<String>,
    pub pem: PathBuf,
}

/// Checks bearer tokens against the issuers trusted for the calling agency.
#[derive(Clone)]
pub struct TokenVerifier {
    audience: String,
    leeway_seconds: u64,
    by_agency: HashMap<String, Vec<TrustedIssuer>>,
    /// Key files and when they last changed, so a change can be noticed and the keys reloaded.
    watched: Vec<(PathBuf, Option<SystemTime>)>,
    /// Tokens already verified, by SHA-256 of the token: an agent sends the same token on every call, and checking
    /// a signature costs tens of microseconds. An entry is used only for the same agency and only until the token's
    /// own expiry; a key reload builds a new verifier, and so an empty cache.
    verified: std::sync::Arc<std::sync::Mutex<HashMap<[u8; 32], CachedToken>>>,
}

#[derive(Clone)]
struct CachedToken {
    agency: String,
    expires: u64,
    practitioner: Practitioner,
}

/// Verified tokens remembered at most; the cache is emptied when full.
const VERIFIED_CACHE_LIMIT: usize = 10_000;

pub const DEFAULT_AUDIENCE: &str = "safeguarding-broker";
const ALLOWED: [Algorithm; 3] = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

impl TokenVerifier {
    /// Reads every issuer's keys; `base` resolves relative paths. Every problem is reported.
    pub fn load(settings: &TokensFile, base: &Path) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        if settings.leeway_seconds.is_some_and(|leeway| leeway > MAX_LEEWAY_SECONDS) {
            // A value in milliseconds (30000) would accept tokens hours after they expired.
            problems.push(format!("`tokens.leeway_seconds` must be at most {MAX_LEEWAY_SECONDS} (five minutes)"));
        }
        let mut by_agency: HashMap<String, Vec<TrustedIssuer>> = HashMap::new();
        let mut watched = Vec::new();
        for (index, issuer) in settings.issuers.iter().enumerate() {
            let at = format!("tokens.issuers[{index}] (agency `{}`)", issuer.agency);
            let mut algorithms = Vec::new();
            for name in &issuer.algorithms {
                match name.parse::<Algorithm>() {
                    Ok(algorithm) if ALLOWED.contains(&algorithm) => algorithms.push(algorithm),
                    _ => problems.push(format!("{at}: algorithm `{name}` is not allowed (use RS256, ES256 or EdDSA)")),
                }
            }
            if issuer.algorithms.is_empty() {
                problems.push(format!("{at}: list the algorithms the issuer signs with"));
            }
            let mut keys = Vec::new();
            for key in &issuer.public_keys {
                let path = base.join(&key.pem);
                watched.push((path.clone(), modified(&path)));
                match std::fs::read(&path) {
                    Ok(pem) => match decoding_key_from_pem(&pem, &algorithms) {
                        Some(decoding) => keys.push((key.kid.clone(), decoding)),
                        None => problems.push(format!(
                            "{at}: `{}` is not a public key for the issuer's algorithms",
                            path.display()
                        )),
                    },
                    Err(error) => problems.push(format!("{at}: `{}`: {error}", path.display())),
                }
            }
            if let Some(jwks) = &issuer.jwks {
                let path = base.join(jwks);
                watched.push((path.clone(), modified(&path)));
                match std::fs::read(&path)
                    .map_err(|error| error.to_string())
                    .and_then(|bytes| serde_json::from_slice::<JwkSet>(&bytes).map_err(|error| error.to_string()))
                {
                    Ok(set) => {
                        for jwk in &set.keys {
                            match DecodingKey::from_jwk(jwk) {
                                Ok(decoding) => keys.push((jwk.common.key_id.clone(), decoding)),
                                Err(_) => problems.push(format!("{at}: a key in `{}` is not usable", path.display())),
                            }
                        }
                    }
                    Err(error) => problems.push(format!("{at}: `{}`: {error}", path.display())),
                }
            }
            if issuer.public_keys.is_empty() && issuer.jwks.is_none() {
                problems.push(format!("{at}: give `public_keys` or `jwks`"));
            }
            by_agency.entry(issuer.agency.clone()).or_default().push(TrustedIssuer {
                agency: issuer.agency.clone(),
                issuer: issuer.issuer.clone(),
                algorithms,
                keys,
            });
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Self {
            audience: settings.audience.clone().unwrap_or_else(|| DEFAULT_AUDIENCE.to_owned()),
            leeway_seconds: settings.leeway_seconds.unwrap_or(30),
            by_agency,
            watched,
            verified: std::sync::Arc::default(),
        })
    }

    /// True when a key file changed since loading (the broker then reloads).
    pub fn key_files_changed(&self) -> bool {
        self.watched.iter().any(|(path, then)| modified(path) != *then)
    }

    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// Verifies `token` for a request whose certificate names `agency`.
    pub fn verify(&self, agency: &str, token: &str) -> Result<Practitioner, TokenError> {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let now = jsonwebtoken::get_current_timestamp();
        if let Ok(cache) = self.verified.lock()
            && let Some(cached) = cache.get(&digest)
            && cached.agency == agency
            && cached.expires > now
        {
            return Ok(cached.practitioner.clone());
        }
        let practitioner = self.verify_uncached(agency, token)?;
        let expires = jsonwebtoken::dangerous::insecure_decode_claims::<Claims>(token).map(|claims| claims.exp);
        if let (Ok(expires), Ok(mut cache)) = (expires, self.verified.lock()) {
            if cache.len() >= VERIFIED_CACHE_LIMIT {
                cache.clear();
            }
            cache
                .insert(digest, CachedToken { agency: agency.to_owned(), expires, practitioner: practitioner.clone() });
        }
        Ok(practitioner)
    }

    fn verify_uncached(&self, agency: &str, token: &str) -> Result<Practitioner, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if !ALLOWED.contains(&header.alg) {
            return Err(TokenError::AlgorithmNotAllowed(format!("{:?}", header.alg)));
        }
        let issuers = self.by_agency.get(agency).ok_or_else(|| TokenError::NoTrustedIssuer(agency.to_owned()))?;
        // The issuer is chosen by the unverified `iss` claim, then everything is verified against that issuer only.
        let unverified: serde_json::Value =
            jsonwebtoken::dangerous::insecure_decode_claims(token).map_err(|_| TokenError::Malformed)?;
        let claimed_issuer = unverified.get("iss").and_then(serde_json::Value::as_str).unwrap_or_default();
        let issuer = issuers.iter().find(|issuer| issuer.issuer == claimed_issuer).ok_or(TokenError::UnknownIssuer)?;
        if !issuer.algorithms.contains(&header.alg) {
            return Err(TokenError::AlgorithmNotAllowed(format!("{:?}", header.alg)));
        }
        let candidates: Vec<&DecodingKey> = match &header.kid {
            Some(kid) => {
                issuer.keys.iter().filter(|(id, _)| id.as_deref() == Some(kid.as_str())).map(|(_, key)| key).collect()
            }
            None => issuer.keys.iter().map(|(_, key)| key).collect(),
        };
        if candidates.is_empty() {
            return Err(TokenError::UnknownKey);
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway_seconds;
        validation.validate_nbf = true;
        validation.set_issuer(&[issuer.issuer.as_str()]);
        validation.set_audience(&[self.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let mut last = TokenError::BadSignature;
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                Ok(data) => return practitioner(data.claims, agency, self.leeway_seconds),
                Err(error) => {
                    last = match error.kind() {
                        ErrorKind::ExpiredSignature => TokenError::Expired,
                        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                        ErrorKind::InvalidAudience => TokenError::WrongAudience,
                        ErrorKind::InvalidIssuer => TokenError::UnknownIssuer,
                        ErrorKind::MissingRequiredClaim(claim) => TokenError::MissingClaim(claim.clone()),
                        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                            TokenError::AlgorithmNotAllowed(format!("{:?}", header.alg))
                        }
                        ErrorKind::Json(_) | ErrorKind::Base64(_) | ErrorKind::Utf8(_) | ErrorKind::InvalidToken => {
                            TokenError::Malformed
                        }
                        _ => TokenError::BadSignature,
                    };
                    if last != TokenError::BadSignature {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}

fn practitioner(claims: Claims, agency: &str, leeway_seconds: u64) -> Result<Practitioner, TokenError> {
    if claims.agency != agency {
        return Err(TokenError::AgencyMismatch);
    }
    if claims.sub.trim().is_empty() {
        return Err(TokenError::MissingClaim("sub".to_owned()));
    }
    let mut roles = claims.roles;
    if let Some(role) = claims.role
        && !roles.contains(&role)
    {
        roles.push(role);
    }
    Ok(Practitioner {
        subject: claims.sub,
        name: claims.name,
        roles,
        valid_until: claims.exp.saturating_add(leeway_seconds),
    })
}

fn decoding_key_from_pem(pem: &[u8], algorithms: &[Algorithm]) -> Option<DecodingKey> {
    for algorithm in algorithms {
        let key = match algorithm {
            Algorithm::RS256 => DecodingKey::from_rsa_pem(pem),
            Algorithm::ES256 => DecodingKey::from_ec_pem(pem),
            Algorithm::EdDSA => DecodingKey::from_ed_pem(pem),
            _ => continue,
        };
        if let Ok(key) = key {
            return Some(key);
        }
    }
    None
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|metadata| metadata.modified()).ok()
}

/// A development or test identity provider for one agency: an Ed25519 key that mints tokens.
pub struct DevIssuer {
    pub agency: String,
    pub issuer: String,
    pub kid: String,
    encoding: jsonwebtoken::EncodingKey,
}

impl DevIssuer {
    /// The issuer URL used for development tokens of `agency`.
    pub fn issuer_for(agency: &str) -> String {
        format!("https://idp.dev.invalid/{agency}")
    }

    /// Generates a key pair; returns the issuer and the (private PKCS#8, public SPKI) PEMs.
    pub fn generate(agency: &str) -> Result<(Self, String, String), String> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(|error| error.to_string())?;
        let private = key.serialize_pem();
        let public = key.public_key_pem();
        let issuer = Self::from_private_pem(agency, &private)?;
        Ok((issuer, private, public))
    }

    pub fn from_private_pem(agency: &str, private_pem: &str) -> Result<Self, String> {
        let encoding =
            jsonwebtoken::EncodingKey::from_ed_pem(private_pem.as_bytes()).map_err(|error| error.to_string())?;
        Ok(Self { agency: agency.to_owned(), issuer: Self::issuer_for(agency), kid: "dev-1".to_owned(), encoding })
    }

    /// A token for `subject` with `roles`, valid for `ttl` from now.
    pub fn mint(&self, subject: &str, roles: &[String], ttl: std::time::Duration) -> Result<String, String> {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: subject.to_owned(),
            aud: DEFAULT_AUDIENCE.to_owned(),
            exp: now + ttl.as_secs(),
            nbf: Some(now.saturating_sub(1)),
            iat: Some(now),
            agency: self.agency.clone(),
            name: String::new(),
            roles: roles.to_vec(),
            role: None,
        };
        self.mint_claims(&claims)
    }

    /// Signs arbitrary claims (tests use this for expired and future tokens).
    pub fn mint_claims(&self, claims: &Claims) -> Result<String, String> {
        let mut header = jsonwebtoken::Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).map_err(|error| error.to_string())
    }

    /// The `[[tokens.issuers]]` entry that trusts this issuer with its public key at `public_pem_path`.
    pub fn issuer_file(&self, public_pem_path: &Path) -> IssuerFile {
        IssuerFile {
            agency: self.agency.clone(),
            issuer: self.issuer.clone(),
            algorithms: vec!["EdDSA".to_owned()],
            public_keys: vec![PublicKeyFile { kid: Some(self.kid.clone()), pem: public_pem_path.to_owned() }],
            jwks: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, DevIssuer, DevIssuer, TokenVerifier) {
        let dir = tempfile::tempdir().unwrap();
        let (police, _, police_public) = DevIssuer::generate("beds-police").unwrap();
        let (school, _, school_public) = DevIssuer::generate("luton-oakwood-primary").unwrap();
        std::fs::write(dir.path().join("police.pem"), police_public).unwrap();
        std::fs::write(dir.path().join("school.pem"), school_public).unwrap();
        let settings = TokensFile {
            audience: None,
            leeway_seconds: Some(5),
            issuers: vec![police.issuer_file(Path::new("police.pem")), school.issuer_file(Path::new("school.pem"))],
        };
        let verifier = TokenVerifier::load(&settings, dir.path()).unwrap();
        (dir, police, school, verifier)
    }

    fn claims(issuer: &DevIssuer) -> Claims {
        let now = jsonwebtoken::get_current_timestamp();
        Claims {
            iss: issuer.issuer.clone(),
            sub: "pc-1234".to_owned(),
            aud: DEFAULT_AUDIENCE.to_owned(),
            exp: now + 600,
            nbf: None,
            iat: Some(now),
            agency: issuer.agency.clone(),
            name: String::new(),
            roles: vec!["spoc".to_owned()],
            role: None,
        }
    }

    #[test]
    fn a_good_token_names_the_practitioner_and_roles() {
        let (_dir, police, _, verifier) = setup();
        let token = police.mint("pc-1234", &["spoc".to_owned()], std::time::Duration::from_secs(60)).unwrap();
        let exp = jsonwebtoken::dangerous::insecure_decode_claims::<Claims>(&token).unwrap().exp;
        let practitioner = verifier.verify("beds-police", &token).unwrap();
        assert_eq!(practitioner.subject, "pc-1234");
        assert_eq!(practitioner.roles, vec!["spoc".to_owned()]);
        assert_eq!(practitioner.valid_until, exp + 5, "accepted until its expiry plus the leeway");
        assert_eq!(verifier.verify("beds-police", &token).unwrap().valid_until, exp + 5, "also when remembered");
    }

    /// A leeway written in milliseconds would accept tokens hours after they expired: refused at load.
    #[test]
    fn a_leeway_past_five_minutes_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (police, _, public) = DevIssuer::generate("beds-police").unwrap();
        std::fs::write(dir.path().join("police.pem"), public).unwrap();
        let settings = |leeway| TokensFile {
            audience: None,
            leeway_seconds: Some(leeway),
            issuers: vec![police.issuer_file(Path::new("police.pem"))],
        };
        let problems = TokenVerifier::load(&settings(30_000), dir.path()).err().unwrap();
        assert!(problems.iter().any(|problem| problem.contains("`tokens.leeway_seconds`")), "{problems:?}");
        assert!(TokenVerifier::load(&settings(MAX_LEEWAY_SECONDS), dir.path()).is_ok());
    }

    #[test]
    fn a_token_from_another_agency_is_refused() {
        let (_dir, _, school, verifier) = setup();
        let token = school.mint("dsl-1", &["dsl".to_owned()], std::time::Duration::from_secs(60)).unwrap();
        assert_eq!(verifier.verify("beds-police", &token), Err(TokenError::UnknownIssuer));
        // Even signed by the right key, an `agency` claim naming another agency is refused.
        let (_dir, police, _, verifier) = setup();
        let mut foreign = claims(&police);
        foreign.agency = "luton-oakwood-primary".to_owned();
        let token = police.mint_claims(&foreign).unwrap();
        assert_eq!(verifier.verify("beds-police", &token), Err(TokenError::AgencyMismatch));
    }

    #[test]
    fn expired_future_wrong_audience_and_tampered_tokens_are_refused() {
        let (_dir, police, _, verifier) = setup();
        let now = jsonwebtoken::get_current_timestamp();
        let mut expired = claims(&police);
        expired.exp = now - 600;
        assert_eq!(verifier.verify("beds-police", &police.mint_claims(&expired).unwrap()), Err(TokenError::Expired));
        let mut future = claims(&police);
        future.nbf = Some(now + 600);
        assert_eq!(verifier.verify("beds-police", &police.mint_claims(&future).unwrap()), Err(TokenError::NotYetValid));
        let mut audience = claims(&police);
        audience.aud = "another-service".to_owned();
        assert_eq!(
            verifier.verify("beds-police", &police.mint_claims(&audience).unwrap()),
            Err(TokenError::WrongAudience)
        );
        let token = police.mint_claims(&claims(&police)).unwrap();
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let mut tampered = claims(&police);
        tampered.roles = vec!["manager".to_owned()];
        use base64::Engine;
        parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&tampered).unwrap());
        assert_eq!(verifier.verify("beds-police", &parts.join(".")), Err(TokenError::BadSignature));
    }

    #[test]
    fn none_and_hmac_confusion_are_refused() {
        use base64::Engine;
        let (dir, police, _, verifier) = setup();
        let encode = |value: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
        };
        let payload = encode(&serde_json::to_value(claims(&police)).unwrap());
        let none = format!("{}.{payload}.", encode(&serde_json::json!({"alg": "none", "typ": "JWT"})));
        assert_eq!(verifier.verify("beds-police", &none), Err(TokenError::Malformed));
        // HS256 with the trusted public key's PEM as the HMAC secret.
        let public = std::fs::read(dir.path().join("police.pem")).unwrap();
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.kid = Some("dev-1".to_owned());
        let confused =
            jsonwebtoken::encode(&header, &claims(&police), &jsonwebtoken::EncodingKey::from_secret(&public)).unwrap();
        assert!(matches!(verifier.verify("beds-police", &confused), Err(TokenError::AlgorithmNotAllowed(_))));
        assert_eq!(verifier.verify("beds-police", "not a token"), Err(TokenError::Malformed));
    }

    #[test]
    fn a_remembered_token_is_still_refused_for_another_agency_and_after_it_expires() {
        let (_dir, police, _, verifier) = setup();
        let mut soon = claims(&police);
        soon.exp = jsonwebtoken::get_current_timestamp() + 1;
        let token = police.mint_claims(&soon).unwrap();
        assert!(verifier.verify("beds-police", &token).is_ok());
        assert!(verifier.verify("beds-police", &token).is_ok(), "from the cache");
        assert!(verifier.verify("luton-oakwood-primary", &token).is_err(), "the cache is per agency");
        std::thread::sleep(std::time::Duration::from_millis(2100));
        let mut strict = verifier.clone();
        strict.leeway_seconds = 0;
        assert_eq!(strict.verify("beds-police", &token), Err(TokenError::Expired), "the cache ends at expiry");
    }

    #[test]
    fn unknown_key_ids_and_agencies_without_issuers_are_refused() {
        let (_dir, police, _, verifier) = setup();
        let mut header = jsonwebtoken::Header::new(Algorithm::EdDSA);
        header.kid = Some("rotated-away".to_owned());
        let token = jsonwebtoken::encode(&header, &claims(&police), &police.encoding).unwrap();
        assert_eq!(verifier.verify("beds-police", &token), Err(TokenError::UnknownKey));
        let token = police.mint_claims(&claims(&police)).unwrap();
        assert!(matches!(verifier.verify("luton-csc", &token), Err(TokenError::NoTrustedIssuer(_))));
    }

    #[test]
    fn configuration_problems_are_all_reported() {
        let settings = TokensFile {
            audience: None,
            leeway_seconds: None,
            issuers: vec![IssuerFile {
                agency: "beds-police".to_owned(),
                issuer: "x".to_owned(),
                algorithms: vec!["HS256".to_owned()],
                public_keys: vec![PublicKeyFile { kid: None, pem: PathBuf::from("missing.pem") }],
                jwks: None,
            }],
        };
        let problems = TokenVerifier::load(&settings, Path::new("/nonexistent")).err().unwrap();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("HS256"));
    }
}
