//! A bound on the HTTP API's open connections (`--max-connections`). Each connection costs a task, buffers and a
//! file descriptor even while it sends nothing; past the bound a new connection is answered at once with a 503
//! that says why (`too_many_connections`, `Retry-After: 1`) and closed, rather than left waiting in the
//! kernel's backlog with no word: a client can tell "busy" from "down", and retry.

use super::openai::ApiError;
use axum::serve::Listener;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// `--max-connections`' default: far above what one engine serves at once (its batch is a few hundred), low
/// enough that the process stays under a default `ulimit -n` of 65,536 with room for everything else.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 4096;

/// How long a refused connection is read from (and discarded) after its answer, so that the client's request
/// bytes still unread do not turn the close into a reset that hides the answer.
const REFUSAL_DRAIN: Duration = Duration::from_millis(500);

/// A listener that holds at most `max` connections open.
pub struct Limited<L> {
    inner: L,
    permits: Arc<Semaphore>,
    max: u32,
}

impl<L> Limited<L> {
    pub fn new(inner: L, max: u32) -> Self {
        let max = max.max(1);
        Limited { inner, permits: Arc::new(Semaphore::new(max as usize)), max }
    }
}

/// A connection holding its place: dropped (closed), it frees it.
pub struct Counted<I> {
    io: I,
    _permit: OwnedSemaphorePermit,
}

impl<L> Listener for Limited<L>
where
    L: Listener,
{
    type Io = Counted<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, addr) = self.inner.accept().await;
            match self.permits.clone().try_acquire_owned() {
                Ok(permit) => return (Counted { io, _permit: permit }, addr),
                Err(_) => {
                    tracing::warn!("refusing an HTTP connection: {} are open (--max-connections)", self.max);
                    tokio::spawn(refuse(io, self.max));
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// The answer a connection past the bound gets, whatever it asked.
pub fn refusal(max: u32) -> Vec<u8> {
    let message = format!("the server has {max} connections open, the most it takes (--max-connections); retry later");
    let body = ApiError::new(503, "too_many_connections", message).body().to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn refuse<I: AsyncRead + AsyncWrite + Unpin>(mut io: I, max: u32) {
    if io.write_all(&refusal(max)).await.is_err() || io.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(REFUSAL_DRAIN, async {
        while let Ok(n) = io.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

impl<I: AsyncRead + Unpin> AsyncRead for Counted<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Counted<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn past_the_bound_a_connection_gets_a_503_that_says_why_and_a_freed_place_is_taken_again() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut limited = Limited::new(tcp, 2);
        let held = tokio::spawn(async move {
            let (a, _) = limited.accept().await;
            let (b, _) = limited.accept().await;
            // The third is refused inside accept, which then waits for a fourth: the place `a` frees.
            let (c, _) = {
                let next = limited.accept();
                tokio::pin!(next);
                tokio::select! {
                    got = &mut next => got,
                    () = tokio::time::sleep(Duration::from_millis(300)) => {
                        drop(a);
                        next.await
                    }
                }
            };
            (b, c)
        });
        let client = tokio::task::spawn_blocking(move || {
            let one = std::net::TcpStream::connect(addr).unwrap();
            let two = std::net::TcpStream::connect(addr).unwrap();
            let mut three = std::net::TcpStream::connect(addr).unwrap();
            three.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut answer = String::new();
            three.read_to_string(&mut answer).unwrap();
            std::thread::sleep(Duration::from_millis(400));
            let four = std::net::TcpStream::connect(addr).unwrap();
            (answer, one, two, four)
        });
        let (answer, ..) = client.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("retry-after: 1"), "{answer}");
        let body: serde_json::Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "too_many_connections");
        assert!(body["error"]["message"].as_str().unwrap().contains("2 connections"), "{body}");
        let (b, c) = tokio::time::timeout(Duration::from_secs(5), held).await.unwrap().unwrap();
        drop((b, c));
    }
}
