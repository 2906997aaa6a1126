//! `fanout run`: the worker. Builds the AWS clients, the engine, the fleet
//! and the run records from the configuration, and runs until shut down (or
//! idle, with `--exit-when-idle`).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use fanout::config::{Config, WorkerTargets};
use fanout::ecs::{self, TaskProtection};
use fanout::metrics::MetricsServer;
use fanout_aws::{
    ClockCheck, DynamoLeaseTable, DynamoRunTable, DynamoStore, SelectedSender, SnsReports,
    SqsQueue, SqsReports, clients,
};
use fanout_core::budget::SendBudget;
use fanout_core::connection::expiry::{self, AwsClock, ExpiryRule};
use fanout_core::engine::Engine;
use fanout_core::fleet::Coordinator;
use fanout_core::reports::{ReportSink, Reporter};
use fanout_core::runs::{Ledger, Windows};
use fanout_core::telemetry::Metrics;
use fanout_core::worker::{self, Stopped};

use super::ConfigArg;

/// Compares the clocks once before the first broadcast, then hourly in the
/// background: deadlines are read against AWS's time, and a worker whose
/// clock is off must not judge rows by age.
async fn watch_clock(
    check: ClockCheck,
    clock: Arc<AwsClock>,
    rule: Option<Arc<ExpiryRule>>,
    stop: CancellationToken,
) {
    if check.run(&clock, rule.as_deref()).await.is_none() {
        tracing::warn!(
            "the clock could not be compared at startup; deadlines are read on this worker's \
             clock, and rows are judged by age as configured"
        );
    }
    if let Some(rule) = &rule {
        tracing::info!(
            on = rule.is_on(),
            margin = %humantime::format_duration(rule.margin()),
            "rows older than API Gateway's two hours plus the margin are removed without a post"
        );
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(expiry::CLOCK_CHECK_INTERVAL) => {
                    check.run(&clock, rule.as_deref()).await;
                }
            }
        }
    });
}

/// What the worker runs with, built from the configuration before anything
/// is received.
struct Worker {
    queue: SqsQueue,
    engine: Engine<DynamoStore, SelectedSender>,
    settings: worker::WorkerSettings,
    reports: Reporter,
    ledger: Option<Arc<Ledger>>,
    fleet: Option<Coordinator<DynamoLeaseTable>>,
}

