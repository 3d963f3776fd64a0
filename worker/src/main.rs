//! `versus-worker`: settings, telemetry, run until SIGTERM, drain, flush the traces.

use clap::Parser;
use versus_worker::Settings;

/// How long the background tasks (the ops server, the batchers, the watches) get to end once
/// the jobs have drained, before the process exits without them.
const TASKS_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::parse();
    let traces = versus_shared::telemetry::init("versus-worker")?;
    let metrics = versus_shared::telemetry::install_metrics()?;
    let tasks = versus_shared::tasks::Tasks::new();
    versus_shared::shutdown::on_signal(&tasks);
    let ran = versus_worker::run(settings, metrics, &tasks).await;
    tasks.shutdown().cancel();
    tasks.wait(TASKS_GRACE).await;
    // After the tasks: the spans of the last requests (and jobs) go out too.
    traces.shutdown().await;
    ran
}
