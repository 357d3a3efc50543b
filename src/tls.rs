//! TLS for the listeners (public and admin HTTP, SMTP STARTTLS and implicit TLS): rustls with the
//! ring provider, TLS 1.2 and 1.3 only, ring's AEAD suites only, no renegotiation (rustls has
//! none). rustls speaks nothing older than 1.2; the versions are named anyway, so a future
//! default cannot widen them.
//!
//! Certificates come from PEM files and are served through an `ArcSwap` behind rustls'
//! `ResolvesServerCert`: SIGHUP re-reads the files, a pair that does not load (missing,
//! unparsable, key not matching the certificate) leaves the old pair serving; new handshakes get
//! the new certificate, established connections keep theirs. No listener is rebuilt.
//!
//! The handshake is the listener's first read, so it gets its own timer: a client that connects
//! and says nothing, or stalls halfway, is closed when it runs out. Every failure is counted by
//! listener and reason. The caller takes its connection permit before the handshake, so
//! handshakes in progress count against the listener's connection cap.

use crate::telemetry;
use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;

/// The protocol versions every listener offers.
pub static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// ALPN of the HTTP listeners: HTTP/1.1 only, as the listener itself (see `http`).
pub const ALPN_HTTP1: &[&[u8]] = &[b"http/1.1"];

/// Where a listener's certificate comes from: the files, and the config keys that named them
/// (errors name the key).
#[derive(Debug, Clone)]
pub struct CertSource {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub cert_key: String,
    pub key_key: String,
}

impl CertSource {
    /// `section.tls_cert_path` / `section.tls_key_path`; `None` when both are empty.
    pub fn from_config(section: &str, cert_path: &str, key_path: &str) -> Option<Self> {
        if cert_path.is_empty() && key_path.is_empty() {
            return None;
        }
        Some(Self {
            cert_path: PathBuf::from(cert_path),
            key_path: PathBuf::from(key_path),
            cert_key: format!("{section}.tls_cert_path"),
            key_key: format!("{section}.tls_key_path"),
        })
    }

    /// Reads and checks the pair: a certificate chain, a private key the provider can use, and
    /// the key matching the leaf certificate.
    pub fn load(&self, provider: &CryptoProvider) -> Result<CertifiedKey, String> {
        let certs = read_certs(&self.cert_path).map_err(|e| self.cert_err(e))?;
        let key = PrivateKeyDer::from_pem_file(&self.key_path).map_err(|e| {
            self.key_err(match e {
                rustls_pki_types::pem::Error::NoItemsFound => {
                    "no PEM private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY) in the file"
                        .to_string()
                }
                e => e.to_string(),
            })
        })?;
        CertifiedKey::from_der(certs, key, provider).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => self.key_err(format!(
                "the private key does not match the certificate in {} ({})",
                self.cert_key,
                self.cert_path.display()
            )),
            rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
                self.cert_err(format!("not a usable certificate: {e}"))
            }
            e => self.key_err(format!("not a usable private key: {e}")),
        })
    }

    fn cert_err(&self, e: impl std::fmt::Display) -> String {
        format!("{} {}: {e}", self.cert_key, self.cert_path.display())
    }

    fn key_err(&self, e: impl std::fmt::Display) -> String {
        format!("{} {}: {e}", self.key_key, self.key_path.display())
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no PEM CERTIFICATE in the file".into());
    }
    Ok(certs)
}

/// The pair a listener serves now; swapped whole on reload.
pub struct CertStore {
    listener: &'static str,
    source: CertSource,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertifiedKey>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("listener", &self.listener)
            .field("cert_path", &self.source.cert_path)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl CertStore {
    /// Loads the pair; start-up fails with the error (it names the key) when it does not load.
    pub fn open(listener: &'static str, source: CertSource) -> Result<Arc<Self>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let first = source.load(&provider)?;
        Ok(Arc::new(Self {
            listener,
            source,
            provider,
            current: ArcSwap::from_pointee(first),
        }))
    }

    pub fn listener(&self) -> &'static str {
        self.listener
    }

