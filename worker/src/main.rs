//! `versus-worker`: settings, telemetry, run until SIGTERM, drain.

use clap::Parser;
use versus_worker::Settings;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::parse();
    versus_shared::telemetry::init_logs();
    let metrics = versus_shared::telemetry::install_metrics()?;
    let shutdown = versus_shared::shutdown::on_signal();
    versus_worker::run(settings, metrics, shutdown).await
}
