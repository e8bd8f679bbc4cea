//! The session layer on a real ZooKeeper: registrations live with the session, come back after
//! it expires, survive a server restart (writes made while it is away land when it is back),
//! and a storm of them is pipelined.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test helper is that test failing

use std::time::{Duration, Instant};

use clickpulse_cluster::{ZkConfig, ZkError, ZkSession, zk};
use clickpulse_tests::proxy::Proxy;
use clickpulse_tests::{ZkOptions, ZooKeeper, eventually, unique_name};
use tokio_util::sync::CancellationToken;

fn config(zk: &ZooKeeper) -> ZkConfig {
    ZkConfig {
        connect: zk.connect_string().to_owned(),
        session_timeout: Duration::from_secs(4),
        connect_timeout: Duration::from_secs(10),
    }
}

/// An independent client to look at the tree.
async fn observer(zk: &ZooKeeper) -> zk::Client {
    zk::Client::connect(zk.connect_string()).await.unwrap()
}

#[tokio::test]
async fn a_registration_is_an_ephemeral_of_the_session_and_goes_with_it() {
    let zk = ZooKeeper::start().unwrap();
    let root = format!("/{}", unique_name("t"));
    let session = ZkSession::connect(config(&zk), &CancellationToken::new())
        .await
        .unwrap();
    let path = format!("{root}/gateways/gw-1");
    session.register(&path, b"hello".to_vec()).await.unwrap();
    let look = observer(&zk).await;
    let (data, stat) = look.get_data(&path).await.unwrap();
    assert_eq!(data, b"hello");
    assert_eq!(stat.ephemeral_owner, session.session_id().unwrap());
    // registering again updates the payload
    session.register(&path, b"again".to_vec()).await.unwrap();
    assert_eq!(look.get_data(&path).await.unwrap().0, b"again");
    session.close().await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            look.check_stat(&path).await.unwrap().is_none()
        })
        .await,
        "the node outlived its session"
    );
}

#[tokio::test]
async fn registrations_come_back_after_a_network_cut_expires_the_session() {
    let zk = ZooKeeper::start().unwrap();
    let proxy = Proxy::start(zk.connect_string().parse().unwrap())
        .await
        .unwrap();
    let root = format!("/{}", unique_name("t"));
    let cfg = ZkConfig {
        connect: proxy.addr().to_string(),
        session_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(10),
    };
    let session = ZkSession::connect(cfg, &CancellationToken::new())
        .await
        .unwrap();
    let a = format!("{root}/tenants/acme/clients/gw-1.c-1");
    let b = format!("{root}/tenants/acme/clients/gw-1.c-2");
    session.register(&a, b"a".to_vec()).await.unwrap();
    session.register(&b, b"b".to_vec()).await.unwrap();
    session.deregister(&b).await.unwrap();
    let old = session.session_id().unwrap();

    // Cut the network for longer than the session timeout: the server expires the session
    // and deletes its ephemerals.
    proxy.cut();
    let look = observer(&zk).await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            look.check_stat(&a).await.unwrap().is_none()
        })
        .await,
        "the server did not expire the cut-off session"
    );
    proxy.restore();

    let back = eventually(Duration::from_secs(30), || async {
        matches!(look.get_data(&a).await, Ok((_, stat)) if stat.ephemeral_owner != old && stat.ephemeral_owner != 0)
    })
    .await;
    assert!(back, "the registration did not come back on a new session");
    assert_eq!(session.generation(), 2);
    assert_ne!(session.session_id().unwrap(), old);
    assert_eq!(look.get_data(&a).await.unwrap().0, b"a");
    assert!(
        look.check_stat(&b).await.unwrap().is_none(),
        "a deregistered node was recreated"
    );
    session.close().await;
}

