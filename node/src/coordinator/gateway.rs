//! The coordinator as a gateway: serves the course's `SNSService` on the
//! coordinator's own port and forwards every call to the current master of
//! the caller's cluster.
//!
//! Why: in Kubernetes the server addresses the coordinator hands out are
//! pod addresses, which a laptop cannot dial. With the gateway on, one
//! `kubectl port-forward svc/<name>-coordinator 9000:9000` is all a client
//! needs (`tsc --gateway`); a failover behind it just breaks the call or
//! stream in flight, and the client's retry reaches the new master.

use super::Coordinator;
use crate::ids::{cluster_of, parse_user};
use crate::net;
use crate::server::sns::{TimelineStream, read_opening};
use sns_proto::csce438::sns_service_client::SnsServiceClient;
use sns_proto::csce438::sns_service_server::{SnsService, SnsServiceServer};
use sns_proto::csce438::{ListReply, Message, Reply, Request as SnsRequest};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

/// Clients of the masters, by (host, port).
type Clients = HashMap<(String, String), SnsServiceClient<Channel>>;

#[derive(Clone)]
pub struct Gateway {
    coord: Coordinator,
    clients: Arc<Mutex<Clients>>,
}

pub fn service(coord: Coordinator) -> SnsServiceServer<Gateway> {
    SnsServiceServer::new(Gateway { coord, clients: Arc::default() })
}

impl Gateway {
    /// A client of the master serving `username`.
    fn route(&self, username: &str) -> Result<SnsServiceClient<Channel>, Status> {
        let user = parse_user(username).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (master, why) = self.coord.with(|t| {
            let cluster = cluster_of(user, t.clusters());
            (t.master(Instant::now(), cluster), t.unavailable(cluster).map(str::to_string))
        });
        let master = master.ok_or_else(|| {
            Status::unavailable(why.unwrap_or_else(|| format!("no live master for user {user} yet; ask again")))
        })?;
        let key = (master.host, master.port);
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let client = SnsServiceClient::new(net::channel(&key.0, &key.1).map_err(Status::from)?);
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// The status word for a caller that is not a user id, as a server gives.
    fn invalid_caller(req: &SnsRequest) -> Option<Response<Reply>> {
        parse_user(&req.username)
            .is_err()
            .then(|| Response::new(Reply { msg: crate::store::state::Outcome::InvalidUsername.as_str().into() }))
    }
}

#[tonic::async_trait]
impl SnsService for Gateway {
    async fn login(&self, req: Request<SnsRequest>) -> Result<Response<Reply>, Status> {
        let req = req.into_inner();
        if let Some(r) = Self::invalid_caller(&req) {
            return Ok(r);
        }
        self.route(&req.username)?.login(req).await
    }

    async fn list(&self, req: Request<SnsRequest>) -> Result<Response<ListReply>, Status> {
        let req = req.into_inner();
        self.route(&req.username)?.list(req).await
    }

    async fn follow(&self, req: Request<SnsRequest>) -> Result<Response<Reply>, Status> {
        let req = req.into_inner();
        if let Some(r) = Self::invalid_caller(&req) {
            return Ok(r);
        }
        self.route(&req.username)?.follow(req).await
    }

    async fn un_follow(&self, req: Request<SnsRequest>) -> Result<Response<Reply>, Status> {
        let req = req.into_inner();
        if let Some(r) = Self::invalid_caller(&req) {
            return Ok(r);
        }
        self.route(&req.username)?.un_follow(req).await
    }

    type TimelineStream = TimelineStream;

    async fn timeline(&self, req: Request<Streaming<Message>>) -> Result<Response<TimelineStream>, Status> {
        let mut inbound = req.into_inner();
        let opening = read_opening(&mut inbound).await?;
        let mut master = self.route(&opening.username)?;
        // Forward the opening, then everything the client sends, until it
        // stops or its stream breaks.
        let rest = tokio_stream::StreamExt::map_while(inbound, Result::ok);
        let upstream = tokio_stream::StreamExt::chain(tokio_stream::once(opening), rest);
        let replies = master.timeline(upstream).await?.into_inner();
        Ok(Response::new(Box::pin(replies)))
    }
}
