//! How a process logs in to NATS: the credentials (a user and password or a token out of
//! `NATS_URL`, or `NATS_CREDS`), TLS, and the connect options and servers they make.

use std::path::PathBuf;

use anyhow::Context;
use async_nats::ServerAddr;

use crate::config::{NatsSettings, Secret};

/// How this process logs in, from `settings`: the options (a user and password taken out of
/// `NATS_URL`, a token, or `NATS_CREDS`; TLS) and the servers, without credentials, so that
/// nothing the client logs about a server can show them.
pub(super) async fn connect_options(
    settings: &NatsSettings,
) -> anyhow::Result<(async_nats::ConnectOptions, Vec<ServerAddr>)> {
    let (servers, login) = servers(&settings.url)?;
    let mut options = async_nats::ConnectOptions::new();
    match (login, &settings.creds) {
        (Some(_), Some(_)) => anyhow::bail!(
            "NATS_URL carries a user and NATS_CREDS names a credentials file: set one of them"
        ),
        (Some(Login::User(user, password)), None) => {
            options = options.user_and_password(user, password.expose().to_owned());
        }
        (Some(Login::Token(token)), None) => options = options.token(token.expose().to_owned()),
        (None, Some(creds)) => {
            options = options
                .credentials_file(creds)
                .await
                .with_context(|| format!("reading NATS_CREDS {}", creds.display()))?;
        }
        (None, None) => {}
    }
    if let Some(ca) = &settings.tls_ca {
        anyhow::ensure!(ca.is_file(), "NATS_TLS_CA {} is not a file", ca.display());
        options = options
            .add_root_certificates(PathBuf::from(ca))
            .require_tls(true);
    }
    Ok((options, servers))
}

/// Credentials a NATS URL carries: `user:password@` or `token@`.
#[derive(Debug, PartialEq, Eq)]
enum Login {
    User(String, Secret),
    Token(Secret),
}

/// The servers of a `NATS_URL` (comma-separated), with their credentials taken out, and the
/// first credentials found. Errors never quote the URL.
fn servers(url: &Secret) -> anyhow::Result<(Vec<ServerAddr>, Option<Login>)> {
    let mut servers = Vec::new();
    let mut login = None;
    for (i, part) in url.expose().split(',').map(str::trim).enumerate() {
        let server: ServerAddr = part
            .parse()
            .map_err(|e: std::io::Error| anyhow::anyhow!("{e}"))
            .with_context(|| format!("NATS_URL: server {} is not a NATS URL", i + 1))?;
        let mut url = server.into_inner();
        if login.is_none() && !url.username().is_empty() {
            let user = percent_decoded(url.username());
            login = Some(match url.password() {
                Some(password) => Login::User(user, Secret::new(percent_decoded(password))),
                // `nats://TOKEN@host`: a token alone.
                None => Login::Token(Secret::new(user)),
            });
        }
        // Cannot fail for the URLs ServerAddr takes (they all have a host).
        let _ = url.set_password(None);
        let _ = url.set_username("");
        servers.push(ServerAddr::from_url(url)?);
    }
    Ok((servers, login))
}

/// `%XX` escapes decoded (a password with `@`, `:` or `/` is written escaped in a URL).
fn percent_decoded(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(url: &str) -> (Vec<String>, Option<Login>) {
        let (servers, login) = servers(&Secret::new(url)).unwrap();
        let servers = servers.iter().map(|s| s.as_url_str().to_owned()).collect();
        (servers, login)
    }

    #[test]
    fn credentials_come_out_of_the_url_and_never_stay_in_it() {
        let (servers, login) = parsed("nats://versus-api:s3cr%40t@127.0.0.1:4222");
        assert_eq!(servers, ["nats://127.0.0.1:4222"]);
        assert_eq!(
            login,
            Some(Login::User("versus-api".into(), Secret::new("s3cr@t")))
        );

        let (servers, login) =
            parsed("tls://tok3n@nats.example.com, tls://nats-2.example.com:4443");
        assert_eq!(
            servers,
            ["tls://nats.example.com", "tls://nats-2.example.com:4443"]
        );
        assert_eq!(login, Some(Login::Token(Secret::new("tok3n"))));

        let (servers, login) = parsed("127.0.0.1:4222");
        assert_eq!(servers, ["nats://127.0.0.1:4222"]);
        assert_eq!(login, None);
    }

    #[test]
    fn a_bad_url_is_named_without_its_credentials() {
        let error = servers(&Secret::new("http://versus-api:hunter2@host:4222")).unwrap_err();
        let text = format!("{error:#}");
        assert!(text.contains("NATS_URL"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn percent_escapes_are_decoded_and_stray_percents_kept() {
        assert_eq!(percent_decoded("a%2Fb%3Ac%25"), "a/b:c%");
        assert_eq!(percent_decoded("100%"), "100%");
        assert_eq!(percent_decoded("%zz%4"), "%zz%4");
    }
}
