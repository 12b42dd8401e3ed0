//! A TCP link that a test can cut and restore: a proxy on a free loopback
//! port in front of a real server, so that faults are injected into real
//! connections without root, namespaces or containers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A cuttable link from a local port to `target`.
pub struct Link {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

struct Shared {
    target: SocketAddr,
    /// While set, new connections are closed at once.
    cut: AtomicBool,
    /// Cancelled to drop every connection of the current generation.
    current: Mutex<CancellationToken>,
}

impl Link {
    /// Starts forwarding a free loopback port to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            cut: AtomicBool::new(false),
            current: Mutex::new(CancellationToken::new()),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Self {
            addr,
            shared,
            accept,
        })
    }

    /// The address to connect to instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every open connection and refuses new ones until
    /// [`Link::restore`]: what a network partition or a dead peer looks like.
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        let mut current = self
            .shared
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        current.cancel();
        *current = CancellationToken::new();
    }

    /// Accepts and forwards connections again.
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while let Ok((inbound, _)) = listener.accept().await {
        if shared.cut.load(Ordering::SeqCst) {
            drop(inbound);
            continue;
        }
        let stop = shared
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let target = shared.target;
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(target).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (mut a, mut b) = (inbound, outbound);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn forwards_until_cut_and_again_after_restore() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let link = Link::start(target).await.unwrap();
        let mut c = TcpStream::connect(link.addr()).await.unwrap();
        c.write_all(b"hi").await.unwrap();
        let mut got = [0u8; 2];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hi");

        link.cut();
        let mut buf = [0u8; 8];
        assert_eq!(
            c.read(&mut buf).await.unwrap_or(0),
            0,
            "open connection dropped"
        );
        let mut refused = TcpStream::connect(link.addr()).await.unwrap();
        assert_eq!(
            refused.read(&mut buf).await.unwrap_or(0),
            0,
            "new one closed"
        );

        link.restore();
        let mut c = TcpStream::connect(link.addr()).await.unwrap();
        c.write_all(b"ok").await.unwrap();
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ok");
    }
}
