//! The request socket: a ZeroMQ ROUTER. Frames in become hub messages; replies go back to the identity they
//! came from. The serve loop (`serve.rs`) drives both halves.

use anyhow::{Context, Result};
use bytes::Bytes;
use futures_core::Stream;
use std::collections::HashSet;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use zeromq::{RouterRecvHalf, RouterSendHalf, RouterSocket, Socket, SocketEvent, SocketRecv, SocketSend, ZmqMessage};

/// The longest one reply may wait for room in its client's send queue. The zeromq crate queues up to 100,000
/// messages per peer and then makes the sender wait: a client that stopped reading would stall the serve loop,
/// and with it every other client. Past this, the client is counted as gone (`flush`).
pub const SEND_TIMEOUT: Duration = Duration::from_millis(50);

/// The socket's halves, and the identities of the peers that disconnected (from the socket's monitor).
pub struct Bound {
    pub send: RouterSendHalf,
    pub recv: RouterRecvHalf,
    pub disconnected: UnboundedReceiver<Bytes>,
}

/// Binds `listen` and returns the socket's two halves and its monitor.
pub async fn bind(listen: &str) -> Result<Bound> {
    remove_socket_file(listen);
    let mut socket = RouterSocket::new();
    let disconnected = forward_disconnects(socket.monitor());
    socket.bind(listen).await.with_context(|| format!("binding the request socket {listen}"))?;
    tracing::info!("accepting requests on {listen}");
    let (send, recv) = socket.split();
    Ok(Bound { send, recv, disconnected })
}

/// The identity of each peer whose connection closed, from the socket's monitor. The crate's monitor channel
/// holds 1,024 events and drops the rest when nobody reads it: a task of its own keeps it read.
fn forward_disconnects(
    mut events: impl Stream<Item = SocketEvent> + Unpin + Send + 'static,
) -> UnboundedReceiver<Bytes> {
    let (tx, rx) = unbounded_channel();
    tokio::spawn(async move {
        while let Some(event) = std::future::poll_fn(|cx| Pin::new(&mut events).poll_next(cx)).await {
            if let SocketEvent::Disconnected(peer) = event
                && tx.send(Bytes::copy_from_slice(&peer)).is_err()
            {
                return;
            }
        }
    });
    rx
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

/// Sends each payload behind its peer's routing frames, skipping peers in `gone`. A peer whose send fails (it
/// disconnected) or waits past [`SEND_TIMEOUT`] (it stopped reading) is added to `gone` and returned, for the
/// caller to abort its requests; the rest of its replies are dropped, here and in later flushes, until the caller
/// takes it out of `gone`.
pub async fn flush(
    send: &mut RouterSendHalf,
    replies: impl IntoIterator<Item = (Vec<Bytes>, Bytes)>,
    gone: &mut HashSet<Bytes>,
) -> Vec<Bytes> {
    let mut newly = Vec::new();
    for (peer, payload) in replies {
        let mut frames = peer.into_iter();
        let Some(identity) = frames.next() else { continue };
        if gone.contains(&identity) {
            continue;
        }
        let mut message = ZmqMessage::from(identity.clone());
        for frame in frames.chain(std::iter::once(payload)) {
            message.push_back(frame);
        }
        let failed = match tokio::time::timeout(SEND_TIMEOUT, send.send(message)).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("its send queue stayed full for {SEND_TIMEOUT:?}: it does not read")),
        };
        if let Some(why) = failed {
            tracing::info!("dropping a ZeroMQ client's replies: {why}");
            gone.insert(identity.clone());
            newly.push(identity);
        }
    }
    newly
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use zeromq::DealerSocket;

    fn endpoint(name: &str) -> String {
        format!("ipc://{}/minisgl-zmq-test-{}-{name}.sock", std::env::temp_dir().display(), std::process::id())
    }

    /// A DEALER that says hello (so the ROUTER knows it) and the routing frames the ROUTER gives it.
    async fn client(bound: &mut Bound, listen: &str) -> (DealerSocket, Vec<Bytes>) {
        let mut dealer = DealerSocket::new();
        dealer.connect(listen).await.unwrap();
        dealer.send(ZmqMessage::from("hello")).await.unwrap();
        let (frames, payload) = recv(&mut bound.recv).await.unwrap();
        assert_eq!(&payload[..], b"hello");
        (dealer, frames)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_never_reads_is_counted_gone_instead_of_stalling_the_sender() {
        let listen = endpoint("stall");
        let mut bound = bind(&listen).await.unwrap();
        let (_dealer, frames) = client(&mut bound, &listen).await;
        let payload = Bytes::from(vec![7u8; 200]);
        let (mut gone, mut newly, mut sent, started) = (HashSet::new(), Vec::new(), 0usize, Instant::now());
        // The crate queues 100,000 messages per peer; the kernel's buffers take some more.
        while newly.is_empty() && sent < 2_000_000 {
            let batch = std::iter::repeat_n((frames.clone(), payload.clone()), 10_000);
            newly = flush(&mut bound.send, batch, &mut gone).await;
            sent += 10_000;
        }
        assert_eq!(newly, [frames[0].clone()], "after {sent} messages");
        assert!(sent > 100_000, "gone after only {sent} messages: the queue was not full");
        // Its later replies are dropped without another wait.
        let waited = Instant::now();
        let again = flush(&mut bound.send, std::iter::repeat_n((frames.clone(), payload), 1000), &mut gone).await;
        assert!(again.is_empty() && waited.elapsed() < SEND_TIMEOUT, "{:?}", waited.elapsed());
        assert!(started.elapsed().as_secs() < 60);
        remove_socket_file(&listen);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_client_is_reported_by_identity_and_a_send_to_it_fails() {
        let listen = endpoint("close");
        let mut bound = bind(&listen).await.unwrap();
        let (dealer, frames) = client(&mut bound, &listen).await;
        let (other, _) = client(&mut bound, &listen).await;
        drop(dealer);
        // The ROUTER notices the close only while something polls its receiving half, as the serve loop does.
        let identity = tokio::select! {
            id = bound.disconnected.recv() => id.unwrap(),
            _ = recv(&mut bound.recv) => panic!("nothing was sent"),
            () = tokio::time::sleep(Duration::from_secs(5)) => panic!("no disconnect event"),
        };
        assert_eq!(identity, frames[0]);
        let mut gone = HashSet::new();
        let newly = flush(&mut bound.send, [(frames.clone(), Bytes::from_static(b"late"))], &mut gone).await;
        assert_eq!(newly, [frames[0].clone()]);
        drop(other);
        remove_socket_file(&listen);
    }
}
