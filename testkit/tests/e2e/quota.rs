//! The daily quota per client (`VERSUS_CLIENT_DAILY_USD`): what one client's new answers may
//! cost in a UTC day, counted in the KV bucket `versus_quota` across every API replica and
//! edge; IPv6 clients count at their /64 and at their /48, which may spend 16 quotas.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use versus_shared::wire;
use versus_testkit::{System, SystemBuilder, sse};

use crate::{http, quick, run, stream_url_at, text_of};

/// Seconds in a UTC day.
const DAY_SECS: u64 = 86_400;

/// A text answer's worst case, with the prices of [`priced`]: 40 tokens at $10,000 per
/// million, prompts free.
const ANSWER_USD: f64 = 0.4;

/// Seconds from now until midnight UTC.
fn until_midnight() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    DAY_SECS - now % DAY_SECS
}

/// The UTC day of now, as the quota's keys name it.
fn today() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / DAY_SECS
}

/// A test that counts on one UTC day does not start in its last two minutes: it waits for
/// the next day instead (rarely, and at most that long).
async fn not_at_midnight() {
    let left = until_midnight();
    if left < 120 {
        tokio::time::sleep(Duration::from_secs(left + 1)).await;
    }
}

/// A system in which a text answer's worst case is $0.40 and each client may spend
/// `quota_usd` a day, told apart by `X-Forwarded-For` from the test's loopback proxy; the
/// per-minute limits stay off, as the kit sets them.
fn priced(builder: SystemBuilder, quota_usd: &str) -> SystemBuilder {
    builder
        .env(
            "VERSUS_PRICES",
            json!({"gpt-4o-mini": {"input_per_mtok": 0, "output_per_mtok": 10000}}).to_string(),
        )
        .env("VERSUS_MAX_ANSWER_TOKENS", "40")
        .api_env("VERSUS_CLIENT_DAILY_USD", quota_usd)
        .api_env("VERSUS_TRUSTED_PROXIES", "127.0.0.1/32")
}

/// What a new matchup asked of the API at `api` by `client` came to: `Ok(text)` when it was
/// answered in full, `Err(retry_after_secs)` when it was refused `quota_exhausted` before any
/// stream began.
async fn ask(api: &str, a: &str, client: &str) -> Result<String, u64> {
    let url = stream_url_at(api, a, "Dragon");
    let response = http()
        .get(&url)
        .header("x-forwarded-for", client)
        .send()
        .await
        .unwrap();
    match response.status().as_u16() {
        200 => {
            let body = response.text().await.unwrap();
            assert!(body.contains("event: done"), "{client} {a}: {body}");
            Ok(body)
        }
        429 => {
            let retry_after: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let body: Value = response.json().await.unwrap();
            assert_eq!(
                body["error"]["code"],
                json!("quota_exhausted"),
                "{client} {a}: {body}"
            );
            let message = body["error"]["message"].as_str().unwrap();
            assert!(
                message.contains("today's allowance") && message.contains("midnight UTC"),
                "{message}"
            );
            Err(retry_after)
        }
        status => panic!("{client} {a}: unexpected {status}"),
    }
}

/// That `retry_after` (seconds) points at midnight UTC.
fn until_midnight_utc(retry_after: u64) {
    let expected = until_midnight();
    assert!(
        retry_after.abs_diff(expected) <= 5,
        "Retry-After {retry_after} s, midnight UTC is {expected} s away"
    );
}

/// What the quota bucket holds under `key` for today, in millionths of a US dollar (0: none).
async fn charged(sys: &System, bucket: &str) -> u64 {
    let js = async_nats::jetstream::new(sys.admin_client().await);
    let quota = js.get_key_value(wire::QUOTA_BUCKET).await.unwrap();
    let key = format!("day.{}.{bucket}", today());
    match quota.get(&key).await.unwrap() {
        Some(value) => std::str::from_utf8(&value).unwrap().parse().unwrap(),
        None => 0,
    }
}

fn micros(usd: f64) -> u64 {
    (usd * 1e6).round() as u64
}