pub async fn run(arg: ConfigArg, exit_when_idle: bool) -> anyhow::Result<ExitCode> {
    let config = Config::load(arg.file.as_deref())?;
    let targets = config.worker_targets()?;
    fanout::logging::init();
    let metrics = Arc::new(Metrics::default());
    let shutdown = CancellationToken::new();
    let worker = build(&config, &targets, exit_when_idle, &metrics, &shutdown).await?;

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
    tracing::info!(queue = %config.queue_url, table = %targets.table, endpoint = %targets.gateway_endpoint, job_format = fanout_core::job::JOB_FORMAT_VERSION, "fanout worker started");
    let stopped = serve(worker, metrics, shutdown.clone()).await;
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

/// Connects the queue, the connections table, the gateway, the fleet and
/// the run records, and builds the engine over them. A table or fleet that
/// does not exist stops the worker here, before any job is received.
async fn build(
    config: &Config,
    targets: &WorkerTargets,
    exit_when_idle: bool,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Worker> {
    let sdk = clients::load_sdk_config().await;
    let queue = SqsQueue::connect(&sdk, config.queue_settings());
    let dynamodb = clients::dynamodb_client(&sdk);
    let store = DynamoStore::connect(dynamodb.clone(), config.table_settings(&targets.table))
        .await
        .with_context(|| format!("cannot use the connections table {}", targets.table))?;
    let clock = Arc::new(AwsClock::default());
    watch_clock(
        ClockCheck::new(&sdk, &targets.table),
        clock.clone(),
        store.age_rule(),
        shutdown.clone(),
    )
    .await;
    let gateway = SelectedSender::build(&sdk, &config.send_settings(targets))?;

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
    let fleet = join_fleet(config, &sdk, &budget, metrics).await?;
    let ledger = open_ledger(config, &sdk, metrics).await?;
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
    Ok(Worker {
        queue,
        engine,
        settings: worker::WorkerSettings {
            clock,
            ..config.worker_settings(exit_when_idle)
        },
        reports: reporter(config, &sdk),
        ledger,
        fleet,
    })
}

/// Runs the worker, with the fleet's lease beside it, until it stops.
async fn serve(worker: Worker, metrics: Arc<Metrics>, shutdown: CancellationToken) -> Stopped {
    let (leave_fleet, left) = tokio::sync::oneshot::channel::<()>();
    let fleet = worker.fleet.map(|coordinator| {
        tokio::spawn(coordinator.run(async {
            let _ = left.await;
        }))
    });
    let stopped = worker::run(
        Arc::new(worker.queue),
        Arc::new(worker.engine),
        worker.settings,
        metrics,
        worker.reports,
        shutdown,
        worker.ledger,
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
    stopped
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
    let runs = open_table(
        TableRole {
            table,
            what: "the checkpoint table",
            env: "FANOUT_CHECKPOINT_TABLE",
            meanwhile: "running without it until it answers",
        },
        DynamoRunTable::connect(client.clone(), table.as_str()),
        |e| e.is_transient(),
        || DynamoRunTable::unchecked(client, table),
    )
    .await?;
    let windows = Windows {
        dedup: config.dedup_window,
        lease: config.visibility_timeout,
    };
    tracing::info!(table = %table, dedup_window = %humantime::format_duration(config.dedup_window), "runs are recorded: a broadcast sent again is not broadcast twice");
    Ok(Some(Arc::new(Ledger::new(runs, windows, metrics.clone()))))
}

/// The fleet's coordinator, if the configuration names a fleet. A missing
/// fleet table stops the worker; an unreachable one does not: the task
/// starts at its fallback rate and joins when the table answers.
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
    let leases = open_table(
        TableRole {
            table: &table,
            what: "the fleet table",
            env: "FANOUT_FLEET_TABLE",
            meanwhile: "starting at the fallback rate",
        },
        DynamoLeaseTable::connect(client.clone(), table.as_str()),
        |e| e.is_transient(),
        || DynamoLeaseTable::unchecked(client, &table),
    )
    .await?;
    tracing::info!(task = %settings.task, fleet_rate = settings.rate, fallback = settings.fallback, table = %table, "joining the fleet budget");
    Ok(Some(Coordinator::new(
        Arc::new(leases),
        budget.clone(),
        metrics.clone(),
        settings,
    )))
}

/// A table the worker keeps its own records in, as its startup names it.
struct TableRole<'a> {
    table: &'a str,
    /// What the table is to the worker, for the log and the error.
    what: &'static str,
    /// The variable that names it.
    env: &'static str,
    /// What the worker does while the table cannot be reached.
    meanwhile: &'static str,
}

/// Opens one of the worker's tables: a missing or wrong one stops the
/// worker, naming its key; one that cannot be reached now is used unchecked,
/// so a DynamoDB outage at startup does not stop delivery.
async fn open_table<T, E>(
    role: TableRole<'_>,
    connect: impl Future<Output = Result<T, E>>,
    is_transient: impl FnOnce(&E) -> bool,
    unchecked: impl FnOnce() -> T,
) -> anyhow::Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let TableRole {
        table,
        what,
        env,
        meanwhile,
    } = role;
    match connect.await {
        Ok(opened) => Ok(opened),
        Err(e) if is_transient(&e) => {
            tracing::warn!(error = %e, table = %table, "{what} ({env}) cannot be reached: {meanwhile}");
            Ok(unchecked())
        }
        Err(e) => Err(e).with_context(|| format!("cannot use {what} {table} ({env})")),
    }
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
