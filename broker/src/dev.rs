//! Development mode (`broker serve --dev`): everything needed to try the broker on one machine.
//!
//! Under `./.dev/` it makes, on first run only (files already there are kept): a development CA, the broker's server
//! certificate for `localhost`/`127.0.0.1`, one client certificate per agency in the policy set's registry, a
//! ready-to-use agent configuration per agency (`.dev/agents/<id>.toml`) with its inbox and outbox folders, and the
//! data directory `.dev/data`. Nothing here is fit for a real area: see deploy/README.md.

use std::path::{Path, PathBuf};

use std::time::Duration;

use crate::{
    auth::token::{DevIssuer, TokensFile},
    config::{Config, TlsPaths},
    delivery::DeliveryConfig,
    pki::{self, CertificateAuthority, PkiError},
    policy::{AgencyKind, PolicySet},
};

/// How long the development tokens written at each start stay valid.
pub const DEV_TOKEN_LIFETIME: Duration = Duration::from_secs(12 * 60 * 60);

/// The role a development token carries for an agency of this kind (the practitioner who usually sends its flows).
pub fn default_role(kind: AgencyKind) -> &'static str {
    match kind {
        AgencyKind::Police => "spoc",
        AgencyKind::Education => "dsl",
        AgencyKind::LocalAuthority => "social-worker",
        AgencyKind::Health => "health-professional",
        AgencyKind::FamilyHub | AgencyKind::VoluntarySector => "practitioner",
    }
}

/// Loads (or makes, on first use) the development identity provider of `agency` under `root/tokens/keys`.
pub fn dev_issuer(root: &Path, agency: &str) -> Result<(DevIssuer, PathBuf), PkiError> {
    let keys = root.join("tokens").join("keys");
    let private = keys.join(format!("{agency}.key"));
    let public = keys.join(format!("{agency}.pub.pem"));
    let generate_error =
        |reason: String| PkiError::Io { path: private.display().to_string(), source: std::io::Error::other(reason) };
    if private.exists() && public.exists() {
        let pem = std::fs::read_to_string(&private)
            .map_err(|source| PkiError::Io { path: private.display().to_string(), source })?;
        let issuer = DevIssuer::from_private_pem(agency, &pem).map_err(generate_error)?;
        return Ok((issuer, public));
    }
    let (issuer, private_pem, public_pem) = DevIssuer::generate(agency).map_err(generate_error)?;
    pki::write_file(&private, &private_pem)?;
    pki::write_file(&public, &public_pem)?;
    Ok((issuer, public))
}

/// Paths of the development tree.
pub struct DevLayout {
    pub root: PathBuf,
}

impl DevLayout {
    pub fn new(root: &Path) -> Self {
        Self { root: root.to_owned() }
    }
    pub fn pki(&self) -> PathBuf {
        self.root.join("pki")
    }
    pub fn agent_config(&self, agency: &str) -> PathBuf {
        self.root.join("agents").join(format!("{agency}.toml"))
    }
}

/// Makes whatever of the development tree is missing and returns the broker configuration that uses it.
pub fn prepare(
    root: &Path,
    policy_dir: &Path,
    policy: &PolicySet,
    listen: std::net::SocketAddr,
) -> Result<(Config, Vec<String>), PkiError> {
    let layout = DevLayout::new(root);
    let pki_dir = layout.pki();
    let ca_cert = pki_dir.join("ca.pem");
    let ca_key = pki_dir.join("ca.key");
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| PkiError::Io { path: path.display().to_string(), source })
    };
    let ca = if ca_cert.exists() && ca_key.exists() {
        CertificateAuthority::load(&read(&ca_cert)?, &read(&ca_key)?)?
    } else {
        let ca = CertificateAuthority::generate("Development area")?;
        pki::write_file(&ca_cert, ca.cert_pem())?;
        pki::write_file(&ca_key, ca.key_pem())?;
        ca
    };
    let server_cert = pki_dir.join("server.pem");
    let server_key = pki_dir.join("server.key");
    if !server_cert.exists() || !server_key.exists() {
        let issued = ca.issue_server(&["localhost", "127.0.0.1"])?;
        pki::write_file(&server_cert, &issued.cert_pem)?;
        pki::write_file(&server_key, &issued.key_pem)?;
    }
    let mut agencies = Vec::new();
    let mut tokens = TokensFile::default();
    for agency in policy.agencies() {
        let id = agency.id.as_str();
        let (issuer, public) = dev_issuer(root, id)?;
        tokens.issuers.push(issuer.issuer_file(&public));
        let subject = format!("dev-{}-{id}", default_role(agency.kind));
        let token = issuer
            .mint(&subject, &[default_role(agency.kind).to_owned()], DEV_TOKEN_LIFETIME)
            .map_err(|reason| PkiError::Io { path: id.to_owned(), source: std::io::Error::other(reason) })?;
        pki::write_file(&root.join("tokens").join(format!("{id}.jwt")), &token)?;
        let cert = pki_dir.join("agents").join(format!("{id}.pem"));
        let key = pki_dir.join("agents").join(format!("{id}.key"));
        if !cert.exists() || !key.exists() {
            let issued = ca.issue_agency(id)?;
            pki::write_file(&cert, &issued.cert_pem)?;
            pki::write_file(&key, &issued.key_pem)?;
        }
        let config_path = layout.agent_config(id);
        if !config_path.exists() {
            pki::write_file(&config_path, &agent_config(id, listen))?;
        }
        for folder in [root.join("inbox").join(id), root.join("outbox").join(id)] {
            std::fs::create_dir_all(&folder)
                .map_err(|source| PkiError::Io { path: folder.display().to_string(), source })?;
        }
        agencies.push(id.to_owned());
    }
    let config = Config {
        listen,
        metrics_listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9464))),
        data_dir: root.join("data"),
        policy_dir: policy_dir.to_owned(),
        tls: TlsPaths { ca_cert, cert: server_cert, key: server_key, crls: Vec::new() },
        max_message_bytes: crate::config::DEFAULT_MAX_MESSAGE_BYTES,
        delivery: DeliveryConfig::default(),
        storage: crate::store::StoreOptions::default(),
        checkpoint_origin: crate::audit::checkpoints::DEFAULT_ORIGIN.to_owned(),
        // The sample area's local authority audits, as its information-governance function would.
        auditor_agencies: policy
            .agencies()
            .filter(|agency| agency.kind == crate::policy::model::AgencyKind::LocalAuthority)
            .map(|agency| agency.id.clone())
            .collect(),
        tokens,
        base_dir: PathBuf::from("."),
    };
    Ok((config, agencies))
}

fn agent_config(agency: &str, listen: std::net::SocketAddr) -> String {
    format!(
        r#"# Development agent configuration for `{agency}`, written by `broker serve --dev`.
# Paths are relative to this file's folder.
agency = "{agency}"
broker_url = "https://127.0.0.1:{port}"
server_name = "localhost"
ca_cert = "../pki/ca.pem"
cert = "../pki/agents/{agency}.pem"
key = "../pki/agents/{agency}.key"
inbox = "../inbox/{agency}"
outbox = "../outbox/{agency}"
# A development token, re-minted each time `broker serve --dev` starts (valid 12 hours). Mint others with
# `cargo run -p broker -- dev token --agency {agency} --sub NAME --role ROLE > FILE`.
token_file = "../tokens/{agency}.jwt"
"#,
        port = listen.port()
    )
}
