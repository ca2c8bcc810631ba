//! Rotating the job-signing key under a live fleet, with real agents, real QUIC and the real
//! `sensei-control-plane job-key …` commands: connected agents pin the new key (endorsed by
//! the old one) over their existing trust stream, acknowledge it and keep deploying without a
//! restart; an agent offline during the whole overlap is listed, and once the old key is
//! retired its agent refuses the jobs (signed by a key it never pinned), which the deployment
//! says; `job-key retire` refuses while a connected agent has not acknowledged (an agent too
//! old to follow, here) and says which. A session driven by the test shows which key signs a
//! server's jobs: the old one until its agent's watch named the new one, the new one after.

use std::time::Duration;

use sensei_agent::identity::Identity;
use sensei_certs::Fingerprint;
use sensei_e2e::{eventually, git_repo, open_tempdir, TestAgent, TestPlane};
use sensei_shared::codec::io::{read_frame, write_frame};
use sensei_shared::job::{verify, Expectations, SignedJob};
use sensei_shared::job_key::{JobKeyEndorsement, JobKeySet};
use sensei_shared::protocol::{AgentMessage, ControlMessage};
use serde_json::{json, Value};
use uuid::Uuid;

use super::rotation::{deploy_succeeds, maintenance, OlderAgent};

const PW: &str = "correct horse battery";

async fn job_key(t: &TestPlane, args: &[&str]) -> (i32, String, String) {
    maintenance(t, "job-key", args).await
}

/// The public key stored under `name` (`job-signing`, `job-signing.previous`), if any.
async fn stored_key(t: &TestPlane, name: &str) -> Option<[u8; 32]> {
    t.db()
        .await
        .query_opt(
            "SELECT public_key FROM signing_keys WHERE name = $1",
            &[&name],
        )
        .await
        .expect("signing_keys")
        .map(|r| r.get::<_, &[u8]>(0).try_into().expect("32 bytes"))
}

/// The key the control plane recorded as acknowledged by `server`'s agent.
async fn acknowledged(t: &TestPlane, server: Uuid) -> Option<Vec<u8>> {
    t.db()
        .await
        .query_one(
            "SELECT job_key_acknowledged FROM servers WHERE id = $1",
            &[&server],
        )
        .await
        .expect("server")
        .get(0)
}

fn pinned(agent: &TestAgent) -> Vec<[u8; 32]> {
    agent
        .state
        .job_keys()
        .map(|keys| keys.raw())
        .unwrap_or_default()
}

/// Queues a deploy of `project` to `server` and takes the job as an agent would, polling on
/// `connection` (a session that said hello): returns the signed job the control plane sent.
async fn queue_and_poll(
    t: &TestPlane,
    cookie: &str,
    project: &Value,
    server: Uuid,
    connection: &quinn::Connection,
) -> SignedJob {
    let (status, d) = t
        .post(
            "/v1/deployments",
            cookie,
            json!({"project_id": project["id"], "server_id": server, "ref": "main"}),
        )
        .await;
    assert_eq!(status, 201, "{d}");
    match sensei_e2e::poll_on(connection).await {
        (_, _, Some(ControlMessage::Job(job))) => job,
        (_, _, other) => panic!("expected a job within 20 s: {other:?}"),
    }
}

/// Whether `job`, for the identity `identity`, verifies under exactly the keys `keys`.
fn signed_by(job: &SignedJob, identity: &Identity, keys: &[[u8; 32]]) -> bool {
    let keys = JobKeySet::new(keys).expect("keys");
    let cert = sensei_certs::tls::first_cert_der(&identity.cert_pem).expect("certificate");
    verify(
        job,
        &Expectations {
            keys: keys.keys(),
            server_id: identity.meta.server_id,
            certificate_fingerprint: *Fingerprint::of_der(&cert).as_bytes(),
            highest_sequence: 0,
            now: chrono::Utc::now().timestamp(),
        },
    )
    .is_ok()
}

