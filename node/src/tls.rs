//! Optional TLS for every gRPC port and for the broker.
//!
//! A node given a certificate and key (`--tls-cert`, `--tls-key`, or
//! `SNS_TLS_CERT` / `SNS_TLS_KEY`) serves TLS on its one port: clients
//! (`tsc --tls`) and other nodes alike. A node given a CA (`--tls-ca`,
//! `SNS_TLS_CA`) makes its own calls to other nodes over TLS, checking
//! their certificates against that CA (and the host name or IP address it
//! dials). A broker URL `amqps://...` is dialled over TLS, checking the
//! broker against `--amqp-ca` (`SNS_AMQP_CA`) or the system's roots.
//!
//! The settings are process-wide (one node per process): [`install`] once
//! at start, and every channel [`crate::net`] makes and every server built
//! with [`server_builder`] follows them. Without any, everything is plain
//! text as before. The local launcher makes a CA and a certificate for
//! `127.0.0.1`, `::1` and `localhost` with `--tls` ([`make_local`]).

use crate::error::{Error, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Where a node's TLS material comes from (files; none = plain text).
#[derive(Debug, Clone, Default, Args)]
pub struct TlsArgs {
    /// PEM certificate (chain) this node serves TLS with; needs --tls-key.
    #[arg(long, env = "SNS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "SNS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) the other nodes' certificates are checked
    /// against; with it, this node's calls to other nodes use TLS.
    #[arg(long, env = "SNS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM CA certificate(s) an `amqps://` broker is checked against
    /// (default: the system's roots).
    #[arg(long, env = "SNS_AMQP_CA")]
    pub amqp_ca: Option<PathBuf>,
}

/// The process's TLS settings, once loaded.
#[derive(Debug, Default)]
struct Settings {
    server: Option<ServerTlsConfig>,
    client: Option<ClientTlsConfig>,
    amqp_ca: Option<String>,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

fn read(what: &str, path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("cannot read the {what} {}: {e}", path.display())))?;
    if !text.contains("-----BEGIN ") {
        return Err(Error::Config(format!("the {what} {} is not PEM", path.display())));
    }
    Ok(text)
}

impl TlsArgs {
    /// Loads the files and makes them the process's settings. Called once,
    /// before any channel or server is made; a second call is refused.
    pub fn install(&self) -> Result<()> {
        let server = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(
                ServerTlsConfig::new()
                    .identity(Identity::from_pem(read("TLS certificate", cert)?, read("TLS key", key)?)),
            ),
            _ => None,
        };
        let client = match &self.tls_ca {
            Some(ca) => Some(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("TLS CA", ca)?))),
            None => None,
        };
        let amqp_ca = self.amqp_ca.as_deref().map(|p| read("broker CA", p)).transpose()?;
        SETTINGS
            .set(Settings { server, client, amqp_ca })
            .map_err(|_| Error::Other("TLS settings installed twice".into()))
    }
}

fn settings() -> &'static Settings {
    SETTINGS.get_or_init(Settings::default)
}

/// The TLS configuration for outgoing node-to-node calls, if any.
pub fn client() -> Option<ClientTlsConfig> {
    settings().client.clone()
}

/// A gRPC server builder serving TLS when this node has a certificate.
pub fn server_builder() -> Result<tonic::transport::Server> {
    let builder = tonic::transport::Server::builder();
    match &settings().server {
        Some(cfg) => builder
            .tls_config(cfg.clone())
            .map_err(|e| Error::Config(format!("the TLS certificate or key cannot be used: {e}"))),
        None => Ok(builder),
    }
}

/// Connects to the broker at `url`; `amqps://` URLs are checked against
/// `--amqp-ca` when given.
///
/// lapin runs each connection on an I/O thread of its own that only the
/// socket's end stops, and offers no way to abandon an attempt: a broker
/// that accepted the connection and never answers (hung or stopped, a
/// proxy in front of one that is gone) would keep that thread and socket
/// for good, one more at every timed-out attempt. So the socket is dialled
/// here, and an attempt that fails or is dropped before the connection is
/// up (a timeout around this future) shuts it down, and lets lapin dial no
/// other; the thread then ends.
pub async fn amqp_connect(url: &str, props: lapin::ConnectionProperties) -> lapin::Result<lapin::Connection> {
    let uri: lapin::uri::AMQPUri = url.parse().map_err(|e: String| std::io::Error::other(e))?;
    let runtime = lapin::runtime::default_runtime()?;
    let tls = lapin::tcp::OwnedTLSConfig { identity: None, cert_chain: settings().amqp_ca.clone() };
    // Resolved here, on the caller's runtime: lapin dials from a thread
    // of its own.
    let addrs: Vec<std::net::SocketAddr> =
        tokio::net::lookup_host((uri.authority.host.as_str(), uri.authority.port)).await?.collect();
    let mut attempt = Attempt { dialled: std::sync::Arc::default(), connected: false };
    let dial = attempt.dialled.clone();
    let connect = async move |uri: lapin::uri::AMQPUri, runtime| {
        if dial.abandoned.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::other("connection attempt abandoned").into());
        }
        let stream: lapin::tcp::AsyncTcpStream<async_compat::Compat<tokio::net::TcpStream>> =
            lapin::tcp::AsyncTcpStream::connect(&runtime, addrs.clone()).await?;
        if let lapin::tcp::AsyncTcpStream::Plain(plain) = &stream {
            use std::os::fd::AsFd as _;
            let socket = std::net::TcpStream::from(plain.get_ref().as_fd().try_clone_to_owned()?);
            *dial.socket.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(socket);
        }
        Ok(match uri.scheme {
            lapin::uri::AMQPScheme::AMQP => stream,
            lapin::uri::AMQPScheme::AMQPS => stream.into_tls(&uri.authority.host, tls.as_ref()).await?,
        })
    };
    let conn = lapin::Connection::connector(uri, runtime, connect, props).await?;
    attempt.connected = true;
    Ok(conn)
}

