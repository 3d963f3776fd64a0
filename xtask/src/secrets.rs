//! Credentials made once per data folder and kept there, readable by their owner alone (mode
//! 600): the NATS users' passwords (`nats-auth.env`) and the admin token (`admin-token`).

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, Result};

use crate::topology::password_var;

/// The passwords of `users` (`admin`, `leaf_edge1`, ...) from `file` (lines
/// `VERSUS_NATS_<USER>_PASSWORD=…`, at least 8 of A-Z a-z 0-9 . _ ~ -, which a URL carries as
/// they are), first making it (32 random hex digits each) unless it holds them all. By
/// variable, in the order of `users`.
pub fn nats_passwords(file: &Path, users: &[String]) -> Result<Vec<(String, String)>> {
    let read = |text: &str| -> Vec<(String, String)> {
        users
            .iter()
            .filter_map(|user| {
                let var = password_var(user);
                text.lines().find_map(|line| {
                    let password = line.strip_prefix(&var)?.strip_prefix('=')?;
                    let fine = password.len() >= 8
                        && password
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b".-_~".contains(&b));
                    fine.then(|| (var.clone(), password.to_owned()))
                })
            })
            .collect()
    };
    let mut passwords = read(&fs::read_to_string(file).unwrap_or_default());
    if passwords.len() != users.len() {
        let mut text = String::new();
        for user in users {
            text.push_str(&format!("{}={}\n", password_var(user), random_hex(16)?));
        }
        let new = file.with_extension("env.new");
        write_private(&new, &text)?;
        fs::rename(&new, file).with_context(|| format!("keep {}", file.display()))?;
        passwords = read(&text);
    }
    fs::set_permissions(file, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", file.display()))?;
    Ok(passwords)
}

/// The admin token of the data folder `data` (`admin-token`, 64 hex digits), made on the
/// first run.
pub fn admin_token(data: &Path) -> Result<String> {
    let file = data.join("admin-token");
    let kept = fs::read_to_string(&file).unwrap_or_default();
    if !kept.is_empty() {
        return Ok(kept.trim_end().to_owned());
    }
    let token = random_hex(32)?;
    write_private(&file, &token)?;
    Ok(token)
}

/// `bytes` random bytes as hex digits.
pub fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("read /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `text` to a new `file` that only its owner may read (mode 600 from its creation).
fn write_private(file: &Path, text: &str) -> Result<()> {
    let _ = fs::remove_file(file);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("write {}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_made_once_per_folder_and_only_their_owner_reads_them() {
        let dir = std::env::temp_dir().join(format!("versus-xtask-{}", random_hex(8).unwrap()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("nats-auth.env");
        let users: Vec<String> = ["admin", "api"].map(str::to_owned).to_vec();
        let first = nats_passwords(&file, &users).unwrap();
        assert_eq!(first.len(), 2);
        assert_eq!(first[0].0, "VERSUS_NATS_ADMIN_PASSWORD");
        assert_eq!(first[0].1.len(), 32);
        assert_eq!(nats_passwords(&file, &users).unwrap(), first);
        let mode = fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A user it lacks: all are made again.
        let more: Vec<String> = ["admin", "api", "leaf_edge1"].map(str::to_owned).to_vec();
        let again = nats_passwords(&file, &more).unwrap();
        assert_eq!(again.len(), 3);
        assert_ne!(again[0], first[0]);
        let token = admin_token(&dir).unwrap();
        assert_eq!(token.len(), 64);
        assert_eq!(admin_token(&dir).unwrap(), token);
        fs::remove_dir_all(&dir).unwrap();
    }
}
