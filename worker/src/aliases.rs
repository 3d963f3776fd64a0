//! Operators' changes to the aliases (`versus.admin.aliases`), carried out for the API, which
//! may not write to the answers bucket: the change goes to Postgres (`aliases`), then to the
//! bucket's `alias.<hash>` entry, which every API replica and edge follows
//! (`versus_shared::aliases`).
//!
//! Aliases never chain: an alias's canonical name is not itself an alias, and an alias is not
//! another alias's canonical name. Changes are checked and made one at a time, cluster-wide
//! (a transaction-scoped advisory lock), with the bucket written before the lock is let go,
//! so two operators' changes of one alias reach the bucket in the order Postgres took them.

use std::sync::Arc;

use anyhow::Context;
use sqlx::{Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use versus_shared::{
    aliases,
    key::Name,
    wire::{self, Alias, AliasChange, AliasReply},
};

use crate::{ctx::Ctx, events, responder};

/// The advisory lock every change of the aliases holds (an arbitrary constant of ours).
const ALIASES_LOCK: i64 = 0x7665_7273_7573_6131;

/// Carries out changes to the aliases until `shutdown`, one at a time.
pub async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) -> anyhow::Result<()> {
    responder::serve(
        ctx,
        wire::ALIASES_SUBJECT,
        wire::ALIASES_QUEUE,
        1,
        shutdown,
        |ctx, change: AliasChange| async move { carry_out(&ctx, &change).await },
        |error| AliasReply {
            error: Some(error),
            ..AliasReply::default()
        },
    )
    .await
}

async fn carry_out(ctx: &Ctx, change: &AliasChange) -> anyhow::Result<AliasReply> {
    let alias = match change {
        AliasChange::Put(alias) => &alias.alias,
        AliasChange::Delete { alias } => alias,
    };
    let Ok(name) = Name::parse("alias", Some(alias)) else {
        return Ok(refused(format!("{alias:?} is not a valid name")));
    };
    let mut tx = ctx.db.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(ALIASES_LOCK)
        .execute(&mut *tx)
        .await?;
    let reply = match change {
        AliasChange::Put(Alias { canonical, .. }) => {
            let Ok(canonical) = Name::parse("canonical", Some(canonical)) else {
                return Ok(refused(format!("{canonical:?} is not a valid name")));
            };
            if let Some(why) = chain(&mut tx, &name, &canonical).await? {
                return Ok(refused(why));
            }
            put(ctx, &mut tx, &name, &canonical).await?
        }
        AliasChange::Delete { .. } => delete(ctx, &mut tx, &name).await?,
    };
    tx.commit()
        .await
        .context("committing the change of alias")?;
    Ok(reply)
}

fn refused(why: String) -> AliasReply {
    AliasReply {
        refused: Some(why),
        ..AliasReply::default()
    }
}

/// Why `alias` may not stand for `canonical`, if it may not: a cycle or a chain.
async fn chain(
    tx: &mut Transaction<'_, Postgres>,
    alias: &Name,
    canonical: &Name,
) -> anyhow::Result<Option<String>> {
    if alias.matched() == canonical.matched() {
        return Ok(Some(format!(
            "{} and {} are already one name",
            alias.display(),
            canonical.display()
        )));
    }
    let canonical_is_alias: Option<String> =
        sqlx::query_scalar("SELECT canonical FROM aliases WHERE alias_match = $1")
            .bind(canonical.matched())
            .fetch_optional(&mut **tx)
            .await?;
    if let Some(its) = canonical_is_alias {
        return Ok(Some(format!(
            "{} is itself an alias of {its}: name {its} as the canonical name",
            canonical.display()
        )));
    }
    let aliases_of_alias: Option<String> = sqlx::query_scalar(
        "SELECT alias FROM aliases WHERE canonical_match = $1 ORDER BY alias_match LIMIT 1",
    )
    .bind(alias.matched())
    .fetch_optional(&mut **tx)
    .await?;
    Ok(aliases_of_alias.map(|other| {
        format!(
            "{} is the canonical name of {other}: an alias of it would make a chain",
            alias.display()
        )
    }))
}

async fn put(
    ctx: &Ctx,
    tx: &mut Transaction<'_, Postgres>,
    alias: &Name,
    canonical: &Name,
) -> anyhow::Result<AliasReply> {
    sqlx::query(
        "INSERT INTO aliases (alias_match, alias, canonical, canonical_match)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (alias_match) DO UPDATE
         SET alias = EXCLUDED.alias, canonical = EXCLUDED.canonical,
             canonical_match = EXCLUDED.canonical_match, updated_at = now()",
    )
    .bind(alias.matched())
    .bind(alias.display())
    .bind(canonical.display())
    .bind(canonical.matched())
    .execute(&mut **tx)
    .await
    .context("writing the alias")?;
    let value = serde_json::to_vec(&Alias {
        alias: alias.display().to_owned(),
        canonical: canonical.display().to_owned(),
    })?;
    let entry = aliases::entry(alias.matched());
    let answers = &ctx.bus.answers;
    events::through_election(
        "writing an alias to the answers bucket",
        |_| true,
        || answers.put(&entry, value.clone().into()),
    )
    .await
    .context("writing the alias to the answers bucket")?;
    tracing::info!(
        alias = alias.display(),
        canonical = canonical.display(),
        "alias set"
    );
    Ok(AliasReply {
        found: true,
        ..AliasReply::default()
    })
}

async fn delete(
    ctx: &Ctx,
    tx: &mut Transaction<'_, Postgres>,
    alias: &Name,
) -> anyhow::Result<AliasReply> {
    let found = sqlx::query("DELETE FROM aliases WHERE alias_match = $1")
        .bind(alias.matched())
        .execute(&mut **tx)
        .await
        .context("deleting the alias")?
        .rows_affected()
        > 0;
    // A marker even for an alias Postgres did not hold: the bucket may keep one a failed
    // change left there.
    let entry = aliases::entry(alias.matched());
    let answers = &ctx.bus.answers;
    events::through_election(
        "removing an alias from the answers bucket",
        |_| true,
        || answers.purge(&entry),
    )
    .await
    .context("removing the alias from the answers bucket")?;
    if found {
        tracing::info!(alias = alias.display(), "alias removed");
    }
    Ok(AliasReply {
        found,
        ..AliasReply::default()
    })
}
