//! Simulated agents: real certificates from the control plane's CA, real mTLS QUIC
//! connections configured as the real agent's are, the real protocol (the agent's own
//! control-stream driver and the shared session machines), and jobs verified with the same
//! function the agent uses. Only the release engine is left out: a verified job is
//! answered "succeeded" at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::VerifyingKey;
use sensei_agent::session::{refused_as_revoked, ControlStream, StreamEnd};
use sensei_agent::transport::{Gateways, CONNECT_TIMEOUT};
use sensei_certs::{AgentKeyRequest, CertificateAuthority, Fingerprint};
use sensei_shared::backoff::Backoff;
use sensei_shared::codec::io::{write_frame, FrameReader};
use sensei_shared::job::{verify, Expectations, JobTask, SignedJob};
use sensei_shared::protocol::{close, CloseVerdict, ControlMessage, JobResult};
use sensei_shared::session::{AgentJob, AgentJobAction, HelloSent, OutOfOrder};
use tokio::sync::{watch, Notify, Semaphore};
use uuid::Uuid;

/// One simulated server's identity.
pub struct SimIdentity {
    pub server_id: Uuid,
    pub fingerprint: [u8; 32],
    pub serial_hex: String,
    pub not_after: time::OffsetDateTime,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Issues `count` identities with the CA itself (the enrollment path costs one QUIC handshake
/// and one database transaction per agent; at fleet scale that is measured separately).
pub fn issue(ca: &CertificateAuthority, count: usize) -> anyhow::Result<Vec<SimIdentity>> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let per = count.div_ceil(threads).max(1);
    let now = time::OffsetDateTime::now_utc();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..count)
            .collect::<Vec<_>>()
            .chunks(per)
            .map(|chunk| {
                let n = chunk.len();
                scope.spawn(move || -> anyhow::Result<Vec<SimIdentity>> {
                    let mut out = Vec::with_capacity(n);
                    for _ in 0..n {
                        let server_id = Uuid::new_v4();
                        let request = AgentKeyRequest::generate(&server_id.to_string())?;
                        let issued = ca.sign_agent_csr(
                            &request.csr_der,
                            server_id,
                            now - time::Duration::hours(1),
                            now + time::Duration::days(2),
                        )?;
                        out.push(SimIdentity {
                            server_id,
                            fingerprint: *Fingerprint::of_der(&issued.cert_der).as_bytes(),
                            serial_hex: issued.serial_hex,
                            not_after: issued.not_after,
                            cert_pem: issued.cert_pem,
                            key_pem: request.key_pem,
                        });
                    }
                    Ok(out)
                })
            })
            .collect();
        let mut all = Vec::with_capacity(count);
        for h in handles {
            all.extend(
                h.join()
                    .map_err(|_| anyhow::anyhow!("issuing thread panicked"))??,
            );
        }
        Ok(all)
    })
}

/// What the simulated agents report to the scenarios.
#[derive(Default)]
pub struct Shared {
    pub connected: AtomicUsize,
    /// Sessions established so far (each handshake that reached the welcome).
    pub sessions: AtomicU64,
    pub failed_attempts: AtomicU64,
    pub handshakes: Mutex<Vec<Duration>>,
    /// Job id → when its agent had verified it.
    pub verified: Mutex<HashMap<Uuid, Instant>>,
    pub verified_signal: Notify,
    pub refused: AtomicU64,
    /// Agents that hold a renewed certificate.
    pub renewed: AtomicUsize,
    /// Renewal exchanges that failed (the agent keeps its old certificate).
    pub renewal_failures: AtomicU64,
    /// Each renewal exchange, from making the key pair to the stream's end.
    pub renewal_round_trips: Mutex<Vec<Duration>>,
    /// Agents that have made a session with their renewed certificate.
    pub reconnected: AtomicUsize,
    /// The handshake of each agent's first session with its renewed certificate.
    pub renewed_handshakes: Mutex<Vec<Duration>>,
    /// Server id → when its agent was told it is revoked (it stops, as the real agent does).
    pub revoked: Mutex<HashMap<Uuid, Instant>>,
    pub revoked_signal: Notify,
    /// How long an agent holds a verified job before answering it (a deploy that takes time,
    /// so that a replica can die while jobs run); 0: at once.
    pub hold_ms: AtomicU64,
    /// Results of jobs lost with their connection, reported on the next session.
    pub reported_after_reconnect: AtomicU64,
    /// Connections dropped by a churn.
    pub churned: AtomicU64,
}

