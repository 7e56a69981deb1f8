//! A TCP relay that can be cut: the local launcher puts one between each
//! server and the coordinator, so `partition server-2-1` cuts that server
//! off from the coordinator alone (its clients and its peer still reach
//! it), the way a network partition does, and `heal server-2-1` ends it.
//!
//! Cut means silent, not closed: bytes stop flowing both ways and the
//! connections stay open (a dropped-packet partition), so neither side
//! learns of it from a reset; new connections are accepted and held
//! silent too. Healing closes the held connections; both sides reconnect.

use crate::error::{Error, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A running relay to `127.0.0.1:<upstream>`.
pub struct Relay {
    pub port: u16,
    cut: watch::Sender<bool>,
}

impl Relay {
    /// Listens on a free loopback port and relays to `upstream` until
    /// `shutdown`.
    pub async fn start(upstream: u16, shutdown: CancellationToken) -> Result<Relay> {
        let listener =
            TcpListener::bind(("127.0.0.1", 0)).await.map_err(|e| Error::Other(format!("relay cannot listen: {e}")))?;
        let port = crate::net::local_port(&listener)?;
        let (cut, _) = watch::channel(false);
        let cuts = cut.clone();
        tokio::spawn(async move {
            loop {
                let (inbound, _) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                tokio::spawn(relay(inbound, upstream, cuts.subscribe()));
            }
        });
        Ok(Relay { port, cut })
    }

    /// Cuts (true) or heals (false) the relay.
    pub fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }

    pub fn is_cut(&self) -> bool {
        *self.cut.borrow()
    }
}

async fn relay(mut inbound: TcpStream, upstream: u16, mut cut: watch::Receiver<bool>) {
    let _ = inbound.set_nodelay(true);
    if *cut.borrow_and_update() {
        // Accepted while cut: hold it silent until healed, then close.
        let _ = cut.wait_for(|c| !*c).await;
        return;
    }
    let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", upstream)).await else { return };
    let _ = outbound.set_nodelay(true);
    let mut cutting = cut.clone();
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => return,
        _ = cutting.wait_for(|c| *c) => {}
    }
    // Silent until healed; both sockets stay open meanwhile.
    let _ = cut.wait_for(|c| !*c).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_cut_relay_goes_silent_and_healing_closes_its_connections() {
        let echo = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let echo_port = echo.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = echo.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let relay = Relay::start(echo_port, CancellationToken::new()).await.unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", relay.port)).await.unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        relay.set_cut(true);
        assert!(relay.is_cut());
        c.write_all(b"lost").await.unwrap();
        let silent = tokio::time::timeout(Duration::from_millis(200), c.read(&mut buf)).await;
        assert!(silent.is_err(), "nothing comes back through a cut relay");
        relay.set_cut(false);
        let closed = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.unwrap();
        assert!(matches!(closed, Ok(0) | Err(_)), "healing closes held connections");
        let mut c = TcpStream::connect(("127.0.0.1", relay.port)).await.unwrap();
        c.write_all(b"back").await.unwrap();
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"back");
    }
}
