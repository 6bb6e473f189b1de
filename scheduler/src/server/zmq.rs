//! The request socket: a ZeroMQ ROUTER that feeds the hub and sends what it answers.

use super::hub::{Hub, Peer};
use crate::engine::Output;
use anyhow::{Context, Result};
use bytes::Bytes;
use proto::api::ServerMsg;
use std::future::Future;
use tokio::sync::mpsc::UnboundedReceiver;
use zeromq::{RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// Why the serve loop ended.
pub enum Ended {
    /// The shutdown future completed (a signal).
    Shutdown,
    /// The engine stopped on its own; live requests were failed with this reason.
    EngineFailed(String),
}

/// Binds `listen` and serves until `shutdown` completes or the engine stops.
pub async fn serve(
    listen: &str,
    mut hub: Hub,
    mut outputs: UnboundedReceiver<Output>,
    shutdown: impl Future<Output = ()>,
) -> Result<Ended> {
    if let Some(path) = listen.strip_prefix("ipc://") {
        // The zeromq crate leaves its socket file behind; a stale one makes bind fail with AddrInUse.
        let _ = std::fs::remove_file(path);
    }
    let mut socket = RouterSocket::new();
    socket.bind(listen).await.with_context(|| format!("binding the request socket {listen}"))?;
    tracing::info!("accepting requests on {listen}");
    let (mut send, mut recv) = socket.split();
    let mut replies: Vec<(Peer, ServerMsg)> = Vec::new();
    tokio::pin!(shutdown);
    let ended = loop {
        tokio::select! {
            msg = recv.recv() => {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => { tracing::warn!("request socket: {e}"); continue; }
                };
                let mut frames = msg.into_vec();
                if frames.len() < 2 {
                    continue; // an identity alone: nothing to answer
                }
                let payload = frames.pop().unwrap_or_default();
                hub.on_message(&frames, &payload, &mut replies);
            }
            output = outputs.recv() => match output {
                Some(Output::Events(events)) => hub.on_events(events, &mut replies),
                Some(Output::Failed(why)) => {
                    hub.fail_all(&format!("the engine stopped: {why}"), &mut replies);
                    flush(&mut send, &mut replies).await;
                    break Ended::EngineFailed(why);
                }
                None => {
                    hub.fail_all("the engine stopped", &mut replies);
                    flush(&mut send, &mut replies).await;
                    break Ended::EngineFailed("the engine thread ended".into());
                }
            },
            () = &mut shutdown => break Ended::Shutdown,
        }
        flush(&mut send, &mut replies).await;
    };
    if let Some(path) = listen.strip_prefix("ipc://") {
        let _ = std::fs::remove_file(path);
    }
    Ok(ended)
}

async fn flush(send: &mut zeromq::RouterSendHalf, replies: &mut Vec<(Peer, ServerMsg)>) {
    for (peer, msg) in replies.drain(..) {
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
