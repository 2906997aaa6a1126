//! The `fanout` binary: parses the command line, loads the configuration,
//! builds the AWS clients and hands them to the library. No logic of its own.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use base64::Engine as _;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use fanout::config::{Config, ConfigError};
use fanout::ecs::{self, TaskProtection};
use fanout::metrics::{self, MetricsServer};
use fanout_aws::{
    ClockCheck, DynamoLeaseTable, DynamoRunTable, DynamoStore, QueueSettings, SelectedSender,
    SnsReports, SqsQueue, SqsReports, clients,
};
use fanout_core::budget::SendBudget;
use fanout_core::connection::expiry::{self, ExpiryRule};
use fanout_core::engine::Engine;
use fanout_core::fleet::Coordinator;
use fanout_core::job::{self, Capabilities, JobSpec};
use fanout_core::queue::{self, JobQueue, SendOptions};
use fanout_core::reports::{ReportSink, Reporter};
use fanout_core::runs::{Ledger, Windows};
use fanout_core::telemetry::Metrics;
use fanout_core::worker::{self, Stopped};

#[derive(Parser)]
#[command(
    version,
    about = "Broadcasts SQS jobs to every live WebSocket client of an API Gateway WebSocket API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the worker: receive jobs, broadcast, remove gone connections.
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Exit 0 once the queue is empty and no job is running.
        #[arg(long)]
        exit_when_idle: bool,
    },
    /// Builds a valid job and sends it to the jobs queue; prints its message id.
    Enqueue(Box<EnqueueArgs>),
    /// Loads and validates the configuration and prints the effective values.
    CheckConfig {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Moves dead-lettered jobs back to the jobs queue (after fixing what
    /// failed them); prints how many moved.
    Redrive {
        #[command(flatten)]
        config: ConfigArg,
        /// Move at most this many.
        #[arg(long, default_value_t = u64::MAX, hide_default_value = true)]
        max: u64,
    },
    /// Exits 0 if the worker on this host answers healthy (container health
    /// check).
    Health(metrics::HealthArgs),
}

#[derive(Args)]
struct ConfigArg {
    /// A TOML file overlaying the built-in defaults (config/default.toml).
    #[arg(long = "config", id = "config", value_name = "FILE")]
    file: Option<PathBuf>,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("payload").required(true)))]
struct EnqueueArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The message, sent as this text.
    #[arg(long, group = "payload")]
    data: Option<String>,
    /// The message, a JSON value sent as its compact JSON text.
    #[arg(long, group = "payload", value_name = "JSON")]
    json: Option<String>,
    /// The message, read from a file (text if UTF-8, else binary).
    #[arg(long, group = "payload", value_name = "PATH")]
    file: Option<PathBuf>,
    /// The message, read from standard input (text if UTF-8, else binary).
    #[arg(id = "stdin", value_name = "-", group = "payload", value_parser = clap::builder::PossibleValuesParser::new(["-"]))]
    stdin: Option<String>,
    /// Only connections in this channel.
    #[arg(long)]
    channel: Option<String>,
    /// Only connections in any of these channels, each once (comma
    /// separated or repeated).
    #[arg(long, value_name = "CHANNEL", value_delimiter = ',')]
    channels: Vec<String>,
    /// One named audience of FANOUT_AUDIENCE_INDEXES and its key, e.g.
    /// `user=u-42`.
    #[arg(long, value_name = "NAME=VALUE")]
    to: Option<String>,
    /// Only these connections (repeatable).
    #[arg(long = "connection", value_name = "ID")]
    connections: Vec<String>,
    /// Skip these connections (repeatable).
    #[arg(long, value_name = "ID")]
    exclude: Vec<String>,
    /// The broadcast's idempotency key: unique per broadcast. Under run
    /// records (FANOUT_CHECKPOINT_TABLE), a job whose id was broadcast within
    /// FANOUT_DEDUP_WINDOW (24 h) is dropped (same body) or dead-lettered
    /// (another body); a retry of the same broadcast keeps its id. Logs and
    /// reports name the broadcast by it. Default: the SQS message id.
    #[arg(long)]
    id: Option<String>,
    /// Send even if the job breaks a limit (to test dead-lettering).
    #[arg(long)]
    unchecked: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("fanout: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            // Bad configuration is the operator's to fix: exit 2, one line.
            if let Some(config_error) = e.downcast_ref::<ConfigError>() {
                eprintln!("fanout: {config_error}");
                return ExitCode::from(2);
            }
            eprintln!("fanout: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run {
            config,
            exit_when_idle,
        } => run(config, exit_when_idle).await,
        Command::Enqueue(args) => enqueue(*args).await,
        Command::CheckConfig { config } => check_config(config),
        Command::Redrive { config, max } => redrive(config, max).await,
        Command::Health(args) => {
            metrics::health(&args).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Compares the clocks once before the first broadcast, then hourly in the
/// background, for the age rule: a worker whose clock is off must not judge
/// rows by age.
async fn watch_clock(check: ClockCheck, rule: Arc<ExpiryRule>, stop: CancellationToken) {
    if check.run(&rule).await.is_none() {
        tracing::warn!(
            "the clock could not be compared at startup; rows are judged by age as configured"
        );
    }
    tracing::info!(
        on = rule.is_on(),
        margin = %humantime::format_duration(rule.margin()),
        "rows older than API Gateway's two hours plus the margin are removed without a post"
    );
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(expiry::CLOCK_CHECK_INTERVAL) => {
                    check.run(&rule).await;
                }
            }
        }
    });
}

