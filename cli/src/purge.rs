//! `versus purge KEY`: remove one answer and its picture from every cache layer.

use anyhow::anyhow;
use versus_shared::key::Key;

use crate::Error;
use crate::admin::Admin;

pub async fn run(api: &str, key: &str) -> Result<(), Error> {
    let key = parse_key(key)?;
    let admin = Admin::from_env(api)?;
    if admin.purge(&key).await? {
        println!(
            "purged {key}: its answer and picture are gone from every cache; \
             the next request generates them afresh"
        );
        Ok(())
    } else {
        Err(anyhow!("no such answer: the API has nothing under {key}").into())
    }
}

/// An answer's key as an operator pastes it: bad input (exit 2) unless it is one.
pub fn parse_key(key: &str) -> Result<Key, Error> {
    // Keys are lowercase hex; an operator pasting one in capitals means the same answer.
    Key::parse(&key.trim().to_ascii_lowercase()).ok_or_else(|| {
        Error::BadInput(format!(
            "{key:?} is not an answer key: a key is {} hexadecimal digits, as in the `meta` \
             event, `versus popular` or `versus reports list`",
            Key::LEN
        ))
    })
}
