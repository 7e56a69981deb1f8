//! A tower layer on every gRPC server of the node: counts each request by
//! RPC and status code once its status is known, which for a streaming or
//! successful call is in the trailers at the end of the response body.

use super::RpcLabels;
use bytes::Bytes;
use http_body::{Body, Frame};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The layer to put on a `tonic::transport::Server`.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountLayer;

impl<S> tower_layer::Layer<S> for CountLayer {
    type Service = Count<S>;
    fn layer(&self, inner: S) -> Count<S> {
        Count { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Count<S> {
    inner: S,
}

/// `Service/Method` of a gRPC path `/package.Service/Method`.
fn rpc_name(path: &str) -> String {
    let path = path.trim_start_matches('/');
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    let service = service.rsplit('.').next().unwrap_or(service);
    format!("{service}/{method}")
}

fn record(rpc: String, code: tonic::Code) {
    // Paths no service knows are one label: a caller must not be able to
    // grow the registry with made-up names.
    let rpc = if code == tonic::Code::Unimplemented { "unknown".to_string() } else { rpc };
    super::get().requests.get_or_create(&RpcLabels { rpc, code: code_name(code) }).inc();
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "Ok",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

fn status_of(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(tonic::Code::from_i32(value))
}

impl<S, B, R> tower_service::Service<http::Request<B>> for Count<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Body<Data = Bytes> + Unpin,
{
    type Response = http::Response<Counted<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let rpc = rpc_name(req.uri().path());
        let future = self.inner.call(req);
        Box::pin(async move {
            let response = future.await?;
            // A call refused before any message (trailers only) has its
            // status in the headers.
            let rpc = match status_of(response.headers()) {
                Some(code) => {
                    record(rpc, code);
                    None
                }
                None => Some(rpc),
            };
            Ok(response.map(|inner| Counted { inner, rpc }))
        })
    }
}

/// A response body that records the call's status from its trailers, or
/// as `Cancelled` if it is dropped before them (the client went away).
pub struct Counted<B> {
    inner: B,
    /// Still to be recorded.
    rpc: Option<String>,
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(trailers) = frame.trailers_ref()
            && let Some(rpc) = self.rpc.take()
        {
            record(rpc, status_of(trailers).unwrap_or(tonic::Code::Ok));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        if let Some(rpc) = self.rpc.take() {
            record(rpc, tonic::Code::Cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rpc_names_drop_the_package() {
        assert_eq!(super::rpc_name("/csce438.SNSService/Login"), "SNSService/Login");
        assert_eq!(super::rpc_name("/grpc.health.v1.Health/Check"), "Health/Check");
        assert_eq!(super::rpc_name("/x"), "x/");
    }
}
