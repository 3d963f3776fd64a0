//! The operator's side of the API: with `VERSUS_OPS_ADDR`, `/metrics` and the admin routes are
//! served on that address alone; and an admin token too short to be safe stops the API at
//! start-up, naming the variable and never the token.

use std::{process::Stdio, time::Duration};

use versus_testkit::bin_path;

use crate::{fight, http, quick, run, shape};

const TOKEN: &str = "ops-admin-token-0123456789abcdef-0123";

#[test]
fn with_an_ops_address_metrics_and_admin_routes_are_served_there_only() {
    run(async {
        let sys = quick()
            .workers(1)
            .env("VERSUS_ADMIN_TOKEN", TOKEN)
            .api_env("VERSUS_OPS_ADDR", "127.0.0.1:0")
            .start()
            .await;
        let public = sys.api_url();
        let ops = sys
            .api
            .ops_url
            .clone()
            .expect("the API announced its ops address");
        assert_ne!(ops, public);
        let events = fight(&sys, "Zeus", "Odin").await;
        assert_eq!(shape(&events), ["meta", "chunk*", "done"], "{events:?}");
        let key = events[0].json()["key"].as_str().unwrap().to_owned();

        // Not on the public address, token or not.
        for (method, path) in [
            ("GET", "/metrics".to_owned()),
            ("GET", "/v1/admin/popular".to_owned()),
            ("GET", "/v1/admin/spend".to_owned()),
            ("DELETE", format!("/v1/admin/fights/{key}")),
        ] {
            let request = http()
                .request(method.parse().unwrap(), format!("{public}{path}"))
                .bearer_auth(TOKEN);
            let status = request.send().await.unwrap().status();
            assert_eq!(status, 404, "{method} {path} on the public address");
        }
        // The probes on both, the contract on the public one only.
        for base in [public, ops.as_str()] {
            for probe in ["/healthz", "/readyz"] {
                let status = http()
                    .get(format!("{base}{probe}"))
                    .send()
                    .await
                    .unwrap()
                    .status();
                assert_eq!(status, 200, "{base}{probe}");
            }
        }
        let status = http()
            .get(format!("{ops}/v1/fights/{key}"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 404, "the contract is not on the ops address");

        // On the ops address: the metrics, and the admin routes behind the token.
        let metrics = http()
            .get(format!("{ops}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(metrics.contains("versus_cache_misses_total"), "{metrics}");
        let status = http()
            .get(format!("{ops}/v1/admin/popular"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 401);
        let popular = http()
            .get(format!("{ops}/v1/admin/popular"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(popular.status(), 200);
        let purged = http()
            .delete(format!("{ops}/v1/admin/fights/{key}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(purged.status(), 204);
        let gone = http()
            .get(format!("{public}/v1/fights/{key}"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(gone, 404, "purged through the ops address");
    });
}

#[test]
fn an_admin_token_under_32_characters_stops_the_api_naming_the_variable_not_the_token() {
    run(async {
        let token = "  short-but-s3cret-admin-tok3n \n";
        let mut cmd = tokio::process::Command::new(bin_path("versus-api"));
        for (key, _) in std::env::vars_os() {
            let setting = key.to_str().is_some_and(|k| {
                ["VERSUS_", "NATS_", "OPENAI_", "OTEL_", "AWS_"]
                    .iter()
                    .any(|prefix| k.starts_with(prefix))
                    || k == "DATABASE_URL"
            });
            if setting {
                cmd.env_remove(&key);
            }
        }
        cmd.env("VERSUS_ADMIN_TOKEN", token)
            .env("VERSUS_HTTP_ADDR", "127.0.0.1:0")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
            .await
            .expect("the API exits at once")
            .expect("the API runs");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(!out.status.success(), "{stdout}{stderr}");
        assert!(stderr.contains("VERSUS_ADMIN_TOKEN"), "{stderr}");
        assert!(stderr.contains("32"), "{stderr}");
        assert!(!stdout.contains("listening on"), "{stdout}");
        for part in ["s3cret", "tok3n", token.trim()] {
            assert!(!stderr.contains(part) && !stdout.contains(part), "{stderr}");
        }
    });
}
