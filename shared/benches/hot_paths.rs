//! The pure functions on the hot paths: signing a job (control plane, once per target),
//! verifying it (agent), the wire codec (every message), and the release engine's script
//! generation and output parsing (every deploy).
//!
//! `cargo bench -p sensei-shared --bench hot_paths`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use ed25519_dalek::SigningKey;
use sensei_shared::codec::{decode, encode_frame};
use sensei_shared::job::{verify, DeploySpec, Expectations, Hooks, JobPayload, JobTask, SignedJob};
use sensei_shared::protocol::ControlMessage;
use sensei_shared::release::{deploy_script, OutputParser};
use uuid::Uuid;

fn spec() -> DeploySpec {
    DeploySpec {
        repo_url: "https://git.example.com/acme/shop.git".into(),
        git_ref: "main".into(),
        release_id: "20261122120000-0000000042-a1b2c3".into(),
        deploy_path: "/srv/shop".into(),
        keep_releases: 5,
        shared_paths: vec!["storage/".into(), ".env".into()],
        hooks: Hooks {
            build: vec!["npm ci".into(), "npm run build".into()],
            pre_switch: vec!["./migrate.sh".into()],
            post_switch: vec!["systemctl --user reload shop".into()],
        },
        health_check: Some("curl -fsS http://127.0.0.1:3000/health".into()),
        env: (0..20)
            .map(|i| (format!("VAR_{i}"), format!("value number {i}")))
            .collect(),
        hook_timeout_secs: 600,
        expected_commit: None,
    }
}

fn payload(server_id: Uuid) -> JobPayload {
    JobPayload {
        job_id: Uuid::new_v4(),
        server_id,
        certificate_fingerprint: [7; 32],
        sequence: 42,
        not_before: 1_790_000_000,
        expires_at: 1_790_000_600,
        task: JobTask::Deploy(spec()),
    }
}

fn jobs(c: &mut Criterion) {
    let key = SigningKey::from_bytes(&[9; 32]);
    let server_id = Uuid::new_v4();
    let payload = payload(server_id);
    c.bench_function("job sign", |b| {
        b.iter(|| SignedJob::sign(black_box(&payload), &key))
    });
    let signed = SignedJob::sign(&payload, &key).expect("sign");
    let verifying = key.verifying_key();
    let expect = Expectations {
        keys: std::slice::from_ref(&verifying),
        server_id,
        certificate_fingerprint: [7; 32],
        highest_sequence: 41,
        now: 1_790_000_100,
    };
    c.bench_function("job verify", |b| {
        b.iter(|| verify(black_box(&signed), black_box(&expect)).expect("valid"))
    });
    let message = ControlMessage::Job(signed);
    c.bench_function("codec encode frame (signed job)", |b| {
        b.iter(|| encode_frame(black_box(&message)).expect("encode"))
    });
    let frame = encode_frame(&message).expect("encode");
    c.bench_function("codec decode (signed job)", |b| {
        b.iter(|| decode::<ControlMessage>(black_box(&frame[4..])).expect("decode"))
    });
}

fn release(c: &mut Criterion) {
    let spec = spec();
    c.bench_function("release engine: deploy script", |b| {
        b.iter(|| deploy_script(black_box(&spec), "job", "n0nce").expect("script"))
    });
    let parser = OutputParser::new("n0nce");
    c.bench_function("release engine: parse the switch line", |b| {
        b.iter(|| {
            parser.parse(black_box(
                "@@sensei:n0nce switched 20261122120000-0000000042-a1b2c3 20261121120000-0000000041-d4e5f6",
            ))
        })
    });
    c.bench_function("release engine: parse a log line", |b| {
        b.iter(|| parser.parse(black_box("added 1214 packages in 12s")))
    });
}

criterion_group!(benches, jobs, release);
criterion_main!(benches);
