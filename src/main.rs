//! `training-worker`: parses the command line, sets up logging, hands over to the daemon,
//! the offline checker or the client.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use training_worker::client;
use training_worker::config::{Config, LogFormat, Overrides};
use training_worker::daemon::{self, Exit};
use training_worker::executor::supervisor;

#[derive(Debug, Parser)]
#[command(
    name = "training-worker",
    version,
    about = "Runs ML fine-tuning jobs from a durable on-disk queue",
    after_help = client::EXIT_CODES_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Run the daemon: replay the data dir, serve the HTTP API, run jobs.
    Serve {
        /// Configuration file [default: config/default.toml when it exists]
        #[arg(long, value_name = "FILE")]
        config: Option<std::path::PathBuf>,
        /// Data directory [default: data]
        // A String, not a PathBuf, so that an empty value reaches the configuration and is
        // refused there with exit 78 like the file's and the variable's.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<String>,
        /// Listen address [default: 127.0.0.1:8787]
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Log format: text or json [default: text]
        #[arg(long, value_name = "FORMAT")]
        log_format: Option<String>,
    },
    /// Check a data dir offline: report every problem and exit 1 if there is one.
    #[command(after_help = CHECK_EXIT_CODES_HELP)]
    Check {
        /// Data directory [default: $TRAINING_WORKER_DATA_DIR, else data]
        #[arg(long, value_name = "DIR", env = "TRAINING_WORKER_DATA_DIR")]
        data_dir: Option<std::path::PathBuf>,
    },
    /// Copy every job and the queue order from one store to another, then verify the copy.
    ///
    /// Each end is a data dir or a PostgreSQL URL (postgres://...): files to a database, or
    /// back. Refused while a daemon holds either end, and into a store that holds jobs.
    #[command(after_help = MIGRATE_EXIT_CODES_HELP)]
    Migrate {
        /// The store to copy: a data dir, or a postgres:// URL
        #[arg(long, value_name = "DIR|URL")]
        from: String,
        /// The empty store to copy into: a data dir, or a postgres:// URL
        #[arg(long, value_name = "DIR|URL")]
        to: String,
    },
    #[command(flatten)]
    Client(client::Command),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        /// The shell
        shell: clap_complete::Shell,
    },
    /// The process the daemon runs beside each trainer (see ARCHITECTURE.md); not for
    /// people.
    #[command(hide = true)]
    Supervise {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

fn main() -> ExitCode {
    // The supervisor starts beside every trainer: straight to it, without clap's parsing of
    // the trainer's argv or anything else the daemon sets up.
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|a| a == supervisor::SUBCOMMAND) {
        return supervisor::main(args);
    }
    let cli = Cli::parse();
    match cli.command {
        Commands::Serve {
            config,
            data_dir,
            listen,
            log_format,
        } => serve(Overrides {
            config_file: config,
            data_dir: data_dir.map(std::path::PathBuf::from),
            listen,
            log_format,
        }),
        Commands::Check { data_dir } => check(&data_dir.unwrap_or_else(|| "data".into())),
        Commands::Migrate { from, to } => ExitCode::from(training_worker::migrate::run(&from, &to)),
        Commands::Client(command) => client::run(command),
        Commands::Completions { shell } => completions(shell),
        Commands::Supervise { args } => supervisor::main(args.into_iter()),
    }
}

fn completions(shell: clap_complete::Shell) -> ExitCode {
    use std::io::Write;
    // Generated into memory: clap_complete panics on a failed write, a closed pipe included.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "training-worker", &mut script);
    match std::io::stdout().write_all(&script) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write the completion script: {e}");
            ExitCode::from(1)
        }
    }
}

const CHECK_EXIT_CODES_HELP: &str = "\
Exit codes:
  0   the data dir is clean (notes may still be printed)
  1   problems found, one `problem:` line each; a directory that is not a data dir is one
  2   usage: bad arguments
  74  the data dir cannot be read (missing, not a directory, no permission)
  78  the data dir given is blank";

const MIGRATE_EXIT_CODES_HELP: &str = "\
Exit codes:
  0   copied, and the copy reads back the same
  1   refused: the destination holds jobs, or the copy does not read back the same
  2   usage: bad arguments
  69  a database cannot be reached
  74  an end cannot be read or written
  75  a daemon holds an end (its data dir or its database)
  78  an end is blank, or both are the same";

fn check(data_dir: &std::path::Path) -> ExitCode {
    if data_dir.as_os_str().to_string_lossy().trim().is_empty() {
        eprintln!("error: --data-dir: blank; name a directory (the default is \"data\")");
        return Exit::Config.into();
    }
    match training_worker::check::check(data_dir) {
        Ok(report) => {
            print!("{}", report.render(data_dir));
            if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", data_dir.display());
            Exit::Storage.into()
        }
    }
}

fn serve(overrides: Overrides) -> ExitCode {
    let cwd = match std::env::current_dir() {
        Ok(cwd) => cwd,
        Err(e) => {
            eprintln!("error: cannot read the working directory: {e}");
            return Exit::Config.into();
        }
    };
    let config = match Config::load(&overrides, |key| std::env::var(key).ok(), &cwd) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: bad configuration: {e}");
            return Exit::Config.into();
        }
    };
    init_tracing(config.log_format);
    // Logged only now that tracing is set up: the file refuses unknown keys, and a typo in
    // a variable must not go unnoticed either.
    let names = std::env::vars_os().map(|(name, _)| name.to_string_lossy().into_owned());
    for variable in training_worker::config::unknown_variables(names) {
        tracing::warn!(%variable, "unknown environment variable ignored; see the configuration table in README.md for the names read");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return Exit::Unclean.into();
        }
    };
    let exit = runtime.block_on(async {
        let stop = daemon::termination_signal();
        daemon::run(config, stop).await
    });
    // Anything still running (a hung connection) is abandoned, not waited for.
    runtime.shutdown_background();
    exit.into()
}

fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: in a file, a journal or a pipe they are
    // noise that breaks grep. NO_COLOR (https://no-color.org) turns them off anywhere.
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let ansi = std::io::stderr().is_terminal() && !no_color;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        // A closed stderr (a pipe whose reader went away) must cost log lines, never the
        // daemon: tracing's own report of a failed write would panic the writing task.
        .log_internal_errors(false)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
