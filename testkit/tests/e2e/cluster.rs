//! `scripts/cluster`, run as a user runs it: a three-node hub, two edges with an API each, two
//! workers and the simulator on this machine. An answer made through one edge is a hit at the
//! other, and Ctrl-C stops everything.

use std::time::Duration;

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tokio::time::Instant;
use versus_testkit::eventually;

use crate::dev::{STOP_TIMEOUT, Script, free_ports, runs};
use crate::{fight_at, run, text_of};

/// How long scripts/cluster may take to print its edges (a new Postgres cluster and a hub
/// electing its leaders included; it builds nothing: the test points it at the binaries that
/// are there).
const UP_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the answer may take to reach the other edge's mirror.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// Every program it starts (one pid file each), with the program each runs.
const PROGRAMS: [(&str, &str); 10] = [
    ("hub1", "nats-server"),
    ("hub2", "nats-server"),
    ("hub3", "nats-server"),
    ("edge1", "nats-server"),
    ("edge2", "nats-server"),
    ("api-edge1", "versus-api"),
    ("api-edge2", "versus-api"),
    ("worker1", "versus-worker"),
    ("worker2", "versus-worker"),
    ("sim", "versus-sim"),
];

#[test]
fn scripts_cluster_answers_at_one_edge_hits_at_the_other_and_stops_on_ctrl_c() {
    run(async {
        let ports = free_ports(18);
        let list = |from: usize, n: usize| {
            ports[from..from + n]
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut cluster = Script::start(
            "cluster",
            &[
                ("VERSUS_HUB_PORTS", list(0, 3)),
                ("VERSUS_HUB_MONITOR_PORTS", list(3, 3)),
                ("VERSUS_HUB_CLUSTER_PORTS", list(6, 3)),
                ("VERSUS_HUB_LEAF_PORTS", list(9, 3)),
                // Commas work as well as spaces.
                ("VERSUS_EDGE_PORTS", list(12, 2).replace(' ', ",")),
                ("VERSUS_EDGE_MONITOR_PORTS", list(14, 2)),
                ("VERSUS_PG_PORT", ports[16].to_string()),
                ("VERSUS_SIM_ADDR", format!("127.0.0.1:{}", ports[17])),
                // The APIs pick their ports; the script prints them.
                (
                    "VERSUS_EDGE_HTTP_ADDRS",
                    "127.0.0.1:0 127.0.0.1:0".to_owned(),
                ),
                // Quick answers: 40 tokens at 400 tokens/s after 50 ms.
                ("VERSUS_SIM_TTFT_MS", "50".to_owned()),
                ("VERSUS_SIM_TOKENS_PER_SEC", "400".to_owned()),
                ("VERSUS_SIM_ANSWER_TOKENS", "40".to_owned()),
            ],
        );

        // One line per edge API, exactly `edge NAME URL`.
        let mut apis = Vec::new();
        for name in ["edge1", "edge2"] {
            let line = cluster
                .line(&format!("edge {name} "), UP_TIMEOUT)
                .await
                .unwrap_or_else(|| panic!("scripts/cluster prints the line of {name}"));
            let words: Vec<&str> = line.split(' ').collect();
            assert!(
                words.len() == 3
                    && words[..2] == ["edge", name]
                    && words[2].starts_with("http://127.0.0.1:"),
                "not `edge {name} URL`: {line:?}"
            );
            apis.push(words[2].to_owned());
        }
        assert_ne!(apis[0], apis[1]);

        // A pid file per program, each naming a process that runs it; Postgres runs too.
        for (name, program) in PROGRAMS {
            let (pid, path) = cluster
                .pid_file(name)
                .unwrap_or_else(|| panic!("no pid file for {name}"));
            assert!(path.ends_with(&format!("/{program}")), "{name} runs {path}");
            assert!(runs(pid, &path), "{name} (pid {pid}) does not run");
        }
        assert!(cluster.postmaster().is_some(), "Postgres runs");
        // Each edge's own leaf login's password is kept with the others, and no log shows one.
        let users: Vec<String> = cluster
            .nats_passwords()
            .into_iter()
            .map(|(user, _)| user)
            .collect();
        assert_eq!(
            users,
            ["ADMIN", "API", "WORKER", "LEAF_EDGE1", "LEAF_EDGE2"]
        );
        cluster.assert_no_password_shown();
        // The hub's configuration lists each edge's login, and reads its password from the
        // environment rather than holding it.
        let hub_conf = std::fs::read_to_string(cluster.data.join("nats/conf/hub.conf")).unwrap();
        for edge in ["edge1", "edge2"] {
            assert!(
                hub_conf.contains(&format!("versus-leaf-{edge}")),
                "{hub_conf}"
            );
        }
        for (user, password) in cluster.nats_passwords() {
            assert!(
                !hub_conf.contains(&password),
                "hub.conf holds {user}'s password"
            );
        }

        // A new answer through edge 1.
        let events = fight_at(&apis[0], "Cluster Knight", "Hub Dragon").await;
        assert_eq!(
            events.last().map(|e| e.event.as_str()),
            Some("done"),
            "{events:?}"
        );
        assert_eq!(events[0].json()["cached"], false, "{events:?}");
        let text = text_of(&events);
        assert!(!text.is_empty());

        // The same matchup at edge 2 is a hit with the same text, once its mirror has it.
        let deadline = Instant::now() + MIRROR_TIMEOUT;
        loop {
            let events = fight_at(&apis[1], "hub dragon", "CLUSTER KNIGHT").await;
            let done = events.last().is_some_and(|e| e.event == "done");
            if done && events[0].json()["cached"] == true {
                assert_eq!(text_of(&events), text);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no hit at edge 2 within {MIRROR_TIMEOUT:?}: {events:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Ctrl-C: everything it started stops, Postgres included, and it exits 0.
        let started = cluster.started();
        assert_eq!(
            started.len(),
            PROGRAMS.len() + 1,
            "the programs and Postgres: {started:?}"
        );
        assert!(
            cluster.child.try_wait().unwrap().is_none(),
            "scripts/cluster still runs"
        );
        signal::killpg(Pid::from_raw(cluster.pid), Signal::SIGINT).unwrap();
        let status = tokio::time::timeout(STOP_TIMEOUT, cluster.child.wait())
            .await
            .unwrap_or_else(|_| panic!("scripts/cluster did not stop within {STOP_TIMEOUT:?}"))
            .unwrap();
        assert_eq!(status.code(), Some(0), "{status}");
        eventually(
            "every process scripts/cluster started is gone",
            Duration::from_secs(10),
            || {
                let left = started.iter().any(|(pid, program)| runs(*pid, program));
                async move { !left }
            },
        )
        .await;
        let left = cluster.pid_files();
        assert!(
            left.is_empty(),
            "scripts/cluster removes its pid files: {left:?}"
        );
    });
}
