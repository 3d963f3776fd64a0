//! `versus alias add`, `rm`, `list` and `import`: names the API takes for another (`Kakarot`
//! for `Goku`). Names are checked with the API's rules before anything is sent; whether an
//! alias would chain or make a cycle only the API knows, and it refuses those.

use std::path::Path;

use anyhow::anyhow;
use versus_shared::key::Name;

use crate::Error;
use crate::admin::{Admin, Alias};
use crate::args::AliasImportArgs;
use crate::input::{self, Entry, Format};

pub async fn add(api: &str, alias: &str, canonical: &str) -> Result<(), Error> {
    check_name("alias", alias)?;
    check_name("canonical", canonical)?;
    let admin = Admin::from_env(api)?;
    match admin.set_alias(alias, canonical).await? {
        Ok(added) => {
            println!("{}", arrow(&added));
            Ok(())
        }
        Err(refusal) => {
            Err(anyhow!("{alias} → {canonical} was refused: {}", refusal.message).into())
        }
    }
}

pub async fn rm(api: &str, alias: &str) -> Result<(), Error> {
    check_name("alias", alias)?;
    let admin = Admin::from_env(api)?;
    if admin.remove_alias(alias).await? {
        println!("removed the alias {alias}: it stands for itself again");
        Ok(())
    } else {
        Err(anyhow!("no such alias: {alias} is not an alias").into())
    }
}

pub async fn list(api: &str) -> Result<(), Error> {
    let admin = Admin::from_env(api)?;
    print!("{}", lines(&admin.aliases().await?));
    Ok(())
}

pub async fn import(api: &str, args: &AliasImportArgs) -> Result<(), Error> {
    let path = &args.file;
    let entries =
        input::read_as(path, Format::Aliases).map_err(|problems| input::refuse(path, &problems))?;
    if args.check {
        println!("{}: {}, all valid", path.display(), aliases(entries.len()));
        return Ok(());
    }
    let admin = Admin::from_env(api)?;
    let refused = submit(&admin, path, &entries).await?;
    println!(
        "{} added, {refused} refused",
        aliases(entries.len() - refused)
    );
    if refused > 0 {
        return Err(anyhow!(
            "{refused} of {} refused: see the lines above",
            aliases(entries.len())
        )
        .into());
    }
    Ok(())
}

/// Adds each alias in turn, reporting each one the API refuses with its line: how many it
/// refused. Stops at the first failure of another kind (the API unreachable, a bad token).
async fn submit(admin: &Admin, path: &Path, entries: &[Entry]) -> anyhow::Result<usize> {
    let mut refused = 0;
    for (done, entry) in entries.iter().enumerate() {
        let (alias, canonical) = (&entry.pair.a, &entry.pair.b);
        let answer = admin.set_alias(alias, canonical).await.map_err(|e| {
            let sent = match done {
                0 => "nothing was sent".to_owned(),
                n => format!("the {} before it were sent", aliases(n)),
            };
            e.context(format!(
                "stopped at line {} of {}: {sent}",
                entry.line,
                path.display()
            ))
        })?;
        if let Err(refusal) = answer {
            refused += 1;
            eprintln!(
                "{}: line {}: {alias} → {canonical} was refused: {}",
                path.display(),
                entry.line,
                refusal.message
            );
        }
    }
    Ok(refused)
}

/// `name` (the `field` of an alias) as the API takes it: bad input (exit 2) unless it does.
fn check_name(field: &'static str, name: &str) -> Result<(), Error> {
    Name::parse(field, Some(name))
        .map(drop)
        .map_err(|e| Error::BadInput(e.to_string()))
}

/// The aliases one per line, or a line saying there are none.
fn lines(list: &[Alias]) -> String {
    if list.is_empty() {
        return "no aliases: every name stands for itself\n".to_owned();
    }
    list.iter().map(|a| format!("{}\n", arrow(a))).collect()
}

fn arrow(alias: &Alias) -> String {
    format!("{} → {}", alias.alias, alias.canonical)
}

fn aliases(n: usize) -> String {
    match n {
        1 => "1 alias".to_owned(),
        n => format!("{n} aliases"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alias(alias: &str, canonical: &str) -> Alias {
        Alias {
            alias: alias.to_owned(),
            canonical: canonical.to_owned(),
        }
    }

    #[test]
    fn the_list_is_one_alias_a_line_or_says_there_is_none() {
        assert_eq!(
            lines(&[alias("Kakarot", "Goku"), alias("Kal-El", "Superman")]),
            "Kakarot → Goku\nKal-El → Superman\n"
        );
        assert_eq!(lines(&[]), "no aliases: every name stands for itself\n");
    }

    #[test]
    fn an_invalid_name_is_bad_input_before_anything_is_sent() {
        // No token is set here: the names are checked first.
        for (field, name) in [("alias", "  "), ("canonical", "Bat\u{7}man")] {
            let Err(Error::BadInput(message)) = check_name(field, name) else {
                panic!("{name:?} is refused");
            };
            assert!(message.contains(&format!("`{field}`")), "{message}");
        }
        assert!(check_name("alias", " Kakarot ").is_ok());
    }

    #[test]
    fn counts_are_plural_but_one() {
        assert_eq!(
            [aliases(0), aliases(1), aliases(2)],
            ["0 aliases", "1 alias", "2 aliases"]
        );
    }
}
