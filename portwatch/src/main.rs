use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use portwatch::{
    app,
    cli::{Cli, Command, LogFormat},
    client,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Trace(args) => run_async(app::trace(args)),
        Command::Daemon(args) => {
            portwatch::watch::limit_malloc_arenas();
            run_async(app::daemon(args))
        }
        Command::Ports(args) => client::ports(&args).map_err(Into::into),
        Command::Explain(args) => client::explain(&args).map_err(Into::into),
        Command::Failures(args) => client::failures(&args).map_err(Into::into),
        Command::Ephemeral(args) => client::ephemeral(&args).map_err(Into::into),
        Command::Watch(args) => client::watch(&args).map_err(Into::into),
        Command::HashPassword(args) => app::hash_password(&args).map_err(Into::into),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "portwatch",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map_err(Into::into),
        // 0: the bind would succeed, 1: it would not, 2: no answer.
        Command::Check(args) => {
            return match client::check(&args) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(err) => {
                    eprintln!("portwatch: {}", error_chain(&err));
                    ExitCode::from(2)
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`| head`): not an error for a CLI.
        Err(err)
            if err
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("portwatch: {}", error_chain(err.as_ref()));
            // The daemon's and trace's errors say whether a restart helps.
            let exit = err
                .downcast_ref::<app::AppError>()
                .map_or(app::Exit::Failure, app::AppError::exit);
            ExitCode::from(exit as u8)
        }
    }
}

/// How long an idle blocking thread waits for work before it ends.
const BLOCKING_THREAD_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(120);

fn run_async<E: std::error::Error + 'static>(
    work: impl Future<Output = Result<(), E>>,
) -> Result<(), Box<dyn std::error::Error>> {
    // The periodic listings (ephemeral ports every 15 s, reconciliation
    // every 30 s) run on blocking threads: kept alive past the longest
    // default interval, one thread serves them all instead of a new thread
    // (and its exit) per listing, which would wake an idle daemon for
    // nothing.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_keep_alive(BLOCKING_THREAD_KEEP_ALIVE)
        .build()?;
    runtime
        .block_on(work)
        .map_err(|err| Box::new(err) as Box<dyn std::error::Error>)
}

/// Logs go to stderr, filtered by RUST_LOG (default `info`).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal, so the journal and log files stay plain.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // Under systemd the journal stamps every line already.
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    match (format, under_journal) {
        (LogFormat::Text, false) => builder.init(),
        (LogFormat::Text, true) => builder.without_time().init(),
        (LogFormat::Json, _) => builder.json().init(),
    }
}

/// `err: cause: cause`, on one line.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}