/// What lapin's dialler shares with [`amqp_connect`].
#[derive(Default)]
struct Dialled {
    /// A second handle on the socket dialled last.
    socket: std::sync::Mutex<Option<std::net::TcpStream>>,
    /// The attempt ended without a connection: dial nothing more.
    abandoned: std::sync::atomic::AtomicBool,
}

/// One connection attempt: unless it ends with the connection up, its
/// socket is shut down (see [`amqp_connect`]).
struct Attempt {
    dialled: std::sync::Arc<Dialled>,
    connected: bool,
}

impl Drop for Attempt {
    fn drop(&mut self) {
        // The second handle goes either way; the connection keeps its own.
        let socket = self.dialled.socket.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if self.connected {
            return;
        }
        self.dialled.abandoned.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(socket) = socket {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A CA and a certificate signed by it for this machine's loopback names,
/// as PEM: (CA certificate, node certificate, node key).
pub fn make_local() -> Result<(String, String, String)> {
    let fail = |e: rcgen::Error| Error::Other(format!("cannot make a TLS certificate: {e}"));
    let ca_key = rcgen::KeyPair::generate().map_err(fail)?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
    ca.distinguished_name.push(rcgen::DnType::CommonName, "Tiny SNS local CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(fail)?;
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let node_key = rcgen::KeyPair::generate().map_err(fail)?;
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let mut node = rcgen::CertificateParams::new(names).map_err(fail)?;
    node.distinguished_name.push(rcgen::DnType::CommonName, "Tiny SNS node");
    node.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let node_cert = node.signed_by(&node_key, &issuer).map_err(fail)?;
    Ok((ca_cert.pem(), node_cert.pem(), node_key.serialize_pem()))
}

/// Writes [`make_local`]'s output under `dir` (the key with mode 0600)
/// unless it is there already; returns the settings naming the files.
pub fn ensure_local(dir: &Path) -> Result<TlsArgs> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let (ca, cert, key) = (dir.join("ca.pem"), dir.join("node.pem"), dir.join("node.key"));
    if !(ca.exists() && cert.exists() && key.exists()) {
        let (ca_pem, cert_pem, key_pem) = make_local()?;
        let write = |path: &Path, text: &str, mode: u32| -> Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(path)
                .map_err(|e| Error::io(path, e))?;
            f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(|e| Error::io(path, e))
        };
        write(&key, &key_pem, 0o600)?;
        write(&cert, &cert_pem, 0o644)?;
        write(&ca, &ca_pem, 0o644)?;
    }
    Ok(TlsArgs { tls_cert: Some(cert), tls_key: Some(key), tls_ca: Some(ca), amqp_ca: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_certificates_are_pem_and_the_key_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let args = ensure_local(dir.path()).unwrap();
        let key = args.tls_key.as_deref().unwrap();
        assert_eq!(std::fs::metadata(key).unwrap().permissions().mode() & 0o777, 0o600);
        for p in [args.tls_cert.as_deref().unwrap(), args.tls_ca.as_deref().unwrap(), key] {
            assert!(read("file", p).is_ok(), "{} is PEM", p.display());
        }
        // A second call keeps the files (nodes already started trust them).
        let before = std::fs::read(args.tls_ca.as_deref().unwrap()).unwrap();
        ensure_local(dir.path()).unwrap();
        assert_eq!(std::fs::read(args.tls_ca.as_deref().unwrap()).unwrap(), before);
    }

    #[test]
    fn a_file_that_is_not_pem_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cert.pem");
        std::fs::write(&p, "hello").unwrap();
        let e = read("TLS certificate", &p).unwrap_err().to_string();
        assert!(e.contains("cert.pem") && e.contains("not PEM"), "{e}");
    }
}
