//! `portwatch daemon`: the pipeline, the HTTP API and the metrics, until
//! SIGINT or SIGTERM. Stopping detaches every program (the links belong to
//! this process); a crash or SIGKILL does too, as the kernel closes them.

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    api::{self, ApiContext},
    config::{Config, ConfigError},
    event::BootClock,
    metrics::{BuildInfo, Metrics, MetricsError},
    service,
    watch::{WatchError, Watcher},
};

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
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
    /// Serving HTTP failed.
    #[error("serving HTTP: {0}")]
    Serve(#[source] std::io::Error),
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
        metrics: Arc::new(move || metrics.render()),
        clock: BootClock::now(),
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
    let result = watcher.run(stopped(stop_rx)).await;
    while let Some(served) = servers.join_next().await {
        if let Ok(Err(err)) = served {
            tracing::warn!(error = %err, "HTTP server stopped with an error");
        }
    }
    tracing::info!("stopped; every program is detached");
    Ok(result?)
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, DaemonError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Listen { addr, source })
}

async fn serve(
    listener: TcpListener,
    router: axum::Router,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    axum::serve(listener, router)
        .with_graceful_shutdown(stop)
        .await
        .map_err(DaemonError::Serve)
}

/// Resolves once the stop flag is set (or its sender is gone).
async fn stopped(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}
