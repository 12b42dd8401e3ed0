//! One session-svc over several inference-svc replicas, each with its own
//! fake vLLM (one per GPU): sessions stay on one replica, each replica keeps
//! its limit of 8, a dead model server's sessions move and come back, and a
//! new replica takes about its share.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use palaver_testkit::fake_vllm::FakeVllmConfig;
use palaver_tests::cluster::{cluster, session, turn, Cluster, HEALTH_INTERVAL};
use tokio::time::Instant;
use tonic::transport::Channel;

/// Which replica (index) saw each session, from the fakes' `x-session-id`
/// records; panics if one session reached two.
fn owners(c: &Cluster) -> HashMap<String, usize> {
    let mut owner = HashMap::new();
    for (i, r) in c.replicas.iter().enumerate() {
        for s in r.fake.sessions().into_keys() {
            if let Some(j) = owner.insert(s.clone(), i) {
                panic!("session {s} reached replicas {j} and {i}");
            }
        }
    }
    owner
}

async fn forty_sessions_five_turns(n: usize) {
    let c = cluster(
        n,
        n,
        FakeVllmConfig {
            ttft: Duration::from_millis(20),
            tpot: Duration::from_millis(2),
            tokens: 4,
            ..FakeVllmConfig::default()
        },
    )
    .await;
    let sessions = (0..40).map(|i| {
        let client = c.client.clone();
        async move {
            for t in 0..5 {
                let text = turn(client.clone(), session(i), t, i % 2 == 0)
                    .await
                    .unwrap_or_else(|s| panic!("{} turn {t}: {s:?}", session(i)));
                assert!(text.contains(&format!("turn {t}")), "{text}");
            }
        }
    });
    join_all(sessions).await;

    let owner = owners(&c);
    assert_eq!(owner.len(), 40, "every session reached a fake");
    let requests: usize = c.replicas.iter().map(|r| r.fake.requests()).sum();
    assert_eq!(requests, 200, "one request per turn, none retried");
    for (i, r) in c.replicas.iter().enumerate() {
        for (s, turns) in r.fake.sessions() {
            assert_eq!(turns, 5, "{s} on replica {i}");
        }
        let mine = owner.values().filter(|o| **o == i).count();
        assert!(mine >= 4, "replica {i} has {mine} of 40 sessions");
        assert!(
            r.fake.max_in_flight() <= 8,
            "replica {i} ran {} at once",
            r.fake.max_in_flight()
        );
    }
    let peak: usize = c.replicas.iter().map(|r| r.fake.max_in_flight()).sum();
    assert!(
        peak > 8,
        "the replicas together ran more than one GPU's 8 (peaks summed: {peak})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_keep_each_session_on_one_and_eight_each() {
    forty_sessions_five_turns(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_keep_each_session_on_one_and_eight_each() {
    forty_sessions_five_turns(3).await;
}

/// Polls `cond` until it holds; how long that took.
async fn within(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_model_server_s_sessions_move_and_come_back_without_a_lost_turn() {
    let c = cluster(
        3,
        3,
        FakeVllmConfig {
            ttft: Duration::from_millis(30),
            tpot: Duration::from_millis(5),
            tokens: 4,
            ..FakeVllmConfig::default()
        },
    )
    .await;
    let sessions = 30;
    join_all((0..sessions).map(|i| turn(c.client.clone(), session(i), 0, false)))
        .await
        .into_iter()
        .for_each(|r| {
            r.unwrap();
        });
    let before = owners(&c);
    let on_dead: HashSet<String> = before
        .iter()
        .filter(|(_, o)| **o == 0)
        .map(|(s, _)| s.clone())
        .collect();
    assert!(!on_dead.is_empty(), "replica 0 has sessions");
    for r in &c.replicas {
        r.fake.reset_stats();
    }

    // Every session keeps chatting, half of them streamed, while replica
    // 0's model server dies and comes back.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let load = (0..sessions).map(|i| {
        let (client, stop, done) = (c.client.clone(), stop.clone(), done.clone());
        tokio::spawn(async move {
            let mut t = 1;
            while !stop.load(Ordering::SeqCst) {
                let text = turn(client.clone(), session(i), t, i % 2 == 1)
                    .await
                    .unwrap_or_else(|s| panic!("{} turn {t} lost: {s:?}", session(i)));
                assert!(text.contains(&format!("turn {t}")), "{text}");
                done.fetch_add(1, Ordering::SeqCst);
                t += 1;
            }
        })
    });
    let load: Vec<_> = load.collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    c.replicas[0].fake.stop_listening().await;
    let dead_url = c.replicas[0].url.clone();
    // The model server's check, then session-svc's probe: two intervals;
    // the limit leaves room for a loaded 2-core machine.
    let ejected_in = within("replica 0 ejected", HEALTH_INTERVAL * 15, || {
        c.balancer.ejected().contains(&dead_url)
    })
    .await;
    c.replicas[0].fake.reset_stats();
    let moved_from = done.load(Ordering::SeqCst);
    // Its sessions are served by the others meanwhile.
    within(
        "the dead replica's sessions served elsewhere",
        Duration::from_secs(5),
        || {
            let seen: HashSet<String> = c.replicas[1..]
                .iter()
                .flat_map(|r| r.fake.sessions().into_keys())
                .collect();
            on_dead.iter().all(|s| seen.contains(s))
        },
    )
    .await;
    assert_eq!(
        c.replicas[0].fake.requests(),
        0,
        "nothing sent to the dead server"
    );

    c.replicas[0].fake.listen_again().await;
    let back_in = within("replica 0 re-admitted", HEALTH_INTERVAL * 15, || {
        c.balancer.ejected().is_empty()
    })
    .await;
    within("its sessions back on it", Duration::from_secs(5), || {
        let seen = c.replicas[0].fake.sessions();
        on_dead.iter().all(|s| seen.contains_key(s))
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.expect("no turn lost");
    }
    assert!(done.load(Ordering::SeqCst) > moved_from, "turns went on");
    eprintln!("ejected after {ejected_in:?}, re-admitted after {back_in:?}");

    // Sessions of the live replicas never moved.
    for (i, r) in c.replicas.iter().enumerate().skip(1) {
        for s in r.fake.sessions().into_keys() {
            let was = before[&s];
            assert!(was == i || was == 0, "{s} moved from {was} to {i}");
        }
    }
    // And now each session is where it was before.
    for r in &c.replicas {
        r.fake.reset_stats();
    }
    join_all((0..sessions).map(|i| turn(c.client.clone(), session(i), 1000, false)))
        .await
        .into_iter()
        .for_each(|r| {
            r.unwrap();
        });
    assert_eq!(owners(&c), before, "every session back on its replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_added_takes_about_its_share_and_the_rest_stay() {
    let c = cluster(
        3,
        2,
        FakeVllmConfig {
            ttft: Duration::from_millis(5),
            tpot: Duration::ZERO,
            tokens: 2,
            ..FakeVllmConfig::default()
        },
    )
    .await;
    let sessions = 90;
    let round = |n: usize| {
        let client = c.client.clone();
        async move {
            join_all((0..sessions).map(|i| turn(client.clone(), session(i), n, false)))
                .await
                .into_iter()
                .for_each(|r| {
                    r.unwrap();
                });
        }
    };
    round(0).await;
    let before = owners(&c);
    assert_eq!(c.replicas[2].fake.requests(), 0, "replica 2 not known yet");

    let urls: Vec<String> = c.replicas.iter().map(|r| r.url.clone()).collect();
    c.balancer.set_endpoints(&urls).unwrap();
    for r in &c.replicas {
        r.fake.reset_stats();
    }
    round(1).await;
    let after = owners(&c);
    let moved: Vec<&String> = after.keys().filter(|s| after[*s] != before[*s]).collect();
    // 1/3 expected (30 of 90); the bounds are over 3 standard deviations.
    assert!(
        (15..=45).contains(&moved.len()),
        "{} of {sessions} sessions moved",
        moved.len()
    );
    assert!(
        moved.iter().all(|s| after[*s] == 2),
        "only to the new replica"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_svc_is_not_serving_while_its_model_server_is_down() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let c = cluster(1, 1, FakeVllmConfig::default()).await;
    let mut health = HealthClient::new(
        Channel::from_shared(c.replicas[0].url.clone())
            .unwrap()
            .connect_lazy(),
    );
    let probe = health.clone();
    let status = || {
        let mut h = probe.clone();
        async move {
            let req = HealthCheckRequest {
                service: "palaver.inference.v1.Inference".into(),
            };
            h.check(req).await.unwrap().into_inner().status
        }
    };
    let serving = ServingStatus::Serving as i32;
    assert_eq!(status().await, serving);
    c.replicas[0].fake.stop_listening().await;
    let start = Instant::now();
    while status().await == serving {
        assert!(start.elapsed() < HEALTH_INTERVAL * 15, "still SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status().await, ServingStatus::NotServing as i32);
    // The overall status stays SERVING: restarting would not help.
    let overall = health
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(overall, serving);
    c.replicas[0].fake.listen_again().await;
    let start = Instant::now();
    while status().await != serving {
        assert!(start.elapsed() < HEALTH_INTERVAL * 15, "not SERVING again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_inference_svc_s_sessions_move_without_a_lost_turn() {
    let c = cluster(
        3,
        3,
        FakeVllmConfig {
            ttft: Duration::from_millis(30),
            tpot: Duration::from_millis(5),
            tokens: 4,
            ..FakeVllmConfig::default()
        },
    )
    .await;
    let sessions = 30;
    join_all((0..sessions).map(|i| turn(c.client.clone(), session(i), 0, false)))
        .await
        .into_iter()
        .for_each(|r| {
            r.unwrap();
        });
    let before = owners(&c);
    let on_stopped: HashSet<String> = before
        .iter()
        .filter(|(_, o)| **o == 1)
        .map(|(s, _)| s.clone())
        .collect();
    assert!(!on_stopped.is_empty(), "replica 1 has sessions");

    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..sessions)
        .map(|i| {
            let (client, stop) = (c.client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut t = 1;
                while !stop.load(Ordering::SeqCst) {
                    turn(client.clone(), session(i), t, i % 2 == 0)
                        .await
                        .unwrap_or_else(|s| panic!("{} turn {t} lost: {s:?}", session(i)));
                    t += 1;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The process goes away: running turns drain, then its port refuses.
    c.replicas[1].stop.cancel();
    let stopped_url = c.replicas[1].url.clone();
    within("replica 1 ejected", HEALTH_INTERVAL * 15, || {
        c.balancer.ejected().contains(&stopped_url)
    })
    .await;
    // Generations it admitted before it stopped still drain to its model
    // server; count only what comes after.
    within("replica 1 drained", HEALTH_INTERVAL * 15, || {
        c.replicas[1].fake.in_flight() == 0
    })
    .await;
    tokio::time::sleep(HEALTH_INTERVAL).await;
    for r in &c.replicas {
        r.fake.reset_stats();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.expect("no turn lost");
    }
    assert_eq!(c.replicas[1].fake.requests(), 0, "nothing reaches it");
    let seen: HashSet<String> = c.replicas[..]
        .iter()
        .flat_map(|r| r.fake.sessions().into_keys())
        .collect();
    assert!(
        on_stopped.iter().all(|s| seen.contains(s)),
        "its sessions are served by the others"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_name_is_resolved_to_its_replicas() {
    use palaver_proto::session::v1::sessions_client::SessionsClient;
    use prometheus_client::registry::Registry;

    let c = cluster(1, 1, FakeVllmConfig::default()).await;
    let port = c.replicas[0].url.rsplit(':').next().unwrap().to_owned();
    let mut cfg = session_svc::Config::new(format!("dns://localhost:{port}"));
    cfg.projects = palaver_tests::cluster::roomy_projects();
    cfg.balance.refresh = Duration::from_millis(200);
    let server = session_svc::Server::new(
        cfg,
        session_svc::MemoryStore::new(),
        &mut Registry::default(),
    )
    .unwrap();
    let balancer = server.balancer();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(server.serve(listener, c.shutdown.clone()));
    let client = SessionsClient::connect(url).await.unwrap();

    let replica = format!("http://127.0.0.1:{port}");
    within("localhost resolved", Duration::from_secs(5), || {
        balancer.route("s").contains(&replica)
    })
    .await;
    // localhost may also be ::1, where nothing listens: turns still succeed
    // (retried on 127.0.0.1, and ::1 ejected).
    for t in 0..5 {
        turn(client.clone(), session(0), t, t % 2 == 0)
            .await
            .unwrap_or_else(|s| panic!("turn {t}: {s:?}"));
    }
    assert_eq!(c.replicas[0].fake.requests(), 5);
}