    /// Re-reads the files. On success new handshakes get the new pair; on failure the pair in
    /// service stays. Counted either way.
    pub fn reload(&self) -> Result<(), String> {
        match self.source.load(&self.provider) {
            Ok(next) => {
                self.current.store(Arc::new(next));
                metrics::counter!(telemetry::TLS_RELOADS, "listener" => self.listener, "result" => "ok")
                    .increment(1);
                Ok(())
            }
            Err(e) => {
                metrics::counter!(telemetry::TLS_RELOADS, "listener" => self.listener, "result" => "error")
                    .increment(1);
                Err(e)
            }
        }
    }

    /// A server config over this store: TLS 1.2/1.3, ring, no client certificates.
    fn server_config(self: &Arc<Self>, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, String> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| format!("tls ({}): {e}", self.listener))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }
}

/// Runs server handshakes for one listener, bounded by a timeout and counted.
#[derive(Clone)]
pub struct Acceptor {
    inner: tokio_rustls::TlsAcceptor,
    store: Arc<CertStore>,
    handshake_timeout: Duration,
    listener: &'static str,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor")
            .field("listener", &self.listener)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

/// Why a handshake did not complete (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// Not finished within the handshake timeout (silent or stalled client).
    Timeout,
    /// The client closed or reset the connection before finishing (also plain TCP probes).
    Closed,
    /// Not TLS, or TLS we do not speak: plain HTTP on the TLS port, TLS 1.1 or older, no shared
    /// cipher suite or ALPN protocol, an alert from the client (it did not trust the certificate).
    Protocol,
}

impl HandshakeFailure {
    pub fn label(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Closed => "closed",
            Self::Protocol => "protocol",
        }
    }

    fn of(e: &std::io::Error) -> Self {
        // tokio-rustls reports TLS errors (and the alert it sent or got) as InvalidData.
        if e.kind() == std::io::ErrorKind::InvalidData {
            Self::Protocol
        } else {
            Self::Closed
        }
    }
}

impl Acceptor {
    /// `listener` labels the metrics (`public`, `admin`, `smtp`, `smtps`).
    pub fn new(
        listener: &'static str,
        store: Arc<CertStore>,
        alpn: &[&[u8]],
        handshake_timeout: Duration,
    ) -> Result<Self, String> {
        let config = store.server_config(alpn)?;
        Ok(Self {
            inner: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            store,
            handshake_timeout,
            listener,
        })
    }

    /// Opens the listener's certificate and builds its acceptor; `None` when no certificate is
    /// configured (the listener stays plain).
    pub fn from_config(
        listener: &'static str,
        source: Option<CertSource>,
        alpn: &[&[u8]],
        handshake_timeout: Duration,
    ) -> Result<Option<Self>, String> {
        match source {
            None => Ok(None),
            Some(source) => {
                let store = CertStore::open(listener, source)?;
                Self::new(listener, store, alpn, handshake_timeout).map(Some)
            }
        }
    }

    pub fn store(&self) -> &Arc<CertStore> {
        &self.store
    }

    /// The server handshake within the timeout; `Err` (counted, logged at debug) when it fails.
    pub async fn accept<IO>(&self, io: IO) -> Result<TlsStream<IO>, HandshakeFailure>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let failure = match tokio::time::timeout(self.handshake_timeout, self.inner.accept(io))
            .await
        {
            Ok(Ok(tls)) => {
                let version = match tls.get_ref().1.protocol_version() {
                    Some(rustls::ProtocolVersion::TLSv1_3) => "1.3",
                    Some(rustls::ProtocolVersion::TLSv1_2) => "1.2",
                    _ => "other",
                };
                metrics::counter!(telemetry::TLS_HANDSHAKES, "listener" => self.listener, "version" => version)
                    .increment(1);
                return Ok(tls);
            }
            Ok(Err(e)) => {
                let f = HandshakeFailure::of(&e);
                tracing::debug!(listener = self.listener, reason = f.label(), error = %e, "TLS handshake failed");
                f
            }
            Err(_) => {
                tracing::debug!(
                    listener = self.listener,
                    timeout_ms = self.handshake_timeout.as_millis() as u64,
                    "TLS handshake timed out"
                );
                HandshakeFailure::Timeout
            }
        };
        metrics::counter!(telemetry::TLS_HANDSHAKE_FAILURES, "listener" => self.listener, "reason" => failure.label())
            .increment(1);
        Err(failure)
    }
}