fn check_config(arg: ConfigArg) -> anyhow::Result<ExitCode> {
    let config = Config::load(arg.file.as_deref())?;
    config.worker_targets()?;
    print!("{}", config.to_redacted_toml());
    Ok(ExitCode::SUCCESS)
}

async fn run(arg: ConfigArg, exit_when_idle: bool) -> anyhow::Result<ExitCode> {
    let config = Config::load(arg.file.as_deref())?;
    let targets = config.worker_targets()?;
    fanout::logging::init();
    let metrics = Arc::new(Metrics::default());

    let sdk = clients::load_sdk_config().await;
    let queue = SqsQueue::connect(&sdk, config.queue_settings());
    let shutdown = CancellationToken::new();
    let dynamodb = clients::dynamodb_client(&sdk);
    let store = DynamoStore::connect(dynamodb.clone(), config.table_settings(&targets.table))
        .await
        .with_context(|| format!("cannot use the connections table {}", targets.table))?;
    if let Some(rule) = store.age_rule() {
        watch_clock(
            ClockCheck::new(&sdk, &targets.table),
            rule,
            shutdown.clone(),
        )
        .await;
    }
    let gateway = SelectedSender::build(&sdk, &config.send_settings(&targets))?;

    let engine_settings = config.engine_settings();
    let budget = Arc::new(SendBudget::new(
        config.rate_settings(),
        engine_settings.max_in_flight,
    ));
    for warning in config.warnings() {
        tracing::warn!(%warning, "check the configuration");
    }
    // Before the worker starts: a task in a fleet sends nothing until the
    // others have read its lease.
    let fleet = join_fleet(&config, &sdk, &budget, &metrics).await?;
    let ledger = open_ledger(&config, &sdk, &metrics).await?;
    let engine = Engine::new(
        Arc::new(store),
        Arc::new(gateway),
        budget,
        engine_settings,
        metrics.clone(),
    )
    .with_endpoint(format!(
        "FANOUT_GATEWAY_ENDPOINT ({})",
        targets.gateway_endpoint
    ));
    let settings = config.worker_settings(exit_when_idle);
    let reports = reporter(&config, &sdk);

    tokio::spawn(fanout_core::worker::cancel_on_signal(shutdown.clone()));
    // Bound before the worker starts: a taken port is a configuration error.
    let server = MetricsServer::bind(config.metrics_settings()).await?;
    let metrics_task =
        tokio::spawn(server.run(metrics.clone(), shutdown.clone().cancelled_owned()));
    if let Some(protection) = TaskProtection::from_env(ecs::DEFAULT_EXPIRES_IN_MINUTES) {
        tokio::spawn(Arc::new(protection).watch(
            metrics.clone(),
            Duration::from_secs(1),
            shutdown.clone().cancelled_owned(),
        ));
    }
    tracing::info!(queue = %config.queue_url, table = %targets.table, endpoint = %targets.gateway_endpoint, "fanout worker started");
    let (leave_fleet, left) = tokio::sync::oneshot::channel::<()>();
    let fleet = fleet.map(|coordinator| {
        tokio::spawn(coordinator.run(async {
            let _ = left.await;
        }))
    });
    let stopped = worker::run_durable(
        Arc::new(queue),
        Arc::new(engine),
        settings,
        metrics,
        reports,
        shutdown.clone(),
        ledger,
    )
    .await;
    // The lease goes once nothing is sent any more, so the others can take
    // this task's share at once rather than when it expires.
    drop(leave_fleet);
    if let Some(fleet) = fleet
        && let Err(e) = fleet.await
    {
        tracing::warn!(error = %e, "the fleet lease task failed; the lease expires by itself");
    }
    // Stops the metrics server, which prints a last EMF line.
    shutdown.cancel();
    if let Ok(Err(e)) = metrics_task.await {
        tracing::warn!(error = %e, "the metrics server failed");
    }
    match stopped {
        Stopped::Shutdown | Stopped::Idle => {
            tracing::info!(reason = ?stopped, "fanout worker stopped");
            Ok(ExitCode::SUCCESS)
        }
        Stopped::Failed(reason) => anyhow::bail!("the worker stopped: {reason}"),
    }
}