#[test]
fn a_client_stops_at_its_daily_quota_across_two_replicas_while_others_are_served() {
    run(async {
        not_at_midnight().await;
        // Three answers a day each; an answer takes about a second, so that one can be joined
        // while it is generated.
        let sys = priced(quick(), "1.2")
            .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "40")
            .start()
            .await;
        let second = sys.spawn_api().await;
        let replicas = [sys.api_url().to_owned(), second.url.clone()];
        let (one, other) = ("203.0.113.7", "198.51.100.9");

        // Three new matchups, asked of either replica in turn, are answered; the fourth is
        // refused on both, until midnight UTC, before any stream starts.
        for i in 0..3 {
            let answered = ask(&replicas[i % 2], &format!("Robot {i}"), one).await;
            assert!(answered.is_ok(), "answer {i}: {answered:?}");
        }
        for (i, api) in replicas.iter().enumerate() {
            let refused = ask(api, &format!("Robot {}", 3 + i), one).await;
            until_midnight_utc(refused.expect_err("past the quota"));
        }
        let post = http()
            .post(format!("{}/v1/fights", replicas[1]))
            .header("x-forwarded-for", one)
            .json(&json!({"a": "Robot 9", "b": "Dragon"}))
            .send()
            .await
            .unwrap();
        assert_eq!(post.status(), 429);
        until_midnight_utc(
            post.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap(),
        );
        assert_eq!(sys.sim.chat_calls().await, 3, "refusals cost nothing");
        assert_eq!(
            charged(&sys, &format!("ip4.{one}")).await,
            micros(3.0 * ANSWER_USD),
            "both replicas charged the one counter"
        );

        // What the client has is still served: hits are free.
        for api in &replicas {
            let hit = ask(api, "Robot 0", one).await.unwrap();
            assert!(hit.contains("\"cached\":true"), "{hit}");
        }
        // A generation another client started is joined, here and on the other replica (the
        // events stream shows it under way), for free.
        let url = stream_url_at(&replicas[0], "Golem", "Dragon");
        let mut starter = sse::open_with(&url, None, &[("x-forwarded-for", other)]).await;
        let mut first = starter.until_chunks(1).await;
        let (here, there) = tokio::join!(
            ask(&replicas[0], "Golem", one),
            ask(&replicas[1], "Golem", one)
        );
        for joined in [here, there] {
            assert!(joined.is_ok(), "a join is free: {joined:?}");
        }
        first.extend(starter.collect_all().await);
        assert!(!text_of(&first).is_empty());
        // Another client has a quota of its own.
        let fresh = ask(&replicas[1], "Hydra", other).await;
        assert!(fresh.is_ok(), "{fresh:?}");
        assert_eq!(sys.sim.chat_calls().await, 5);
        assert_eq!(
            charged(&sys, &format!("ip4.{one}")).await,
            micros(3.0 * ANSWER_USD),
            "joins and hits were not charged"
        );
        assert_eq!(
            charged(&sys, &format!("ip4.{other}")).await,
            micros(2.0 * ANSWER_USD)
        );
    });
}

#[test]
fn an_ipv6_48_spread_over_many_64s_stops_at_sixteen_quotas() {
    run(async {
        not_at_midnight().await;
        // One answer a day per /64, sixteen per /48.
        let sys = priced(quick(), "0.4").start().await;
        let second = sys.spawn_api().await;
        let replicas = [sys.api_url().to_owned(), second.url.clone()];
        let sixty_four = |i: u32| format!("2001:db8:77:{i:x}::1");

        // A /64 gets one answer, whichever address of it asks; its second is refused, and what
        // that refusal added to the /48 is taken back.
        assert!(ask(&replicas[0], "Wolf 0", &sixty_four(0)).await.is_ok());
        let again = ask(&replicas[1], "Wolf 1", "2001:db8:77:0:ffff::2").await;
        until_midnight_utc(again.expect_err("the /64's quota is spent"));
        assert_eq!(
            charged(&sys, "net48.20010db80077").await,
            micros(ANSWER_USD)
        );

        // Nineteen more /64s of the same /48: fifteen more answers, then the /48 is spent.
        let mut answered = 1;
        for i in 1..20 {
            match ask(
                &replicas[i as usize % 2],
                &format!("Wolf {}", i + 1),
                &sixty_four(i),
            )
            .await
            {
                Ok(_) => answered += 1,
                Err(retry_after) => until_midnight_utc(retry_after),
            }
        }
        assert_eq!(answered, 16, "one /48 gets sixteen quotas");
        assert_eq!(sys.sim.chat_calls().await, 16);
        assert_eq!(
            charged(&sys, "net48.20010db80077").await,
            micros(16.0 * ANSWER_USD)
        );
        assert_eq!(
            charged(&sys, "net64.20010db800770013").await,
            0,
            "a refused /64 was not charged"
        );

        // Another /48, and an IPv4 client, are served.
        assert!(ask(&replicas[0], "Bear", "2001:db8:78::1").await.is_ok());
        assert!(ask(&replicas[1], "Lynx", "192.0.2.1").await.is_ok());
        assert_eq!(sys.sim.chat_calls().await, 18);
    });
}

#[test]
fn a_client_is_counted_once_across_the_hub_and_an_edge() {
    run(async {
        not_at_midnight().await;
        // Two answers a day; the edge's API charges the hub's bucket through the hub's domain.
        let sys = priced(System::builder().workers(1).edges(1), "0.8")
            .sim_env("VERSUS_SIM_TTFT_MS", "50")
            .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "400")
            .sim_env("VERSUS_SIM_ANSWER_TOKENS", "40")
            .start()
            .await;
        let (hub, edge) = (sys.api_url().to_owned(), sys.edges[0].api_url().to_owned());
        let client = "203.0.113.50";
        assert!(ask(&hub, "Kraken 1", client).await.is_ok());
        assert!(ask(&edge, "Kraken 2", client).await.is_ok());
        for api in [&edge, &hub] {
            let refused = ask(api, "Kraken 3", client).await;
            until_midnight_utc(refused.expect_err("past the quota"));
        }
        assert_eq!(
            charged(&sys, &format!("ip4.{client}")).await,
            micros(2.0 * ANSWER_USD)
        );
        assert!(ask(&edge, "Kraken 3", "203.0.113.51").await.is_ok());
        assert_eq!(sys.sim.chat_calls().await, 3);
    });
}