/// Re-reads every listener's certificate (SIGHUP); a pair that does not load keeps the old one.
pub fn reload_all(stores: &[Arc<CertStore>]) {
    for s in stores {
        match s.reload() {
            Ok(()) => tracing::info!(
                listener = s.listener(),
                "SIGHUP: reloaded the TLS certificate"
            ),
            Err(e) => tracing::error!(
                listener = s.listener(),
                error = %e,
                "SIGHUP: the TLS certificate did not load; the previous certificate stays in service"
            ),
        }
    }
}

/// Loads every certificate the config names, as start-up would (for `check-config`).
pub fn check(cfg: &crate::config::Config) -> Result<usize, String> {
    let provider = rustls::crypto::ring::default_provider();
    let mut n = 0;
    for source in sources(cfg).into_iter().flatten() {
        source.load(&provider)?;
        n += 1;
    }
    Ok(n)
}

/// The certificate sources of the public listener, the admin listener and SMTP, in that order.
pub fn sources(cfg: &crate::config::Config) -> [Option<CertSource>; 3] {
    [
        CertSource::from_config("http", &cfg.http.tls_cert_path, &cfg.http.tls_key_path),
        CertSource::from_config("admin", &cfg.admin.tls_cert_path, &cfg.admin.tls_key_path),
        CertSource::from_config("email", &cfg.email.tls_cert_path, &cfg.email.tls_key_path),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pair {
        cert: String,
        key: String,
    }

    fn pair(name: &str) -> Pair {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    fn source(dir: &Path, cert: &str, key: &str) -> CertSource {
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        CertSource::from_config("http", c.to_str().unwrap(), k.to_str().unwrap()).unwrap()
    }

    fn load(s: &CertSource) -> Result<CertifiedKey, String> {
        s.load(&rustls::crypto::ring::default_provider())
    }

    #[test]
    fn a_good_pair_loads_and_bad_ones_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (pair("a.test"), pair("b.test"));
        assert!(load(&source(dir.path(), &a.cert, &a.key)).is_ok());

        let e = load(&source(dir.path(), &a.cert, &b.key)).err().unwrap();
        assert!(
            e.starts_with("http.tls_key_path") && e.contains("does not match"),
            "{e}"
        );
        let e = load(&source(dir.path(), "garbage", &a.key)).err().unwrap();
        assert!(
            e.starts_with("http.tls_cert_path") && e.contains("no PEM CERTIFICATE"),
            "{e}"
        );
        let e = load(&source(dir.path(), &a.cert, &a.cert)).err().unwrap();
        assert!(
            e.starts_with("http.tls_key_path") && e.contains("no PEM private key"),
            "{e}"
        );
        // A PEM block that is not DER of a certificate.
        let bogus = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let e = load(&source(dir.path(), bogus, &a.key)).err().unwrap();
        assert!(e.starts_with("http.tls_"), "{e}");
        let missing =
            CertSource::from_config("admin", "/nonexistent/c.pem", "/nonexistent/k.pem").unwrap();
        let e = load(&missing).err().unwrap();
        assert!(
            e.starts_with("admin.tls_cert_path /nonexistent/c.pem"),
            "{e}"
        );
        assert!(CertSource::from_config("http", "", "").is_none());
    }

    #[test]
    fn a_failed_reload_keeps_the_pair_in_service() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (pair("a.test"), pair("b.test"));
        let src = source(dir.path(), &a.cert, &a.key);
        let store = CertStore::open("public", src.clone()).unwrap();
        let first = store.current.load_full();

        std::fs::write(&src.cert_path, "not a certificate").unwrap();
        assert!(store.reload().is_err());
        assert!(Arc::ptr_eq(&first, &store.current.load_full()));

        std::fs::write(&src.cert_path, &b.cert).unwrap();
        std::fs::write(&src.key_path, &b.key).unwrap();
        store.reload().unwrap();
        let now = store.current.load_full();
        assert_ne!(first.cert[0], now.cert[0]);
    }
}