/// The report destinations the configuration names (none, one or both).
fn reporter(config: &Config, sdk: &fanout_aws::SdkConfig) -> Reporter {
    let mut sinks: Vec<Arc<dyn ReportSink>> = Vec::new();
    if let Some(url) = &config.report_queue_url {
        sinks.push(Arc::new(SqsReports::connect(sdk, url)));
    }
    if let Some(arn) = &config.report_topic_arn {
        sinks.push(Arc::new(SnsReports::connect(sdk, arn)));
    }
    Reporter::new(sinks)
}

/// The fleet's coordinator, if the configuration names a fleet. A missing
/// fleet table stops the worker; an unreachable one does not: the task
/// starts at its fallback rate and joins when the table answers.
/// The checkpoint table's run records, when configured: a missing table
/// stops the worker, naming the key; one that cannot be reached now does
/// not (each call then fails, is counted, and delivery goes on).
async fn open_ledger(
    config: &Config,
    sdk: &fanout_aws::SdkConfig,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Option<Arc<Ledger>>> {
    let Some(table) = &config.checkpoint_table else {
        return Ok(None);
    };
    let client = clients::dynamodb_client(sdk);
    let runs = match DynamoRunTable::connect(client.clone(), table.as_str()).await {
        Ok(runs) => runs,
        Err(e) if e.is_transient() => {
            tracing::warn!(error = %e, table = %table, "the checkpoint table (FANOUT_CHECKPOINT_TABLE) cannot be reached: running without it until it answers");
            DynamoRunTable::unchecked(client, table)
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!("cannot use the checkpoint table {table} (FANOUT_CHECKPOINT_TABLE)")
            });
        }
    };
    let windows = Windows {
        dedup: config.dedup_window,
        lease: config.visibility_timeout,
    };
    tracing::info!(table = %table, dedup_window = %humantime::format_duration(config.dedup_window), "runs are recorded: a broadcast sent again is not broadcast twice");
    Ok(Some(Arc::new(Ledger::new(runs, windows, metrics.clone()))))
}

async fn join_fleet(
    config: &Config,
    sdk: &fanout_aws::SdkConfig,
    budget: &Arc<SendBudget>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Option<Coordinator<DynamoLeaseTable>>> {
    let Some((table, settings)) = config.fleet_settings(task_key()) else {
        return Ok(None);
    };
    let client = clients::fleet_dynamodb_client(sdk);
    let leases = match DynamoLeaseTable::connect(client.clone(), table.as_str()).await {
        Ok(leases) => leases,
        Err(e) if e.is_transient() => {
            tracing::warn!(error = %e, table = %table, "the fleet table (FANOUT_FLEET_TABLE) cannot be reached: starting at the fallback rate");
            DynamoLeaseTable::unchecked(client, &table)
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!("cannot use the fleet table {table} (FANOUT_FLEET_TABLE)")
            });
        }
    };
    tracing::info!(task = %settings.task, fleet_rate = settings.rate, fallback = settings.fallback, table = %table, "joining the fleet budget");
    Ok(Some(Coordinator::new(
        Arc::new(leases),
        budget.clone(),
        metrics.clone(),
        settings,
    )))
}

/// This process's key in the fleet table: unique in the fleet, and new for
/// each process, so a restarted task never inherits a dead one's lease.
fn task_key() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "task".to_owned());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