#[tokio::test]
async fn a_zookeeper_restart_is_survived_without_manual_action() {
    let mut zk = ZooKeeper::start_private(ZkOptions::default()).unwrap();
    let root = format!("/{}", unique_name("t"));
    let session = ZkSession::connect(config(&zk), &CancellationToken::new())
        .await
        .unwrap();
    let path = format!("{root}/engines/e-1");
    session.register(&path, b"e".to_vec()).await.unwrap();
    zk.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    zk.restart().unwrap();
    let look = observer(&zk).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            look.get_data(&path).await.is_ok()
        })
        .await,
        "the registration is gone after a ZooKeeper restart"
    );
    // and the session still works for new registrations
    session
        .register(&format!("{root}/engines/e-2"), vec![])
        .await
        .unwrap();
    session.close().await;
}

/// Kills the server and waits until the client library has given `session` up for expired
/// (it could not reconnect within the session timeout).
async fn kill_until_expired(zk: &mut ZooKeeper, session: &ZkSession) {
    zk.kill();
    assert!(
        eventually(Duration::from_secs(15), || async {
            session.client().unwrap().state() == zk::SessionState::Expired
        })
        .await,
        "the client library did not give the session up"
    );
}

#[tokio::test]
async fn writes_made_while_zookeeper_is_down_land_when_it_is_back() {
    let mut zk = ZooKeeper::start_private(ZkOptions::default()).unwrap();
    let root = format!("/{}", unique_name("t"));
    let session = std::sync::Arc::new(
        ZkSession::connect(config(&zk), &CancellationToken::new())
            .await
            .unwrap(),
    );
    let leaving = format!("{root}/tenants/acme/clients/gw-1.c-1");
    let arriving = format!("{root}/tenants/acme/clients/gw-1.c-2");
    session.register(&leaving, b"a".to_vec()).await.unwrap();

    // A client connects and another leaves while the server is away, after the client library
    // has given the session up for expired (it could not reconnect within the session
    // timeout) and before a new session is open: neither write may be given up on (the one
    // would never start its job, the other would keep a job running).
    kill_until_expired(&mut zk, &session).await;
    let writes = {
        let (session, leaving, arriving) = (session.clone(), leaving.clone(), arriving.clone());
        tokio::spawn(async move {
            let registered = session.register(&arriving, b"b".to_vec()).await;
            let deregistered = session.deregister(&leaving).await;
            (registered, deregistered)
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !writes.is_finished(),
        "a write failed at once: {:?}",
        writes.await
    );
    zk.restart().unwrap();
    let (registered, deregistered) = tokio::time::timeout(Duration::from_secs(20), writes)
        .await
        .expect("the writes are still waiting after the server came back")
        .unwrap();
    registered.unwrap();
    deregistered.unwrap();

    let look = observer(&zk).await;
    let (data, stat) = look.get_data(&arriving).await.unwrap();
    assert_eq!(data, b"b");
    assert_eq!(stat.ephemeral_owner, session.session_id().unwrap());
    assert!(look.check_stat(&leaving).await.unwrap().is_none());
    session.close().await;
}

#[tokio::test]
async fn nodes_deregistered_while_the_session_is_replaced_stay_deleted() {
    // After an expiry the new session recreates every owned node, retrying while the old
    // session's copies are still there; clients leaving meanwhile must not come back with it
    // (each would keep its tenant's job running for good).
    let mut zk = ZooKeeper::start_private(ZkOptions::default()).unwrap();
    let root = format!("/{}", unique_name("t"));
    let clients = format!("{root}/tenants/acme/clients");
    let session = std::sync::Arc::new(
        ZkSession::connect(config(&zk), &CancellationToken::new())
            .await
            .unwrap(),
    );
    let paths: Vec<String> = (0..1_000)
        .map(|i| format!("{clients}/gw-1.c-{i}"))
        .collect();
    let registered = paths
        .iter()
        .map(|path| session.register(path, b"a".to_vec()));
    for result in futures_util::future::join_all(registered).await {
        result.unwrap();
    }
    kill_until_expired(&mut zk, &session).await;
    zk.restart().unwrap();
    // Leaving, one every 8 ms, all through the recreation: while the old session's copies
    // are there, and as it ends.
    let mut leaving = Vec::new();
    for path in paths {
        let session = session.clone();
        leaving.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(30), session.deregister(&path)).await
        }));
        tokio::time::sleep(Duration::from_millis(8)).await;
    }
    for left in leaving {
        left.await
            .unwrap()
            .expect("a deregistration still waiting")
            .unwrap();
    }
    // The old session's copies go when the restarted server expires it; none may be left.
    let look = observer(&zk).await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            look.get_children(&clients)
                .await
                .map(|(children, _)| children.is_empty())
                .unwrap_or(false)
        })
        .await,
        "left: {:?}",
        look.get_children(&clients).await.map(|(c, _)| c)
    );
    session.close().await;
}

