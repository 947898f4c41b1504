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
    metrics::{BuildInfo, Metrics, MetricsError},
    service,
    watch::{WatchError, Watcher},
    web::{self, Gate, WebMetrics, serve::serve},
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
    /// A web configuration could not be read at start (it changed since
    /// the configuration was checked).
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Runs the daemon with `config` until SIGINT/SIGTERM. systemd hears
/// READY=1 once the programs are attached, the snapshot is merged and HTTP
/// is up (see [`service`]).
pub async fn run(config: Config) -> Result<(), DaemonError> {
    // Bind first: a taken port is a configuration error worth failing on
    // before anything is attached.
    // SIGHUP reloads the web configuration; its default action would end
    // the daemon, so the handler goes in before anything else.
    let hangup = signal(SignalKind::hangup()).map_err(DaemonError::Signal)?;
    let api_listener = bind(config.listen).await?;
    let web_metrics = WebMetrics::new().map_err(MetricsError::Register)?;
    let api_web = config.api_web()?;
    // Checked again on what is read now: the file may have changed since
    // the configuration was checked.
    config.check_api_web(&api_web)?;
    if config.api_is_remote() && !api_web.authenticates() {
        // Only with allow_unauthenticated_remote: the configuration refuses
        // it otherwise.
        tracing::warn!(
            "the API listens on {}, which is not a loopback address, without authentication (allow_unauthenticated_remote = true): anyone who reaches it sees every process, uid, unit and container on this host",
            config.listen
        );
    }
    let api_gate = Gate::new("api", api_web, config.api_must_authenticate(), &web_metrics);
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some((
            bind(addr).await?,
            Gate::new("metrics", config.metrics_web()?, false, &web_metrics),
        )),
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
    web_metrics
        .register(metrics.registry())
        .map_err(MetricsError::Register)?;
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
    let mut gates = vec![api_gate.clone()];
    let mut served = vec![format!(
        "{} over {}",
        config.listen,
        api_gate.settings().describe()
    )];
    servers.spawn(serve(
        api_listener,
        api_gate.guard(api::router(ctx.clone())),
        api_gate,
        stopped(stop_rx.clone()),
    ));
    if let Some((listener, gate)) = metrics_listener {
        gates.push(gate.clone());
        if let Some(addr) = config.metrics_listen {
            served.push(format!(
                "metrics on {addr} over {}",
                gate.settings().describe()
            ));
        }
        servers.spawn(serve(
            listener,
            gate.guard(api::metrics_router(ctx.clone())),
            gate,
            stopped(stop_rx.clone()),
        ));
    }
    tokio::spawn(web::reload::run(gates, hangup, stopped(stop_rx.clone())));
    // The routers keep only a weak handle on the event stream, so open
    // `/events` streams end when the pipeline stops; no strong one may stay.
    drop(ctx);
    tracing::info!(serving = served.join("; "), "portwatch is ready");
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

/// Resolves once the stop flag is set (or its sender is gone).
async fn stopped(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}
