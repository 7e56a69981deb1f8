//! `GET /metrics` over plain HTTP/1 on the node's metrics port, served by
//! the hyper that tonic already builds (no framework for one route).

use crate::error::Result;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::path::Path;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A scraper gets this long to send its request headers, so idle or slow
/// connections cannot pile up (a scrape sends them at once).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `bind:port` (0 = any free port), writes the bound port to
/// `port_file` if given, and serves the metrics there until `shutdown`.
pub async fn start(bind: &str, port: u16, port_file: Option<&Path>, shutdown: CancellationToken) -> Result<()> {
    let listener = crate::net::bind(bind, port, port_file).await?;
    tracing::info!(port = crate::net::local_port(&listener)?, "metrics on GET /metrics");
    tokio::spawn(tracing::Instrument::instrument(serve(listener, shutdown), tracing::info_span!("metrics_http")));
    Ok(())
}

fn respond(method: &Method, path: &str) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match (method, path) {
        (&Method::GET | &Method::HEAD, "/metrics") => (StatusCode::OK, super::CONTENT_TYPE, super::render()),
        (&Method::GET | &Method::HEAD, _) => (StatusCode::NOT_FOUND, "text/plain", "not found: GET /metrics\n".into()),
        _ => (StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n".into()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(ctype));
    response
}

/// Serves the node's metrics on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, shutdown: CancellationToken) {
    serve_with(listener, respond, shutdown).await
}

/// Serves `respond` (method and path to a response) over HTTP/1 on
/// `listener` until `shutdown`, then lets each connection finish the
/// request it is on. Shared with the operator's own endpoint.
pub async fn serve_with<F>(listener: TcpListener, respond: F, shutdown: CancellationToken)
where
    F: Fn(&Method, &str) -> Response<Full<Bytes>> + Clone + Send + Sync + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics port: accept failed");
                    continue;
                }
            },
        };
        let shutdown = shutdown.clone();
        let respond = respond.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                std::future::ready(Ok::<_, Infallible>(respond(req.method(), req.uri().path())))
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    while connections.join_next().await.is_some() {}
}