#[tokio::test]
async fn an_unreachable_zookeeper_is_a_clear_error_within_the_connect_timeout() {
    let port = clickpulse_tests::process::free_port().unwrap();
    let cfg = ZkConfig {
        connect: format!("127.0.0.1:{port}"),
        session_timeout: Duration::from_secs(4),
        connect_timeout: Duration::from_secs(2),
    };
    let start = Instant::now();
    let err = ZkSession::connect(cfg, &CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, ZkError::Unreachable { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "gave up after {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn a_storm_of_registrations_is_pipelined_and_all_land() {
    let zk = ZooKeeper::start().unwrap();
    let root = format!("/{}", unique_name("t"));
    let session = ZkSession::connect(config(&zk), &CancellationToken::new())
        .await
        .unwrap();
    session
        .ensure_path(&format!("{root}/tenants/acme/clients"))
        .await
        .unwrap();
    let nodes: Vec<(String, Vec<u8>)> = (0..5_000)
        .map(|i| {
            (
                format!("{root}/tenants/acme/clients/gw-1.c-{i}"),
                b"{}".to_vec(),
            )
        })
        .collect();
    let start = Instant::now();
    session.register_many(nodes).await.unwrap();
    let took = start.elapsed();
    let look = observer(&zk).await;
    let (children, _) = look
        .get_children(&format!("{root}/tenants/acme/clients"))
        .await
        .unwrap();
    assert_eq!(children.len(), 5_000);
    assert_eq!(session.owned().len(), 5_000);
    eprintln!(
        "5000 registrations in {took:?} ({:.0}/s; a figure, not a test)",
        5_000.0 / took.as_secs_f64()
    );
    session.close().await;
}

/// All nodes created by one `multi` transaction share its zxid: the distinct creation zxids
/// of a storm's nodes count the transactions it took.
#[tokio::test]
async fn registrations_and_deregistrations_queued_together_go_in_few_transactions() {
    let zk = ZooKeeper::start().unwrap();
    let root = format!("/{}", unique_name("t"));
    let session = ZkSession::connect(config(&zk), &CancellationToken::new())
        .await
        .unwrap();
    let parent = format!("{root}/tenants/acme/clients");
    session.ensure_path(&parent).await.unwrap();
    let paths: Vec<String> = (0..1_000).map(|i| format!("{parent}/gw-1.c-{i}")).collect();
    let results = futures_util::future::join_all(
        paths
            .iter()
            .map(|path| session.register(path, b"{}".to_vec())),
    )
    .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let look = observer(&zk).await;
    let mut transactions = std::collections::BTreeSet::new();
    for path in &paths {
        transactions.insert(look.check_stat(path).await.unwrap().unwrap().czxid);
    }
    let fewest = paths.len().div_ceil(clickpulse_cluster::MULTI_MAX);
    assert!(
        (fewest..=2 * fewest).contains(&transactions.len()),
        "{} registrations took {} transactions (at best {fewest})",
        paths.len(),
        transactions.len()
    );

    // Leaving together is batched too. Each transaction takes one zxid: the creation zxids
    // of two nodes made before and after the deregistrations count the ones between.
    let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    let (before, _) = look
        .create(&format!("{root}/before"), &[], &persistent)
        .await
        .unwrap();
    let results =
        futures_util::future::join_all(paths.iter().map(|path| session.deregister(path))).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let (after, _) = look
        .create(&format!("{root}/after"), &[], &persistent)
        .await
        .unwrap();
    let between = after.czxid - before.czxid - 1;
    assert!(
        (fewest as i64..=2 * fewest as i64).contains(&between),
        "{} deregistrations took {between} transactions (at best {fewest})",
        paths.len()
    );
    assert!(look.get_children(&parent).await.unwrap().0.is_empty());
    assert!(session.owned().is_empty());
    session.close().await;
}

#[tokio::test]
async fn a_node_held_by_another_session_is_not_taken_over() {
    let zk = ZooKeeper::start().unwrap();
    let root = format!("/{}", unique_name("t"));
    let first = ZkSession::connect(config(&zk), &CancellationToken::new())
        .await
        .unwrap();
    let second = ZkSession::connect(config(&zk), &CancellationToken::new())
        .await
        .unwrap();
    let path = format!("{root}/tenants/acme/owner");
    first.register(&path, b"first".to_vec()).await.unwrap();
    let err = second
        .register(&path, b"second".to_vec())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ZkError::Taken { owner, .. } if owner == first.session_id().unwrap()),
        "{err}"
    );
    first.close().await;
    second.close().await;
}

