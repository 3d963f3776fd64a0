//! `versus popular`: the most requested matchups, to see what `prewarm --popular N` would warm
//! and to find the key to purge.

use crate::Error;
use crate::admin::Admin;

pub async fn run(api: &str, limit: u32, pending: bool) -> Result<(), Error> {
    let admin = Admin::from_env(api)?;
    let matchups = admin.popular(limit, pending).await?;
    if matchups.is_empty() {
        match pending {
            true => println!("no requested matchup is waiting for its answer"),
            false => println!("no matchups requested yet"),
        }
        return Ok(());
    }
    println!("{:>9}  {:<6}  {:<32}  matchup", "requests", "cached", "key");
    for m in matchups {
        let cached = if m.cached { "yes" } else { "no" };
        println!(
            "{:>9}  {cached:<6}  {:<32}  {} vs {}",
            m.requests, m.key, m.a, m.b
        );
    }
    Ok(())
}