impl Shared {
    pub fn take_handshakes(&self) -> Vec<Duration> {
        self.handshakes
            .lock()
            .map(|mut h| std::mem::take(&mut *h))
            .unwrap_or_default()
    }

    pub fn take_renewal_round_trips(&self) -> Vec<Duration> {
        self.renewal_round_trips
            .lock()
            .map(|mut h| std::mem::take(&mut *h))
            .unwrap_or_default()
    }

    pub fn take_renewed_handshakes(&self) -> Vec<Duration> {
        self.renewed_handshakes
            .lock()
            .map(|mut h| std::mem::take(&mut *h))
            .unwrap_or_default()
    }

    /// How many jobs the fleet has verified so far.
    pub fn verified_count(&self) -> usize {
        self.verified.lock().map_or(0, |v| v.len())
    }

    pub fn verified_at(&self, job: Uuid) -> Option<Instant> {
        self.verified.lock().ok().and_then(|v| v.get(&job).copied())
    }

    pub fn revoked_at(&self, server: Uuid) -> Option<Instant> {
        self.revoked
            .lock()
            .ok()
            .and_then(|v| v.get(&server).copied())
    }
}

/// Waits until `mark` answers when something happened (looked at again each time `signal`
/// fires, and every 50 ms), or `within` passes.
pub async fn wait_for_mark(
    signal: &Notify,
    within: Duration,
    mark: impl Fn() -> Option<Instant>,
) -> Option<Instant> {
    let deadline = Instant::now() + within;
    loop {
        let notified = signal.notified();
        if let Some(at) = mark() {
            return Some(at);
        }
        if Instant::now() > deadline {
            return None;
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
    }
}

/// The fleet: its connections share a few client endpoints (UDP sockets).
pub struct Fleet {
    pub shared: Arc<Shared>,
    /// The local UDP ports of the client endpoints (for their kernel drop counts).
    pub ports: Vec<u16>,
    stop: watch::Sender<bool>,
    renew: watch::Sender<Option<RenewalWave>>,
    /// Each new value: every agent restarts with the probability it carries (churn).
    churn: watch::Sender<f64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Every agent renews once, at a moment drawn uniformly in `[start, start + spread)`, as the
/// jittered schedule spreads a fleet's renewals (`spread` zero: all at once).
#[derive(Debug, Clone, Copy)]
pub struct RenewalWave {
    pub start: tokio::time::Instant,
    pub spread: Duration,
}

impl RenewalWave {
    /// When the agent that drew `random` (uniform in [0, 1)) renews.
    pub fn moment(&self, random: f64) -> tokio::time::Instant {
        self.start + self.spread.mul_f64(random.clamp(0.0, 1.0))
    }
}

/// A client endpoint with large socket buffers: at thousands of handshakes a second the
/// default receive buffer overflows and the dropped packets come back as retransmission
/// timeouts.
fn client_endpoint(buffer: usize) -> anyhow::Result<quinn::Endpoint> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    let runtime = quinn::default_runtime().ok_or_else(|| anyhow::anyhow!("no async runtime"))?;
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket.into(),
        runtime,
    )?)
}

