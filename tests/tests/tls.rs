//! TLS, end to end: the launcher's `--tls` deployment serves TLS on every
//! port and its nodes talk TLS to each other (registration, replication,
//! the gateway, the synchronizers); `tsc --tls --ca` works directly and
//! through the gateway, with posts crossing clusters; a plain-text client
//! is refused with a clear error; synchronizers reach the real broker over
//! AMQPS through a TLS-terminating proxy. Real processes, real gRPC on
//! loopback, the real broker; every wait polls with a deadline.

use sns_e2e::nodes::rt;
use sns_e2e::{Client, Deployment, eventually};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn ca(d: &Deployment) -> PathBuf {
    d.dir().join("tls").join("ca.pem")
}

fn tls_client(d: &Deployment, user: &str, extra: &[&str]) -> anyhow::Result<Client> {
    let ca = ca(d);
    let port = d.coord_port.to_string();
    let mut args = vec!["--tls", "--ca", ca.to_str().expect("utf-8 path"), "-h", "127.0.0.1", "-k", &port, "-u", user];
    args.extend_from_slice(extra);
    Client::with_args(&args, user)
}

#[test]
fn tsc_over_tls_directly_and_through_the_gateway() -> anyhow::Result<()> {
    let d = Deployment::builder().clusters(2).servers(2).tls().start()?;
    assert!(
        d.stdout().contains(&format!("tsc --tls --ca {}", ca(&d).display())),
        "the launcher says how to connect: {}",
        d.stdout()
    );
    // The launcher is ready only once every node registered and every
    // master replicates to its slave: node-to-node calls work over TLS.
    // User 1 (cluster 1) through the gateway, user 2 (cluster 2) directly.
    let mut c1 = tls_client(&d, "1", &["--gateway"])?;
    let mut c2 = tls_client(&d, "2", &[])?;
    c1.expect_line("=====================================")?;
    c2.expect_line("=====================================")?;
    c1.poll_list(&[1, 2], &[])?;
    c1.run("FOLLOW 2", "Command completed successfully")?;
    c2.poll_list(&[1, 2], &[1])?;
    c1.run("TIMELINE", "Now you are in the timeline")?;
    c2.run("TIMELINE", "Now you are in the timeline")?;
    // A post crosses clusters: server, synchronizers, broker, the other
    // cluster's server, and back to a client through the gateway.
    c2.send("over tls")?;
    c1.expect_post(2, "over tls")?;
    Ok(())
}

#[test]
fn a_plain_text_client_of_a_tls_deployment_gets_a_clear_error() -> anyhow::Result<()> {
    let d = Deployment::builder().clusters(1).servers(1).tls().start()?;
    let mut c = Client::start(d.coord_port, "1")?;
    let code = c.wait_exit()?;
    assert_ne!(code, 0, "a plain-text client cannot work with a TLS coordinator");
    let err = c.stderr();
    assert!(!err.is_empty(), "it says why");
    // A plain-text gRPC call to the coordinator fails; the same call over
    // TLS with the deployment's CA works.
    let rt = rt();
    let plain = rt.block_on(sns_e2e::nodes::get_server(d.coord_port, 1));
    assert!(plain.is_err(), "plain text to a TLS port: {plain:?}");
    // A client that does not trust the deployment's CA refuses the
    // coordinator's certificate.
    let port = d.coord_port.to_string();
    let mut untrusting = Client::with_args(&["--tls", "-h", "127.0.0.1", "-k", &port, "-u", "1"], "1")?;
    assert_ne!(untrusting.wait_exit()?, 0, "a certificate from an unknown CA is refused");
    let mut ok = tls_client(&d, "1", &[])?;
    ok.expect_line("=====================================")?;
    ok.poll_list(&[1], &[])?;
    Ok(())
}

/// A TLS-terminating proxy in front of the real broker, with a certificate
/// for 127.0.0.1 / localhost from its own CA; counts the connections it
/// carried.
struct AmqpsProxy {
    port: u16,
    ca: PathBuf,
    connections: Arc<AtomicU64>,
    _dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
}

