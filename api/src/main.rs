//! `versus-api`: settings, telemetry, bind, serve until SIGTERM.

use anyhow::Context;
use clap::Parser;
use versus_api::{App, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::parse();
    versus_shared::telemetry::init_logs();
    let metrics = versus_shared::telemetry::install_metrics()?;
    let shutdown = versus_shared::shutdown::on_signal();
    let listener = tokio::net::TcpListener::bind(&settings.http_addr)
        .await
        .with_context(|| format!("binding VERSUS_HTTP_ADDR {}", settings.http_addr))?;
    let app = App::build(settings, metrics).await?;
    versus_api::run(listener, app, shutdown).await
}