async fn old_job_key_servers(t: &TestPlane, cookie: &str) -> Vec<Uuid> {
    let (status, body) = t.get("/v1/servers?job_key=old", cookie).await;
    assert_eq!(status, 200, "{body}");
    let mut ids: Vec<Uuid> = body["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .map(|s| s["id"].as_str().expect("id").parse().expect("uuid"))
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn the_job_key_rotates_under_a_live_fleet_and_an_agent_offline_throughout_is_refused_its_jobs(
) {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("jobkey@example.com", PW).await;
    let hub = t.plane.agents().clone();
    let fleet = [
        t.start_agent(&cookie, "web-1").await,
        t.start_agent(&cookie, "web-2").await,
    ];
    let mut offline = t.start_agent(&cookie, "web-offline").await;
    for agent in fleet.iter().chain([&offline]) {
        let (hub, server) = (hub.clone(), agent.server_id);
        assert!(
            eventually(Duration::from_secs(20), || {
                let hub = hub.clone();
                async move { hub.is_connected_here(server) }
            })
            .await,
            "an agent never connected"
        );
    }
    let dir = open_tempdir();
    let repo = git_repo(dir.path(), &["v1"]);
    let (status, project) = t
        .post(
            "/v1/projects",
            &cookie,
            json!({"name": "site", "repo_url": repo.display().to_string(),
                   "deploy_path": dir.path().join("app").display().to_string()}),
        )
        .await;
    assert_eq!(status, 201, "{project}");
    let old_key = stored_key(&t, "job-signing").await.expect("key");
    // Before the rotation: signed by the one key every agent pinned at enrollment.
    for agent in fleet.iter().chain([&offline]) {
        assert_eq!(pinned(agent), [old_key]);
    }
    deploy_succeeds(&t, &cookie, &project, &fleet[0]).await;
    // An agent too old to follow a rotation, enrolled before it and connected all along.
    let (older_id, token) = t.create_agent_server(&cookie, "web-older", json!({})).await;
    let older_dir = open_tempdir();
    let older_identity = sensei_agent::enroll::enroll(&t.enroll_options(&token, older_dir.path()))
        .await
        .expect("enroll");
    let older = OlderAgent::connect(&t, &older_identity).await;
    // A session driven by the test, speaking the protocol step by step, to see which key
    // signs its jobs before and after it acknowledges the new one.
    let (probe_id, token) = t.create_agent_server(&cookie, "web-probe", json!({})).await;
    let probe_dir = open_tempdir();
    let probe_identity = sensei_agent::enroll::enroll(&t.enroll_options(&token, probe_dir.path()))
        .await
        .expect("enroll");
    // One agent goes offline for the whole overlap.
    let _ = offline.stop.send(true);
    let _ = (&mut offline.task).await;
    assert!(old_job_key_servers(&t, &cookie).await.is_empty());

    // Nothing to retire before a rotation.
    let (code, _, stderr) = job_key(&t, &["retire"]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("no job-key rotation is under way"),
        "{stderr}"
    );

    let (code, stdout, stderr) = job_key(&t, &["rotate"]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let new_key = stored_key(&t, "job-signing").await.expect("new key");
    assert_ne!(new_key, old_key);
    assert_eq!(stored_key(&t, "job-signing.previous").await, Some(old_key));
    assert!(stdout.contains(&hex::encode(new_key)), "{stdout}");
    // The new private key is sealed under the field key like the first, never in clear.
    let sealed: String = t
        .db()
        .await
        .query_one(
            "SELECT private_key_ciphertext FROM signing_keys WHERE name = 'job-signing'",
            &[],
        )
        .await
        .expect("row")
        .get(0);
    assert!(sealed.starts_with("gAAAAA"), "not a Fernet token: {sealed}");
    // A second rotation before the first is retired is refused, and changes nothing.
    let (code, _, stderr) = job_key(&t, &["rotate"]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("already under way"), "{stderr}");
    assert_eq!(stored_key(&t, "job-signing").await, Some(new_key));

    // The connected fleet follows on the sessions it has: each agent pins the new key next
    // to the old one, and its watch naming it is recorded as its acknowledgement.
    for agent in &fleet {
        assert!(
            eventually(Duration::from_secs(20), || {
                let (t, server) = (&t, agent.server_id);
                let pinned = pinned(agent);
                async move {
                    pinned == [old_key, new_key]
                        && acknowledged(t, server).await.as_deref() == Some(new_key.as_slice())
                }
            })
            .await,
            "an agent did not acknowledge the new key: pins {:?}",
            pinned(agent)
        );
    }
    // Deploys after the acknowledgement, on the same sessions: no restart.
    for agent in &fleet {
        deploy_succeeds(&t, &cookie, &project, agent).await;
        assert!(!agent.task.is_finished(), "the agent stopped");
    }
    // Until a server's agent acknowledged the new key, its jobs are signed by the old one;
    // once it did, by the new one.
    let job = queue_and_poll(&t, &cookie, &project, older_id, &older.connection).await;
    assert!(signed_by(&job, &older_identity, &[old_key]));
    assert!(!signed_by(&job, &older_identity, &[new_key]));
    let probe = OlderAgent::connect(&t, &probe_identity).await;
    let pinned_cas: Vec<[u8; 32]> = sensei_certs::tls::fingerprints(&probe_identity.ca_pem)
        .iter()
        .map(|fp| *fp.as_bytes())
        .collect();
    let (mut send, mut recv) = probe.connection.open_bi().await.expect("trust stream");
    write_frame(
        &mut send,
        &AgentMessage::WatchTrustAndJobKeys {
            pinned_cas: pinned_cas.clone(),
            job_keys: vec![old_key],
        },
    )
    .await
    .expect("watch");
    let announced = match tokio::time::timeout(Duration::from_secs(10), read_frame(&mut recv))
        .await
        .expect("an announcement within 10 s")
    {
        Ok(Some(ControlMessage::JobKeyEndorsed {
            new_key,
            endorser,
            signature,
        })) => JobKeyEndorsement {
            new_key,
            endorser,
            signature,
        },
        other => panic!("expected the new key, endorsed: {other:?}"),
    };
    // The announcement is the new key, endorsed by the old one.
    let pinned_now = JobKeySet::new(&[old_key])
        .expect("set")
        .with_endorsed(&announced)
        .expect("endorsed by the old key")
        .expect("a new key");
    assert_eq!(pinned_now.raw(), [old_key, new_key]);
    send.finish().expect("finish");
    // Pinned is not acknowledged: only a watch naming the key is.
    assert!(old_job_key_servers(&t, &cookie).await.contains(&probe_id));
    let (mut send, _recv) = probe.connection.open_bi().await.expect("trust stream");
    write_frame(
        &mut send,
        &AgentMessage::WatchTrustAndJobKeys {
            pinned_cas,
            job_keys: pinned_now.raw(),
        },
    )
    .await
    .expect("watch");
    assert!(
        eventually(Duration::from_secs(10), || {
            let t = &t;
            async move { acknowledged(t, probe_id).await.as_deref() == Some(new_key.as_slice()) }
        })
        .await,
        "naming the new key was not recorded as an acknowledgement"
    );
    let job = queue_and_poll(&t, &cookie, &project, probe_id, &probe.connection).await;
    assert!(signed_by(&job, &probe_identity, &[new_key]));
    assert!(!signed_by(&job, &probe_identity, &[old_key]));
    probe.heartbeats.abort();
    probe.connection.close(quinn::VarInt::from_u32(0), b"");

    // The offline agent and the older one have not acknowledged: the API and `status` say so.
    let mut lagging = vec![offline.server_id, older_id];
    lagging.sort();
    assert_eq!(old_job_key_servers(&t, &cookie).await, lagging);
    let (code, status_out, stderr) = job_key(&t, &["status"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        status_out.contains(&format!(
            "current job-signing key: {}",
            hex::encode(new_key)
        )) && status_out.contains(&hex::encode(old_key))
            && status_out.contains("2 agent(s) have not acknowledged the current key")
            && status_out.contains("web-offline (offline)")
            && status_out.contains("web-older (connected)"),
        "{status_out}"
    );
    let (status, body) = t.get("/v1/servers?job_key=new", &cookie).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_filter")),
        "{body}"
    );
    // Enrolled during the overlap: it is given the new key, and its jobs are signed by it
    // from the first one.
    let during = t.start_agent(&cookie, "web-during").await;
    assert_eq!(pinned(&during), [new_key]);
    deploy_succeeds(&t, &cookie, &project, &during).await;
    assert!(!old_job_key_servers(&t, &cookie)
        .await
        .contains(&during.server_id));

    // The older agent is connected and has not acknowledged: retiring is refused, says which,
    // and changes nothing.
    assert!(
        eventually(Duration::from_secs(20), || t
            .agent_connected(&cookie, older_id))
        .await,
        "the older agent is not shown connected"
    );
    let (code, _, stderr) = job_key(&t, &["retire"]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("web-older") && stderr.contains(&older_id.to_string()),
        "{stderr}"
    );
    assert!(
        !stderr.contains("web-offline"),
        "an offline agent does not hold it back: {stderr}"
    );
    assert_eq!(stored_key(&t, "job-signing.previous").await, Some(old_key));

    // Forced: the old key is destroyed; both lagging servers must enroll again.
    let (code, stdout, stderr) = job_key(&t, &["retire", "--force"]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("web-offline") && stdout.contains("web-older"),
        "{stdout}"
    );
    assert_eq!(stored_key(&t, "job-signing.previous").await, None);
    let (_, status_out, _) = job_key(&t, &["status"]).await;
    assert!(status_out.contains("no rotation under way"), "{status_out}");
    older.heartbeats.abort();
    drop(older);

    // The fleet unpins the retired key on the sessions it had, and keeps deploying: these
    // jobs verify against the new key alone.
    for agent in fleet.iter().chain([&during]) {
        assert!(
            eventually(Duration::from_secs(20), || {
                let pinned = pinned(agent);
                async move { pinned == [new_key] }
            })
            .await,
            "an agent still pins the retired key: {:?}",
            pinned(agent)
        );
        deploy_succeeds(&t, &cookie, &project, agent).await;
        assert!(!agent.task.is_finished(), "the agent stopped");
    }

    // The offline agent comes back: its certificate still works (only the key rotated), but
    // it pins only the retired key, so it refuses the job, and the deployment says why.
    let meta_before = std::fs::read(offline.state.path().join("agent.json")).expect("meta");
    let sequence_before = offline.state.highest_sequence().expect("sequence");
    offline.restart();
    assert!(
        eventually(Duration::from_secs(20), || {
            let hub = hub.clone();
            async move { hub.is_connected_here(offline.server_id) }
        })
        .await,
        "the offline agent did not reconnect"
    );
    let d: Value = t
        .deploy_and_wait(
            &cookie,
            project["id"].as_str().expect("project"),
            &offline.server_id.to_string(),
            "main",
        )
        .await;
    assert_eq!(d["status"], "failed", "{d}");
    assert_eq!(d["error"]["step"], "verify", "{d}");
    let message = d["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("refused by the agent: bad signature")
            && message.contains("never acknowledged the current job-signing key")
            && message.contains("enroll it again"),
        "{message}"
    );
    // Nothing changed on the agent: it still pins the old key alone, ran nothing.
    assert_eq!(pinned(&offline), [old_key]);
    assert_eq!(
        std::fs::read(offline.state.path().join("agent.json")).expect("meta"),
        meta_before
    );
    assert_eq!(
        offline.state.highest_sequence().expect("sequence"),
        sequence_before
    );
    assert_eq!(old_job_key_servers(&t, &cookie).await, lagging);

    // Enrolled again, it pins the new key and deploys.
    let (status, body) = t
        .post(
            &format!("/v1/servers/{}/enrollment-token", offline.server_id),
            &cookie,
            json!({}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let _ = offline.stop.send(true);
    let _ = (&mut offline.task).await;
    let mut options = t.enroll_options(
        body["enrollment_token"].as_str().expect("token"),
        offline.state.path(),
    );
    options.state_dir = offline.state.clone();
    options.expected_server_id = Some(offline.server_id);
    sensei_agent::enroll::enroll(&options)
        .await
        .expect("enroll again");
    assert_eq!(pinned(&offline), [new_key]);
    offline.restart();
    deploy_succeeds(&t, &cookie, &project, &offline).await;
    assert_eq!(old_job_key_servers(&t, &cookie).await, [older_id]);

    let actions = t.audit_actions().await;
    for action in [
        "job_key.rotated",
        "job_key.retired",
        "agent.job_key_retired",
    ] {
        assert!(
            actions.iter().any(|a| a == action),
            "{action} in {actions:?}"
        );
    }
    let mut audited: Vec<Uuid> = t
        .db()
        .await
        .query(
            "SELECT target_id FROM audit_log WHERE action = 'agent.job_key_retired'",
            &[],
        )
        .await
        .expect("audit")
        .iter()
        .filter_map(|r| r.get::<_, Option<Uuid>>(0))
        .collect();
    audited.sort();
    assert_eq!(audited, lagging);
    for agent in fleet.iter().chain([&during, &offline]) {
        let _ = agent.stop.send(true);
    }
}

/// A replica whose reload of the job-signing keys failed (here: the database refused it the
/// key table) tries again until it has the new ones. Before, it kept signing with the old key
/// until some later rotation, and agents drop the old key once a rotation is retired.
#[tokio::test]
async fn a_replica_whose_key_reload_failed_tries_again_until_it_has_the_new_keys() {
    let t = TestPlane::start().await;
    let signing = || t.plane.job_keys().ring().current.verifying_key().to_bytes();
    let old_key = stored_key(&t, "job-signing").await.expect("key");
    assert_eq!(signing(), old_key);
    let db = t.db().await;
    db.batch_execute(&format!(
        "REVOKE SELECT ON signing_keys FROM {}",
        sensei_e2e::APP_ROLE
    ))
    .await
    .expect("refuse the replica its keys");
    // The rotation runs as the database owner (as `sensei-control-plane job-key` does) and
    // notifies every replica; this one's reload is refused.
    let (code, stdout, stderr) = job_key(&t, &["rotate"]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let new_key = stored_key(&t, "job-signing").await.expect("new key");
    assert_ne!(new_key, old_key);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(signing(), old_key, "reloaded although refused");
    db.batch_execute(&format!(
        "GRANT SELECT ON signing_keys TO {}",
        sensei_e2e::APP_ROLE
    ))
    .await
    .expect("give the keys back");
    // No notification comes any more: only the replica's own retry can pick the keys up.
    assert!(
        eventually(Duration::from_secs(40), || async { signing() == new_key }).await,
        "still signing with the old key"
    );
}