impl AmqpsProxy {
    fn start() -> anyhow::Result<AmqpsProxy> {
        let dir = tempfile::tempdir()?;
        let (ca_pem, cert_pem, key_pem) = sns_node::tls::make_local()?;
        let ca = dir.path().join("broker-ca.pem");
        std::fs::write(&ca, &ca_pem)?;
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<_, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let port = listener.local_addr()?.port();
        let broker = sns_node::launcher::broker_addr(&sns_e2e::amqp_url());
        let connections = Arc::new(AtomicU64::new(0));
        let counted = connections.clone();
        rt.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, broker, counted) = (acceptor.clone(), broker.clone(), counted.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(&broker).await else { return };
                    counted.fetch_add(1, Ordering::SeqCst);
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
                });
            }
        });
        Ok(AmqpsProxy { port, ca, connections, _dir: dir, _rt: rt })
    }
}

#[test]
fn synchronizers_reach_the_broker_over_amqps() -> anyhow::Result<()> {
    let proxy = AmqpsProxy::start()?;
    let url = format!("amqps://guest:guest@localhost:{}/%2f", proxy.port);
    let d = Deployment::builder().clusters(2).servers(1).broker(&url, Some(&proxy.ca)).start()?;
    // One connection per synchronizer, all through TLS.
    eventually("every synchronizer connected through the TLS proxy", || {
        (proxy.connections.load(Ordering::SeqCst) >= 2).then_some(())
    })?;
    let mut c1 = Client::start(d.coord_port, "1")?;
    let mut c2 = Client::start(d.coord_port, "2")?;
    c1.expect_line("=====================================")?;
    c2.expect_line("=====================================")?;
    // Users cross clusters only through the broker.
    c1.poll_list(&[1, 2], &[])?;
    c2.poll_list(&[1, 2], &[])?;
    Ok(())
}

#[test]
fn a_broker_certificate_from_an_unknown_ca_is_refused() -> anyhow::Result<()> {
    let proxy = AmqpsProxy::start()?;
    let url = format!("amqps://guest:guest@localhost:{}/%2f", proxy.port);
    // No --amqp-ca: the proxy's CA is not among the system's roots.
    let d = Deployment::builder().clusters(2).servers(1).broker(&url, None).start()?;
    eventually("the synchronizer says why it cannot reach the broker", || {
        let log = d.log("sync-1-1");
        (log.contains("broker") && (log.contains("certificate") || log.contains("UnknownIssuer"))).then_some(())
    })?;
    assert_eq!(proxy.connections.load(Ordering::SeqCst), 0, "no AMQP session got through");
    Ok(())
}

/// A node serving TLS also answers plain-text gRPC health checks on its
/// `--health-port` (the kubelet's gRPC probes cannot speak TLS), and only
/// those: its own port still refuses plain text.
#[test]
fn the_health_port_answers_probes_in_plain_text_beside_a_tls_port() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let tls = sns_node::tls::ensure_local(dir.path())?;
    // Reserved as the launcher reserves its ports: no other test's
    // listener or connection can take it before the coordinator binds it.
    let reserved = sns_node::launcher::ports::reserve(1).map_err(anyhow::Error::msg)?;
    let health_port = reserved.ports[0];
    let port_file = dir.path().join("port");
    let coordinator = std::process::Command::new(sns_e2e::bin("sns-node"))
        .args(["coordinator", "-p", "0", "--bind", "127.0.0.1", "--clusters", "1"])
        .arg("--data-dir")
        .arg(dir.path().join("coordinator"))
        .arg("--port-file")
        .arg(&port_file)
        .args(["--health-port", &health_port.to_string()])
        .arg("--tls-cert")
        .arg(tls.tls_cert.as_deref().expect("cert"))
        .arg("--tls-key")
        .arg(tls.tls_key.as_deref().expect("key"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let _coordinator = sns_e2e::KillOnDrop(coordinator);
    (|| {
        let port: u16 = eventually("the coordinator's port file", || {
            std::fs::read_to_string(&port_file).ok().and_then(|t| t.trim().parse().ok())
        })?;
        let rt = rt();
        let serving = eventually("a plain-text health answer", || {
            rt.block_on(sns_e2e::nodes::health("127.0.0.1", &health_port.to_string(), "")).ok()
        })?;
        assert!(serving, "the coordinator reports SERVING on its health port");
        let plain = rt.block_on(sns_e2e::nodes::health("127.0.0.1", &port.to_string(), ""));
        assert!(plain.is_err(), "its own port speaks TLS only: {plain:?}");
        // The health port serves nothing but health.
        let get = rt.block_on(sns_e2e::nodes::get_server(health_port, 1));
        let err = get.expect_err("GetServer on the health port");
        assert!(format!("{err:#}").contains("not implemented"), "{err:#}");
        anyhow::Ok(())
    })()
}
