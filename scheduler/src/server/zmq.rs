//! The request socket: a ZeroMQ ROUTER. Frames in become hub messages; replies go back to the identity they
//! came from. The serve loop (`serve.rs`) drives both halves.

use anyhow::{Context, Result};
use bytes::Bytes;
use proto::api::ServerMsg;
use zeromq::{RouterRecvHalf, RouterSendHalf, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// Binds `listen` and returns the socket's two halves.
pub async fn bind(listen: &str) -> Result<(RouterSendHalf, RouterRecvHalf)> {
    remove_socket_file(listen);
    let mut socket = RouterSocket::new();
    socket.bind(listen).await.with_context(|| format!("binding the request socket {listen}"))?;
    tracing::info!("accepting requests on {listen}");
    Ok(socket.split())
}

/// The zeromq crate leaves an ipc:// socket file behind, and a stale one makes the next bind fail with
/// AddrInUse: removed before binding and after serving.
pub fn remove_socket_file(listen: &str) {
    if let Some(path) = listen.strip_prefix("ipc://") {
        let _ = std::fs::remove_file(path);
    }
}

/// The next message that has a payload: its routing frames (the peer) and the payload. None when the
/// socket cannot deliver one now (it said why in the log); the caller just waits for the next.
pub async fn recv(recv: &mut RouterRecvHalf) -> Option<(Vec<Bytes>, Bytes)> {
    let msg = match recv.recv().await {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("request socket: {e}");
            return None;
        }
    };
    let mut frames = msg.into_vec();
    if frames.len() < 2 {
        return None; // an identity alone: nothing to answer
    }
    let payload = frames.pop().unwrap_or_default();
    Some((frames, payload))
}

/// Sends each reply behind its peer's routing frames.
pub async fn flush(send: &mut RouterSendHalf, replies: impl IntoIterator<Item = (Vec<Bytes>, ServerMsg)>) {
    for (peer, msg) in replies {
        let mut frames = peer.into_iter();
        let Some(identity) = frames.next() else { continue };
        let mut message = ZmqMessage::from(identity);
        for frame in frames.chain(std::iter::once(Bytes::from(proto::api::encode(&msg)))) {
            message.push_back(frame);
        }
        // A client that went away is not an error of ours: its replies are dropped.
        if let Err(e) = send.send(message).await {
            tracing::debug!("dropping a reply: {e}");
        }
    }
}