impl Fleet {
    /// Starts one task per identity. At most `ramp` handshakes are in flight at once while the
    /// fleet first connects. With several gateways (replicas) agent `i` starts on gateway
    /// `i mod n` and moves on as the real agent does ([`Gateways`]).
    pub fn start(
        identities: Vec<SimIdentity>,
        ca_pem: &str,
        job_key: VerifyingKey,
        gateways: &[SocketAddr],
        endpoints: usize,
        ramp: usize,
    ) -> anyhow::Result<Self> {
        let verifier = sensei_certs::tls::verifier_trusting(ca_pem)?;
        let endpoints: Vec<quinn::Endpoint> = (0..endpoints.max(1))
            .map(|_| client_endpoint(8 << 20))
            .collect::<Result<_, _>>()?;
        let ports = endpoints
            .iter()
            .filter_map(|e| e.local_addr().ok().map(|a| a.port()))
            .collect();
        let shared = Arc::new(Shared::default());
        let (stop, stopped) = watch::channel(false);
        let (renew, wave) = watch::channel(None);
        let (churn, churning) = watch::channel(0.0);
        let gate = Arc::new(Semaphore::new(ramp.max(1)));
        let mut tasks = Vec::with_capacity(identities.len());
        for (i, id) in identities.into_iter().enumerate() {
            let config = sensei_agent::transport::client_config(
                verifier.clone(),
                Some((id.cert_pem.as_str(), id.key_pem.as_str())),
            )?;
            let agent = SimAgent {
                server_id: id.server_id,
                current: Mutex::new(Current {
                    fingerprint: id.fingerprint,
                    config,
                    renewed: false,
                }),
                verifier: verifier.clone(),
                wave: wave.clone(),
                churning: churning.clone(),
                renewal_draw: rand::random(),
                endpoint: endpoints[i % endpoints.len()].clone(),
                gateways: gateways.to_vec(),
                start: i,
                pending: Mutex::new(None),
                job_key,
                shared: shared.clone(),
                gate: gate.clone(),
            };
            let stopped = stopped.clone();
            tasks.push(tokio::spawn(agent.run(stopped)));
        }
        Ok(Self {
            shared,
            ports,
            stop,
            renew,
            churn,
            tasks,
        })
    }

    /// Each connected agent drops its connection with probability `fraction`, as a
    /// restarting agent does, and connects again after its backoff.
    pub fn churn(&self, fraction: f64) {
        self.churn.send_replace(fraction);
    }

    /// Starts the renewal wave: each connected agent renews once, over its live session.
    pub fn renew(&self, spread: Duration) {
        let _ = self.renew.send(Some(RenewalWave {
            start: tokio::time::Instant::now(),
            spread,
        }));
    }

