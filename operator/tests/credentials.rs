//! The operator's calls to a coordinator that checks the node token and
//! sits behind TLS with a certificate from the operator's own CA: the
//! routing-table client gets in only with the deployment's secret and the
//! deployment's CA, and the certificate holds for the names nodes use.

use sns_node::auth::{Attach, Secret};
use sns_operator::coordinator::{Credentials, GrpcRoutingTable, RoutingTable};
use sns_operator::render::Names;
use sns_operator::render::tls::{self, Pem};
use sns_proto::internal::TableRequest;
use sns_proto::internal::coord_admin_client::CoordAdminClient;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "5f0c8a7e2b9d4c61a3e8f0b7d2c5a9e41f6b3d8c0a7e2b9d4c61a3e8f0b7d2c5";

fn names() -> Names {
    Names { instance: "demo".into(), namespace: "prod".into() }
}

/// A coordinator on 127.0.0.1:0 that requires `secret`'s token.
async fn coordinator(secret: &str, shutdown: &CancellationToken) -> SocketAddr {
    let cfg = sns_node::coordinator::CoordinatorConfig {
        clusters: 2,
        gateway: false,
        heartbeat: Duration::from_secs(1),
        missed: 2,
        lease: Duration::from_millis(500),
        data_dir: None,
        secret: Some(Secret::from_text(secret).unwrap()),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(sns_node::coordinator::run(cfg, listener, shutdown.clone()));
    addr
}

/// A TLS front on 127.0.0.1:0 serving `cert` and passing the bytes on to
/// `upstream`, as the node would once it serves TLS itself.
async fn tls_front(upstream: SocketAddr, cert: &Pem, shutdown: &CancellationToken) -> SocketAddr {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert.cert.as_bytes()).collect::<Result<_, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_slice(cert.key.as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = listener.accept() => r.unwrap(),
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that refuses our certificate ends here.
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut up = TcpStream::connect(upstream).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    addr
}

fn creds(secret: &str, ca: Option<&Pem>) -> Credentials {
    Credentials { secret: Some(Secret::from_text(secret).unwrap()), ca: ca.map(|c| c.cert.clone()) }
}

#[tokio::test]
async fn admin_calls_carry_the_deployments_token() {
    let shutdown = CancellationToken::new();
    let endpoint = format!("http://{}", coordinator(SECRET, &shutdown).await);
    let table = GrpcRoutingTable::new(Duration::from_secs(2));

    let refused = table.table(&endpoint).await.unwrap_err().to_string();
    assert!(refused.contains("token"), "no token: {refused}");

    table.authenticate(&endpoint, creds(&SECRET.replace('5', "6"), None));
    let denied = table.table(&endpoint).await.unwrap_err().to_string();
    assert!(denied.contains("another deployment"), "another deployment's token: {denied}");

    // New credentials take effect on the next call (the channel is remade).
    table.authenticate(&endpoint, creds(SECRET, None));
    let nodes = table.table(&endpoint).await.unwrap();
    assert!(nodes.iter().all(|n| !n.alive), "nobody registered yet: {nodes:?}");
    shutdown.cancel();
}

#[tokio::test]
async fn admin_calls_go_over_tls_to_the_deployments_ca_only() {
    let shutdown = CancellationToken::new();
    let coord = coordinator(SECRET, &shutdown).await;
    let names = names();
    let tls_names = tls::tls_names(&names, 3);
    let ca = tls::new_ca(&names).unwrap();
    let node = tls::issue_node_cert(&names, &tls_names, &ca).unwrap();
    let front = tls_front(coord, &node, &shutdown).await;
    // The endpoint is named as the reconciler names it (http://); the CA
    // turns it into https, verified against 127.0.0.1 in the certificate.
    let endpoint = format!("http://{front}");
    let table = GrpcRoutingTable::new(Duration::from_secs(2));

    table.authenticate(&endpoint, creds(SECRET, None));
    assert!(table.table(&endpoint).await.is_err(), "plaintext to a TLS port fails");

    let stranger = tls::new_ca(&names).unwrap();
    table.authenticate(&endpoint, creds(SECRET, Some(&stranger)));
    assert!(table.table(&endpoint).await.is_err(), "a certificate from another CA is refused");

    table.authenticate(&endpoint, creds(SECRET, Some(&ca)));
    table.table(&endpoint).await.expect("the deployment's CA and token get in");
    shutdown.cancel();
}

#[tokio::test]
async fn switchovers_carry_the_token_over_the_same_tls_channel() {
    // The rollout, a scale-down and the sns.io/switchover annotation call
    // CoordAdmin.Switchover through the channel `authenticate` set up: a
    // call without the token is refused for it; with the token and the CA
    // it reaches the coordinator, which refuses only on the merits
    // (cluster 1 has no server at all).
    let shutdown = CancellationToken::new();
    let coord = coordinator(SECRET, &shutdown).await;
    let names = names();
    let ca = tls::new_ca(&names).unwrap();
    let node = tls::issue_node_cert(&names, &tls::tls_names(&names, 3), &ca).unwrap();
    let front = tls_front(coord, &node, &shutdown).await;
    let endpoint = format!("http://{front}");
    // A short table timeout: it must not cut a switchover short either.
    let table = GrpcRoutingTable::new(Duration::from_secs(2));

    table.authenticate(&endpoint, Credentials { secret: None, ca: Some(ca.cert.clone()) });
    let refused = table.switchover(&endpoint, 1, None).await.unwrap_err().to_string();
    assert!(refused.contains("token"), "no token: {refused}");

    table.authenticate(&endpoint, creds(&SECRET.replace('5', "6"), Some(&ca)));
    let denied = table.switchover(&endpoint, 1, None).await.unwrap_err().to_string();
    assert!(denied.contains("another deployment"), "another deployment's token: {denied}");

    table.authenticate(&endpoint, creds(SECRET, Some(&ca)));
    let err = table.switchover(&endpoint, 1, None).await.unwrap_err();
    assert_eq!(err.reason(), "SwitchoverRefused", "{err}");
    assert!(!err.to_string().contains("token"), "the token got in: {err}");
    // The table read shares the channel and its credentials.
    table.table(&endpoint).await.expect("the same channel reads the table");
    assert_eq!(table.channels(), 1);
    shutdown.cancel();
}

/// A CoordAdmin call over TLS to `front`, checking the certificate as
/// `domain`.
async fn call_as(front: SocketAddr, ca: &Pem, domain: &str) -> Result<(), String> {
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&ca.cert))
        .domain_name(domain);
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{front}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let attach = Attach::new(Some(Secret::from_text(SECRET).unwrap()));
    let mut client = CoordAdminClient::with_interceptor(channel, attach);
    client.table(TableRequest {}).await.map(|_| ()).map_err(|s| s.to_string())
}

