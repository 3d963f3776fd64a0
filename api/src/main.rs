//! `versus-api`: settings, telemetry, bind (the public address, and the operator's if set),
//! serve until SIGTERM, flush the traces.

use anyhow::Context;
use clap::Parser;
use versus_api::{App, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::parse();
    let traces = versus_shared::telemetry::init("versus-api")?;
    let metrics = versus_shared::telemetry::install_metrics()?;
    let tasks = versus_shared::tasks::Tasks::new();
    versus_shared::shutdown::on_signal(&tasks);
    let listener = tokio::net::TcpListener::bind(&settings.http_addr)
        .await
        .with_context(|| format!("binding VERSUS_HTTP_ADDR {}", settings.http_addr))?;
    let ops = match &settings.ops_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding VERSUS_OPS_ADDR {addr}"))?,
        ),
        None => None,
    };
    let app = App::build(settings, metrics, &tasks).await?;
    let ran = versus_api::run(listener, ops, app, &tasks).await;
    tasks.shutdown().cancel();
    tasks.wait(std::time::Duration::from_secs(5)).await;
    // After the tasks: the spans of the last requests (and jobs) go out too.
    traces.shutdown().await;
    ran
}