#[tokio::test]
async fn concurrent_registrations_are_batched_and_each_gets_its_own_answer() {
    let zk = ZooKeeper::start().unwrap();
    let root = format!("/{}", unique_name("t"));
    let session = ZkSession::connect(config(&zk), &CancellationToken::new())
        .await
        .unwrap();
    let other = ZkSession::connect(config(&zk), &CancellationToken::new())
        .await
        .unwrap();
    // Already there: one of this session's nodes (updated), one of another session's
    // (refused), and parents missing for a whole tenant (created on the way).
    let mine = format!("{root}/tenants/acme/clients/gw-1.c-mine");
    let theirs = format!("{root}/tenants/acme/clients/gw-2.c-theirs");
    session.register(&mine, b"old".to_vec()).await.unwrap();
    other.register(&theirs, b"other".to_vec()).await.unwrap();
    let mut paths: Vec<String> = (0..600)
        .map(|i| {
            let tenant = ["acme", "globex", "initech"][i % 3];
            format!("{root}/tenants/{tenant}/clients/gw-1.c-{i}")
        })
        .collect();
    paths.push(mine.clone());
    paths.push(theirs.clone());
    let results = futures_util::future::join_all(
        paths
            .iter()
            .map(|path| session.register(path, path.as_bytes().to_vec())),
    )
    .await;
    let look = observer(&zk).await;
    for (path, result) in paths.iter().zip(&results) {
        if *path == theirs {
            assert!(
                matches!(result, Err(ZkError::Taken { owner, .. }) if *owner == other.session_id().unwrap()),
                "{result:?}"
            );
            assert_eq!(look.get_data(path).await.unwrap().0, b"other");
        } else {
            assert!(result.is_ok(), "{path}: {result:?}");
            let (data, stat) = look.get_data(path).await.unwrap();
            assert_eq!(data, path.as_bytes());
            assert_eq!(stat.ephemeral_owner, session.session_id().unwrap());
        }
    }
    assert_eq!(session.owned().len(), 601, "every node it holds, once");

    // Updates at the same time are batched too; one of them finds its node gone and
    // creates it again.
    look.delete(&paths[0], None).await.unwrap();
    let updated = futures_util::future::join_all(
        paths[..600]
            .iter()
            .map(|path| session.update(path, format!("{path}!").into_bytes())),
    )
    .await;
    for (path, result) in paths.iter().zip(&updated) {
        assert!(result.is_ok(), "{path}: {result:?}");
        assert_eq!(
            look.get_data(path).await.unwrap().0,
            format!("{path}!").as_bytes()
        );
    }
    session.close().await;
    other.close().await;
}