async fn enqueue(args: EnqueueArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(args.config.file.as_deref())?;
    let to = match args.to.as_deref().map(|to| to.split_once('=')) {
        None => None,
        Some(Some((name, value))) => Some([(name.to_owned(), value.to_owned())].into()),
        Some(None) => anyhow::bail!("--to takes NAME=VALUE, e.g. --to user=u-42"),
    };
    let mut spec = JobSpec {
        id: args.id,
        channel: args.channel,
        channels: (!args.channels.is_empty()).then_some(args.channels),
        to,
        connections: (!args.connections.is_empty()).then_some(args.connections),
        exclude: args.exclude,
        ..JobSpec::default()
    };
    if let Some(text) = args.data {
        spec.data = Some(serde_json::Value::String(text));
    } else if let Some(json) = args.json {
        let value: serde_json::Value =
            serde_json::from_str(&json).context("--json is not valid JSON")?;
        spec.data = Some(value);
    } else {
        let bytes = match args.file {
            Some(path) => {
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?
            }
            None => {
                let mut bytes = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut bytes)
                    .context("cannot read standard input")?;
                bytes
            }
        };
        match String::from_utf8(bytes) {
            Ok(text) => spec.data = Some(serde_json::Value::String(text)),
            Err(e) => {
                spec.data_base64 =
                    Some(base64::engine::general_purpose::STANDARD.encode(e.into_bytes()))
            }
        }
    }
    if !args.unchecked {
        // The same checks the worker makes, so a bad job fails here, not in
        // the dead-letter queue.
        // Channels and audience names are not checked: a producer's environment need not know
        // the worker's index; the worker dead-letters such a job itself.
        let caps = Capabilities {
            channels: true,
            audiences: None,
        };
        job::validate(spec.clone(), "enqueue", &caps)
            .context("the job is not valid (--unchecked sends it anyway)")?;
    }
    let body = serde_json::to_string(&spec).context("cannot encode the job")?;
    let options = fifo_options(&config.queue_url, spec.channel.as_deref());
    let sdk = clients::load_sdk_config().await;
    let queue = SqsQueue::connect(&sdk, config.queue_settings());
    let message_id = queue
        .send(&body, &options)
        .await
        .context("cannot send the job")?;
    println!("{message_id}");
    Ok(ExitCode::SUCCESS)
}

async fn redrive(arg: ConfigArg, max: u64) -> anyhow::Result<ExitCode> {
    let config = Config::load(arg.file.as_deref())?;
    let Some(dead_letters_url) = config.dead_letter_queue_url.clone() else {
        return Err(ConfigError::Missing {
            key: "dead_letter_queue_url".into(),
            env: "FANOUT_DEAD_LETTER_QUEUE_URL".into(),
        }
        .into());
    };
    let sdk = clients::load_sdk_config().await;
    // Short polls: an empty dead-letter queue ends the command at once.
    let short_polls = |url: String| QueueSettings {
        url,
        dead_letter_url: None,
        receive_wait: Duration::ZERO,
    };
    let dead_letters = SqsQueue::connect(&sdk, short_polls(dead_letters_url));
    let jobs = SqsQueue::connect(&sdk, short_polls(config.queue_url.clone()));
    let fifo_group = queue::is_fifo(&config.queue_url).then_some("redriven");
    let done = fanout_core::queue::redrive(&dead_letters, &jobs, max, fifo_group).await?;
    println!("moved {} job(s) back to the jobs queue", done.moved);
    if done.left_behind > 0 {
        println!(
            "{} job(s) were sent again but are also still in the dead-letter queue",
            done.left_behind
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// FIFO queues order per message group: one group per channel keeps a
/// channel's broadcasts in order.
fn fifo_options(queue_url: &str, channel: Option<&str>) -> SendOptions {
    if !queue::is_fifo(queue_url) {
        return SendOptions::default();
    }
    SendOptions {
        group_id: Some(channel.unwrap_or("all").to_owned()),
        deduplication_id: Some(format!("{:032x}", rand::random::<u128>())),
        ..SendOptions::default()
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn enqueue_takes_exactly_one_payload_source() {
        assert!(Cli::try_parse_from(["fanout", "enqueue"]).is_err());
        assert!(Cli::try_parse_from(["fanout", "enqueue", "--data", "a", "--json", "1"]).is_err());
        assert!(Cli::try_parse_from(["fanout", "enqueue", "-"]).is_ok());
        assert!(
            Cli::try_parse_from(["fanout", "enqueue", "--config", "f.toml", "--file", "p.bin"])
                .is_ok()
        );
    }

    #[test]
    fn fifo_queues_get_a_group_per_channel() {
        let std = fifo_options("https://sqs/1/jobs", Some("c"));
        assert!(std.group_id.is_none() && std.deduplication_id.is_none());
        let fifo = fifo_options("https://sqs/1/jobs.fifo", Some("c"));
        assert_eq!(fifo.group_id.as_deref(), Some("c"));
        assert!(fifo.deduplication_id.is_some());
        assert_eq!(
            fifo_options("https://sqs/1/jobs.fifo", None)
                .group_id
                .as_deref(),
            Some("all")
        );
        let slashed = fifo_options("https://sqs/1/jobs.fifo/", Some("c"));
        assert_eq!(slashed.group_id.as_deref(), Some("c"), "a trailing slash");
    }
}
