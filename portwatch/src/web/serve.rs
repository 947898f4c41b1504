//! The HTTP listeners' accept loop: HTTP/1.1 with bounds on what a client
//! can hold (connections, header and handshake time), over TLS when the
//! listener's [`Gate`] says so. The TLS settings are read at each accept,
//! so a reload applies to the next connection and never cuts one in flight.

use std::{sync::Arc, time::Duration};

use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_rustls::TlsAcceptor;

use super::Gate;

/// How long a client may take to finish the TLS handshake, and to send a
/// request's headers (the first request's, and each next one's on a
/// kept-alive connection), before the connection is closed: slow or idle clients cannot pile up.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once per listener; more wait in the kernel's
/// accept queue, so file descriptors stay bounded whatever clients do.
const MAX_CONNECTIONS: usize = 256;

/// How long shutdown waits for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `router` on `listener` until `stop`: HTTP/1.1 (over TLS when the
/// gate's settings say so, read at each accept so a reload applies to new
/// connections) with a handshake and header-read timeout and at most
/// [`MAX_CONNECTIONS`] connections, then drains.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    gate: Arc<Gate>,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut stop => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // EMFILE and the like pass; do not spin on them.
                    tracing::warn!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let service = TowerToHyperService::new(router.clone());
        let tls = gate.settings().tls.clone();
        let http = http.clone();
        let watcher = graceful.watcher();
        let listener_name = gate.listener;
        tokio::spawn(async move {
            // A client that hangs up or times out is its own business.
            match tls {
                None => {
                    let _ = watcher
                        .watch(http.serve_connection(TokioIo::new(stream), service))
                        .await;
                }
                Some(config) => {
                    let handshake = TlsAcceptor::from(config).accept(stream);
                    match tokio::time::timeout(HEADER_READ_TIMEOUT, handshake).await {
                        Ok(Ok(stream)) => {
                            let _ = watcher
                                .watch(http.serve_connection(TokioIo::new(stream), service))
                                .await;
                        }
                        // Scanners and wrong clients: worth a debug line, no more.
                        Ok(Err(err)) => {
                            tracing::debug!(listener = listener_name, %peer, error = %err, "TLS handshake failed");
                        }
                        Err(_) => {
                            tracing::debug!(listener = listener_name, %peer, "TLS handshake timed out");
                        }
                    }
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after {DRAIN_TIMEOUT:?}; closing them");
    }
}
