//! `portwatch daemon`: the pipeline, the HTTP API and the metrics, until
//! SIGINT or SIGTERM. Stopping detaches every program (the links belong to
//! this process); a crash or SIGKILL does too, as the kernel closes them.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::{Semaphore, watch},
};

use crate::{
    api::{self, ApiContext},
    config::Config,
    metrics::{BuildInfo, Metrics, MetricsError},
    service,
    watch::{WatchError, Watcher},
};

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// An HTTP address could not be bound.
    #[error("cannot listen on {addr}: {source} (set `listen` in the config or pass --listen)")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The pipeline failed (capture, snapshot).
    #[error(transparent)]
    Watch(#[from] WatchError),
    /// The metrics registry could not be built.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The pipeline's task panicked or was cancelled.
    #[error("the pipeline stopped: {0}")]
    Pipeline(#[source] tokio::task::JoinError),
    /// Installing a signal handler failed.
    #[error("installing the signal handlers: {0}")]
    Signal(#[source] std::io::Error),
}

/// Runs the daemon with `config` until SIGINT/SIGTERM. systemd hears
/// READY=1 once the programs are attached, the snapshot is merged and HTTP
/// is up (see [`service`]).
pub async fn run(config: Config) -> Result<(), DaemonError> {
    // Bind first: a taken port is a configuration error worth failing on
    // before anything is attached.
    let api_listener = bind(config.listen).await?;
    if config.api_is_remote() {
        // Only with allow_unauthenticated_remote: the configuration refuses
        // it otherwise.
        tracing::warn!(
            "the API listens on {}, which is not a loopback address, without authentication (allow_unauthenticated_remote = true): anyone who reaches it sees every process, uid, unit and container on this host",
            config.listen
        );
    }
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut interrupt = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT: stopping"),
            _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
        }
        service::stopping();
        let _ = stop_tx.send(true);
    });

    let watcher = Watcher::start(config.watch()).await?;
    let metrics = Arc::new(Metrics::new(watcher.state(), BuildInfo::current())?);
    let ctx = ApiContext {
        state: watcher.state(),
        events: watcher.event_sender(),
        // A rendering copies every listener's facts (tens of MiB at 100k
        // listeners) on a blocking thread, whose arena would keep them.
        metrics: Arc::new(move || {
            let text = metrics.render();
            crate::watch::release_freed_memory();
            text
        }),
        clock: watcher.clock(),
    };
    let mut servers = tokio::task::JoinSet::new();
    servers.spawn(serve(
        api_listener,
        api::router(ctx.clone()),
        stopped(stop_rx.clone()),
    ));
    if let Some(listener) = metrics_listener {
        servers.spawn(serve(
            listener,
            api::metrics_router(ctx.clone()),
            stopped(stop_rx.clone()),
        ));
    }
    // The routers keep only a weak handle on the event stream, so open
    // `/events` streams end when the pipeline stops; no strong one may stay.
    drop(ctx);
    tracing::info!(
        listen = %config.listen,
        metrics_listen = ?config.metrics_listen,
        "portwatch is ready"
    );
    service::ready(&watcher.state());
    tokio::spawn(service::supervise(
        watcher.state(),
        watcher.heartbeat(),
        stopped(stop_rx.clone()),
    ));
    // On a worker thread rather than this one (which only waits): a timer
    // or a record then wakes the thread that runs the pipeline, not a
    // worker that must wake this thread in turn.
    let result = tokio::spawn(watcher.run(stopped(stop_rx)))
        .await
        .map_err(DaemonError::Pipeline)?;
    // Each server drains its requests in flight, for at most DRAIN_TIMEOUT.
    while servers.join_next().await.is_some() {}
    tracing::info!("stopped; every program is detached");
    Ok(result?)
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, DaemonError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Listen { addr, source })
}

/// How long a client may take to send a request's headers (the first
/// request's, and each next one's on a kept-alive connection) before the
/// connection is closed: slow or idle clients cannot pile up.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once per listener; more wait in the kernel's
/// accept queue, so file descriptors stay bounded whatever clients do.
const MAX_CONNECTIONS: usize = 256;

/// How long shutdown waits for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `router` on `listener` until `stop`: HTTP/1.1 with a header-read
/// timeout and at most [`MAX_CONNECTIONS`] connections, then drains.
async fn serve(
    listener: TcpListener,
    router: axum::Router,
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
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
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
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // A client that hangs up or times out is its own business.
            let _ = connection.await;
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

/// Resolves once the stop flag is set (or its sender is gone).
async fn stopped(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}