    /// Waits until `count` agents have renewed and made a session with the new certificate,
    /// or `within` passes. Returns the time taken.
    pub async fn wait_reconnected(&self, count: usize, within: Duration) -> Option<Duration> {
        let started = Instant::now();
        while started.elapsed() < within {
            if self.shared.reconnected.load(Ordering::Relaxed) >= count {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    /// Waits until `count` agents are connected, or `within` passes. Returns the time taken.
    pub async fn wait_connected(&self, count: usize, within: Duration) -> Option<Duration> {
        let started = Instant::now();
        while started.elapsed() < within {
            if self.shared.connected.load(Ordering::Relaxed) >= count {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    /// Waits until `count` more sessions than `since` were established, or `within` passes.
    pub async fn wait_sessions(
        &self,
        since: u64,
        count: usize,
        within: Duration,
    ) -> Option<Duration> {
        let started = Instant::now();
        while started.elapsed() < within {
            if self.shared.sessions.load(Ordering::Relaxed) >= since + count as u64 {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// The certificate an agent connects with: replaced once it is renewed.
struct Current {
    fingerprint: [u8; 32],
    config: quinn::ClientConfig,
    renewed: bool,
}

struct SimAgent {
    server_id: Uuid,
    current: Mutex<Current>,
    verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
    wave: watch::Receiver<Option<RenewalWave>>,
    churning: watch::Receiver<f64>,
    /// Where in the wave's spread this agent renews.
    renewal_draw: f64,
    endpoint: quinn::Endpoint,
    gateways: Vec<SocketAddr>,
    /// Where in `gateways` this agent starts.
    start: usize,
    /// A job's result not yet acknowledged, reported first on the next session (as the real
    /// agent keeps it on disk).
    pending: Mutex<Option<(Uuid, JobResult)>>,
    job_key: VerifyingKey,
    shared: Arc<Shared>,
    gate: Arc<Semaphore>,
}

impl SimAgent {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Backoff::agent_default();
        let mut highest_sequence = 0u64;
        let mut first = true;
        let mut reconnected = false;
        let mut gateways = Gateways::starting_at(self.start);
        loop {
            let next = tokio::select! {
                d = self.session(&mut backoff, &mut gateways, &mut highest_sequence, &mut first, &mut reconnected) => d,
                _ = stop.changed() => return,
            };
            let Some(delay) = next else {
                return;
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// One connection; answers how long to wait before the next, or None when revoked.
    async fn session(
        &self,
        backoff: &mut Backoff,
        gateways: &mut Gateways,
        highest_sequence: &mut u64,
        first: &mut bool,
        reconnected: &mut bool,
    ) -> Option<Duration> {
        let permit = if *first {
            self.gate.clone().acquire_owned().await.ok()
        } else {
            None
        };
        let started = Instant::now();
        // Jobs on this session are bound to the certificate it was made with.
        let (config, fingerprint, renewed) = match self.current.lock() {
            Ok(c) => (c.config.clone(), c.fingerprint, c.renewed),
            Err(_) => return Some(self.failed(backoff, gateways)),
        };
        let Some(gateway) = gateways.pick(&self.gateways) else {
            return Some(self.failed(backoff, gateways));
        };
        let connecting = match self.endpoint.connect_with(config, gateway, "localhost") {
            Ok(c) => c,
            Err(_) => return Some(self.failed(backoff, gateways)),
        };
        let connection = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) if refused_as_revoked(&e) => return self.revoked(),
            _ => return Some(self.failed(backoff, gateways)),
        };
        // The real agent's control-stream driver over the shared session machine.
        let Ok((control, hello)) =
            ControlStream::open(&connection, self.server_id, "loadgen".into()).await
        else {
            return Some(self.failed(backoff, gateways));
        };
        let mut permit = permit;
        let mut welcomed = false;
        let on_welcome = |_heartbeat| {
            if let Ok(mut h) = self.shared.handshakes.lock() {
                h.push(started.elapsed());
            }
            drop(permit.take());
            *first = false;
            backoff.reset();
            welcomed = true;
            self.shared.sessions.fetch_add(1, Ordering::Relaxed);
            self.shared.connected.fetch_add(1, Ordering::Relaxed);
            if renewed && !*reconnected {
                *reconnected = true;
                if let Ok(mut h) = self.shared.renewed_handshakes.lock() {
                    h.push(started.elapsed());
                }
                self.shared.reconnected.fetch_add(1, Ordering::Relaxed);
            }
        };
        let end = tokio::select! {
            end = control.run(on_welcome) => end,
            () = self.jobs(&connection, fingerprint, highest_sequence, hello) => StreamEnd::Connection,
            () = self.renew(&connection, hello, renewed) => StreamEnd::Connection,
            () = self.churned() => {
                self.shared.churned.fetch_add(1, Ordering::Relaxed);
                connection.close(quinn::VarInt::from_u32(close::LEAVING), b"agent restarting");
                StreamEnd::Connection
            }
        };
        if welcomed {
            self.shared.connected.fetch_sub(1, Ordering::Relaxed);
        }
        if let StreamEnd::GiveUp { code, reason } = end {
            connection.close(quinn::VarInt::from_u32(code), reason.as_bytes());
        }
        self.after_close(&connection, backoff, gateways)
    }

    /// Told it is revoked: stops for good, as the real agent does.
    fn revoked(&self) -> Option<Duration> {
        if let Ok(mut r) = self.shared.revoked.lock() {
            r.insert(self.server_id, Instant::now());
        }
        self.shared.revoked_signal.notify_waiters();
        None
    }

    /// Resolves when a churn drawn after this session began picks this agent.
    async fn churned(&self) {
        let mut churning = self.churning.clone();
        churning.borrow_and_update();
        while churning.changed().await.is_ok() {
            if rand::random::<f64>() < *churning.borrow_and_update() {
                return;
            }
        }
        std::future::pending().await
    }

    /// Renews once when the wave reaches this agent, over this session, with the real agent's
    /// exchange; keeps the new key and certificate in memory for the next connection. The
    /// control plane then closes the session (between jobs) and the agent reconnects. Never
    /// ends by itself.
    async fn renew(&self, connection: &quinn::Connection, hello: HelloSent, renewed: bool) {
        if !renewed {
            let mut wave = self.wave.clone();
            let moment = match wave.wait_for(Option::is_some).await {
                Ok(w) => w.map(|w| w.moment(self.renewal_draw)),
                Err(_) => None,
            };
            if let Some(moment) = moment {
                tokio::time::sleep_until(moment).await;
                self.renew_now(connection, hello).await;
            }
        }
        std::future::pending().await
    }

    async fn renew_now(&self, connection: &quinn::Connection, hello: HelloSent) {
        let began = Instant::now();
        let mut stored = None;
        let exchange =
            sensei_agent::renew::exchange(connection, hello, self.server_id, |key, cert| {
                stored = Some((key.to_owned(), cert.to_owned()));
                Ok(())
            })
            .await;
        let took = began.elapsed();
        let next = match (exchange, stored) {
            (Ok(()), Some((key_pem, cert_pem))) => {
                let fingerprint = sensei_certs::tls::first_cert_der(&cert_pem)
                    .map(|der| *Fingerprint::of_der(&der).as_bytes());
                let config = sensei_agent::transport::client_config(
                    self.verifier.clone(),
                    Some((cert_pem.as_str(), key_pem.as_str())),
                );
                fingerprint.ok().zip(config.ok())
            }
            _ => None,
        };
        let Some((fingerprint, config)) = next else {
            self.shared.renewal_failures.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if let Ok(mut current) = self.current.lock() {
            *current = Current {
                fingerprint,
                config,
                renewed: true,
            };
        }
        if let Ok(mut r) = self.shared.renewal_round_trips.lock() {
            r.push(took);
        }
        self.shared.renewed.fetch_add(1, Ordering::Relaxed);
    }

    fn failed(&self, backoff: &mut Backoff, gateways: &mut Gateways) -> Duration {
        self.shared.failed_attempts.fetch_add(1, Ordering::Relaxed);
        gateways.failed();
        backoff.next_delay(rand::random())
    }

    /// The delay the control plane asked for when it closed, as the real agent computes it;
    /// None when it said "revoked". A connection lost without a word moves to the next
    /// gateway, as the real agent's does.
    fn after_close(
        &self,
        connection: &quinn::Connection,
        backoff: &mut Backoff,
        gateways: &mut Gateways,
    ) -> Option<Duration> {
        match connection.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(close)) => {
                match CloseVerdict::from_application_close(
                    close.error_code.into_inner(),
                    &close.reason,
                ) {
                    CloseVerdict::RetryAfter(d) => Some(Backoff::suggested(d, rand::random())),
                    // Renewed: the real agent reconnects at once with the new certificate.
                    CloseVerdict::Reconnect => Some(Duration::ZERO),
                    CloseVerdict::Stop => self.revoked(),
                    CloseVerdict::Retry => {
                        gateways.failed();
                        Some(backoff.next_delay(rand::random()))
                    }
                }
            }
            _ => {
                gateways.failed();
                Some(backoff.next_delay(rand::random()))
            }
        }
    }

    /// Polls for jobs and answers each at once: verified ones "succeeded", the others
    /// refused. Ends when the connection does or the control plane breaks the protocol.
    async fn jobs(
        &self,
        connection: &quinn::Connection,
        fingerprint: [u8; 32],
        highest_sequence: &mut u64,
        hello: HelloSent,
    ) {
        loop {
            let unreported = self.pending.lock().ok().and_then(|p| p.clone());
            let reporting = unreported.as_ref().map(|(job, _)| *job);
            let mut exchange = AgentJob::next(hello, unreported, *highest_sequence);
            let Ok((mut send, recv)) = connection.open_bi().await else {
                return;
            };
            let mut recv = FrameReader::new(recv);
            loop {
                while let Some(action) = exchange.poll() {
                    match action {
                        AgentJobAction::Send(message) => {
                            if write_frame(&mut send, &message).await.is_err() {
                                return;
                            }
                        }
                        AgentJobAction::Run(job) => {
                            if self
                                .answer(&job, fingerprint, highest_sequence, &mut exchange)
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        AgentJobAction::Keep { job_id, result } => {
                            if let Ok(mut p) = self.pending.lock() {
                                *p = Some((job_id, result));
                            }
                        }
                        AgentJobAction::Forget { job_id } => {
                            if reporting == Some(job_id) {
                                self.shared
                                    .reported_after_reconnect
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                            if let Ok(mut p) = self.pending.lock() {
                                *p = None;
                            }
                        }
                        AgentJobAction::Finish => {
                            let _ = send.finish();
                        }
                    }
                }
                if exchange.is_done() {
                    break;
                }
                match recv.next::<ControlMessage>().await {
                    Ok(Some(message)) => {
                        if exchange.handle(message).is_err() {
                            return;
                        }
                    }
                    Ok(None) | Err(_) => return,
                }
            }
        }
    }

    /// Holds a job for the fleet's hold time, as if it ran. A connection lost meanwhile ends
    /// the hold with no result, as the real agent's deploy is killed with its connection.
    async fn hold(&self) {
        let hold = Duration::from_millis(self.shared.hold_ms.load(Ordering::Relaxed));
        if !hold.is_zero() {
            tokio::time::sleep(hold).await;
        }
    }

    /// Verifies a job as the agent does and answers it without running anything (after the
    /// fleet's hold time).
    async fn answer(
        &self,
        job: &SignedJob,
        fingerprint: [u8; 32],
        highest_sequence: &mut u64,
        exchange: &mut AgentJob,
    ) -> Result<(), OutOfOrder> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let expectations = Expectations {
            keys: std::slice::from_ref(&self.job_key),
            server_id: self.server_id,
            certificate_fingerprint: fingerprint,
            highest_sequence: *highest_sequence,
            now,
        };
        match verify(job, &expectations) {
            Ok(payload) => {
                *highest_sequence = payload.sequence;
                if let Ok(mut v) = self.shared.verified.lock() {
                    v.insert(payload.job_id, Instant::now());
                }
                self.shared.verified_signal.notify_waiters();
                self.hold().await;
                let release_id = match &payload.task {
                    JobTask::Deploy(spec) => Some(spec.release_id.clone()),
                    JobTask::Rollback(_) | JobTask::ForgetEnv(_) | JobTask::UpgradeAgent(_) => None,
                };
                exchange.finish(
                    payload.job_id,
                    JobResult {
                        succeeded: true,
                        release_id,
                        commit: Some("0".repeat(40)),
                        error: None,
                    },
                )
            }
            Err(rejection) => {
                self.shared.refused.fetch_add(1, Ordering::Relaxed);
                exchange.refuse(None, rejection.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wave places each agent's renewal within its spread, by the agent's own draw; with
    /// no spread every agent renews at its start.
    #[test]
    fn a_wave_spreads_renewals_over_its_window() {
        let start = tokio::time::Instant::now();
        let wave = RenewalWave {
            start,
            spread: Duration::from_secs(60),
        };
        assert_eq!(wave.moment(0.0), start);
        assert_eq!(wave.moment(0.5), start + Duration::from_secs(30));
        assert!(wave.moment(0.999_999) < start + Duration::from_secs(60));
        // Out-of-range draws stay inside the window.
        assert_eq!(wave.moment(-1.0), start);
        assert_eq!(wave.moment(7.0), start + Duration::from_secs(60));
        let at_once = RenewalWave {
            start,
            spread: Duration::ZERO,
        };
        assert_eq!(at_once.moment(0.7), start);
    }
}
