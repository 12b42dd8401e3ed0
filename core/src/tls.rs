//! TLS for every link, with rustls and the ring provider (no OpenSSL).
//!
//! Certificates and keys are PEM files. A client with no CA file trusts the
//! system's roots; an `https://` URL without TLS is an error, never plaintext.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// Why a TLS setting cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{0}")]
    Config(String),
    #[error("invalid gRPC url {url:?}: {reason}")]
    Url { url: String, reason: String },
}

/// Installs ring as the process's rustls provider, so that crates building
/// their own configurations (the Redis client) find one. Idempotent.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The PEM file at `path`, checked to hold at least one certificate.
pub fn read_certs_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read(path)?;
    certs(path, &pem)?;
    Ok(pem)
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::Pem {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    Ok(certs)
}

/// The PEM private key at `path`.
pub fn read_key_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read(path)?;
    key(path, &pem)?;
    Ok(pem)
}

fn key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        reason: format!("no PEM private key: {e}"),
    })
}

/// The roots a client trusts: the CA file's certificates, else the system's.
pub fn root_store(ca_file: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in certs(path, &read(path)?)? {
                roots.add(cert).map_err(|e| TlsError::Pem {
                    path: path.to_owned(),
                    reason: format!("unusable CA certificate: {e}"),
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsError::Config(
                    "no CA file given and no system root certificates found".into(),
                ));
            }
        }
    }
    Ok(roots)
}

/// A client certificate and its key, for mutual TLS.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl ClientIdentity {
    /// Both files or neither: one without the other is a mistake worth a
    /// startup error rather than a connection without the certificate.
    pub fn from_pair(
        cert_file: Option<&PathBuf>,
        key_file: Option<&PathBuf>,
        what: &str,
    ) -> Result<Option<Self>, TlsError> {
        match (cert_file, key_file) {
            (Some(c), Some(k)) => Ok(Some(Self {
                cert_file: c.clone(),
                key_file: k.clone(),
            })),
            (None, None) => Ok(None),
            _ => Err(TlsError::Config(format!(
                "{what}: a client certificate needs both its cert file and its key file"
            ))),
        }
    }
}

/// A rustls client configuration (for MQTT and the model server).
pub fn client_config(
    ca_file: Option<&Path>,
    identity: Option<&ClientIdentity>,
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsError::Config(e.to_string()))?
    .with_root_certificates(root_store(ca_file)?);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some(id) => {
            let chain = certs(&id.cert_file, &read(&id.cert_file)?)?;
            let key = key(&id.key_file, &read(&id.key_file)?)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Config(format!("client certificate: {e}")))
        }
    }
}

/// A gRPC server's TLS flags (each also read from the environment).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerTlsArgs {
    /// Serve gRPC over TLS with this certificate chain (PEM); needs --tls-key-file.
    #[arg(long, env = "PALAVER_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert-file.
    #[arg(long, env = "PALAVER_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, env = "PALAVER_TLS_CLIENT_CA_FILE", requires = "tls_cert_file")]
    pub tls_client_ca_file: Option<PathBuf>,
}

impl ServerTlsArgs {
    /// tonic's server TLS, or None to serve plaintext.
    pub fn server_config(&self) -> Result<Option<ServerTlsConfig>, TlsError> {
        let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) else {
            if self.tls_cert_file.is_some() || self.tls_key_file.is_some() {
                return Err(TlsError::Config(
                    "--tls-cert-file and --tls-key-file go together".into(),
                ));
            }
            if self.tls_client_ca_file.is_some() {
                return Err(TlsError::Config(
                    "--tls-client-ca-file needs --tls-cert-file and --tls-key-file".into(),
                ));
            }
            return Ok(None);
        };
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(
            read_certs_pem(cert)?,
            read_key_pem(key)?,
        ));
        if let Some(ca) = &self.tls_client_ca_file {
            config = config.client_ca_root(Certificate::from_pem(read_certs_pem(ca)?));
        }
        Ok(Some(config))
    }
}

/// A gRPC client's TLS flags, used when its URL is `https://`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientTlsArgs {
    /// CA certificate(s) (PEM) that the gRPC server's certificate must chain to,
    /// for an https:// URL [default: the system's roots].
    #[arg(long, env = "PALAVER_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS with the gRPC server.
    #[arg(long, env = "PALAVER_TLS_CLIENT_CERT_FILE")]
    pub tls_client_cert_file: Option<PathBuf>,
    /// Private key (PEM) of --tls-client-cert-file.
    #[arg(long, env = "PALAVER_TLS_CLIENT_KEY_FILE")]
    pub tls_client_key_file: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// A tonic endpoint for `url`: `https://` gets TLS (a startup error if
    /// the files are unusable), `http://` is plaintext and refuses TLS files,
    /// which would otherwise be silently ignored.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, TlsError> {
        let bad = |reason: String| TlsError::Url {
            url: url.to_owned(),
            reason,
        };
        let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| bad(e.to_string()))?;
        let identity = ClientIdentity::from_pair(
            self.tls_client_cert_file.as_ref(),
            self.tls_client_key_file.as_ref(),
            "--tls-client-cert-file/--tls-client-key-file",
        )?;
        match endpoint.uri().scheme_str() {
            Some("https") => {
                let mut tls = ClientTlsConfig::new();
                tls = match &self.tls_ca_file {
                    Some(ca) => tls.ca_certificate(Certificate::from_pem(read_certs_pem(ca)?)),
                    None => tls.with_native_roots(),
                };
                if let Some(id) = identity {
                    tls = tls.identity(Identity::from_pem(
                        read_certs_pem(&id.cert_file)?,
                        read_key_pem(&id.key_file)?,
                    ));
                }
                endpoint.tls_config(tls).map_err(|e| bad(e.to_string()))
            }
            Some("http") => {
                if self.tls_ca_file.is_some() || identity.is_some() {
                    return Err(bad(
                        "TLS files are given but the url is http://; use https://".into(),
                    ));
                }
                Ok(endpoint)
            }
            other => Err(bad(format!(
                "scheme {other:?} is neither http:// nor https://"
            ))),
        }
    }
}
