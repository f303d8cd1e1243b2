//! Endpoints of the logging channel, with the peer's identity checked on both sides: the
//! connector checks the listener's certificate names the configured peer (TLS server name),
//! the listener checks the connector's certificate names one of the pair's other members.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ftvm_tls::{Identity, TransportOptions, ALPN_LOG};
use thiserror::Error;

/// Why a channel connection could not be made.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// TLS configuration or certificates.
    #[error(transparent)]
    Tls(#[from] ftvm_tls::TlsError),
    /// Socket errors.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The connection could not be started.
    #[error("connecting: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed.
    #[error("connecting: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The peer's certificate names someone who is not a member of this pair.
    #[error("refused a connection from {0:?}: not a member of this pair")]
    NotAPeer(String),
    /// Timed out.
    #[error("timed out")]
    Timeout,
}

/// Transport options of the channel: no QUIC keep-alives (the channel has heartbeats), an
/// idle timeout well above `failure_timeout` (failure detection is ours, not QUIC's).
pub fn transport(failure_timeout: Duration) -> TransportOptions {
    TransportOptions {
        idle_timeout: (failure_timeout * 20).max(Duration::from_secs(3)),
        keep_alive: None,
        max_concurrent_streams: 4,
    }
}

/// The listening endpoint (`listen` in node.toml), also used to connect out.
pub fn endpoint(
    listen: SocketAddr,
    id: &Identity,
    failure_timeout: Duration,
) -> Result<quinn::Endpoint, ConnectError> {
    let t = transport(failure_timeout);
    let mut ep = ftvm_tls::server_endpoint(listen, id, ALPN_LOG, &t)?;
    ep.set_default_client_config(ftvm_tls::client_config(id, ALPN_LOG, &t)?);
    Ok(ep)
}

/// A client-only endpoint (for probing a peer without listening).
pub fn client_endpoint(
    peer: SocketAddr,
    id: &Identity,
    failure_timeout: Duration,
) -> Result<quinn::Endpoint, ConnectError> {
    let bind: SocketAddr = if peer.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    Ok(ftvm_tls::client_endpoint(
        bind,
        id,
        ALPN_LOG,
        &transport(failure_timeout),
    )?)
}

/// An established channel: the connection and its one stream.
pub struct Link {
    /// The QUIC connection.
    pub conn: quinn::Connection,
    /// Our sending half.
    pub send: quinn::SendStream,
    /// Our receiving half.
    pub recv: quinn::RecvStream,
    /// The peer's node name (from its verified certificate).
    pub peer: String,
}

/// Connects to `peer_name` at `addr` and opens the stream.
pub async fn connect(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    peer_name: &str,
    timeout: Duration,
) -> Result<Link, ConnectError> {
    let fut = async {
        let conn = ep.connect(addr, peer_name)?.await?;
        let (send, recv) = conn.open_bi().await?;
        Ok(Link {
            conn,
            send,
            recv,
            peer: peer_name.to_string(),
        })
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ConnectError::Timeout)?
}

/// Completes an incoming connection: checks the peer is one of `members`, accepts its
/// stream.
pub async fn accept(
    incoming: quinn::Incoming,
    members: &[String],
    timeout: Duration,
) -> Result<Link, ConnectError> {
    let fut = async {
        let conn = incoming.await?;
        let peer = ftvm_tls::peer_identity(&conn).unwrap_or_default();
        if !members.contains(&peer) {
            conn.close(quinn::VarInt::from_u32(1), b"not a member of this pair");
            return Err(ConnectError::NotAPeer(peer));
        }
        let (send, recv) = conn.accept_bi().await?;
        Ok(Link {
            conn,
            send,
            recv,
            peer,
        })
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ConnectError::Timeout)?
}

/// Sends one message.
pub async fn send_msg(send: &mut quinn::SendStream, m: &super::msg::Msg) -> std::io::Result<()> {
    let mut b = Vec::new();
    super::msg::encode(m, &mut b);
    send.write_all(&b)
        .await
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::BrokenPipe, e))
}

/// Receives one message (the handshake's), within `timeout`.
pub async fn recv_msg(
    recv: &mut quinn::RecvStream,
    reader: &mut super::msg::MsgReader,
    timeout: Duration,
) -> Result<super::msg::Msg, String> {
    let fut = async {
        loop {
            if let Some(m) = reader.next_msg().map_err(|e| e.to_string())? {
                return Ok(m);
            }
            match recv.read_chunk(64 << 10, true).await {
                Ok(Some(c)) => reader.push(&c.bytes),
                Ok(None) => return Err("the peer closed the stream".to_string()),
                Err(e) => return Err(format!("reading: {e}")),
            }
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| "timed out waiting for the peer".to_string())?
}