#[tokio::test]
async fn the_node_certificate_holds_for_every_node_name_and_no_other() {
    let shutdown = CancellationToken::new();
    let coord = coordinator(SECRET, &shutdown).await;
    let names = names();
    let tls_names = tls::tls_names(&names, 3);
    let ca = tls::new_ca(&names).unwrap();
    // As the operator reissues it later: from the CA's PEM in its Secret.
    let stored = Pem { cert: ca.cert.clone(), key: ca.key.clone() };
    for node in [
        tls::issue_node_cert(&names, &tls_names, &ca).unwrap(),
        tls::issue_node_cert(&names, &tls_names, &stored).unwrap(),
    ] {
        let front = tls_front(coord, &node, &shutdown).await;
        for good in [
            "demo-coordinator",
            "demo-coordinator.prod.svc",
            "demo-coordinator.prod.svc.cluster.local",
            "demo-server-3-2-0.demo-nodes.prod.svc",
            "demo-master-2.prod.svc",
            "localhost",
        ] {
            call_as(front, &ca, good).await.unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in ["demo-coordinator.other.svc", "x.y.demo-nodes.prod.svc", "evil.example"] {
            assert!(call_as(front, &ca, bad).await.is_err(), "{bad} must not verify");
        }
    }
    shutdown.cancel();
}
