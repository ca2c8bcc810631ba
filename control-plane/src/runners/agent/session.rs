//! A connected agent's session: the agent says hello on its control stream (naming the server
//! its certificate was issued to), then sends heartbeats. The session ends when the agent
//! leaves, the connection dies, the certificate is revoked (the hub closes it), or the agent
//! breaks the protocol or stops sending heartbeats. The protocol's decisions are
//! `sensei_shared::session::ControlSession`'s; this drives it.

use std::net::IpAddr;
use std::sync::Arc;

use quinn::VarInt;
use rustls::pki_types::CertificateDer;
use sensei_certs::{AgentCertStatus, Fingerprint};
use sensei_shared::codec::io::{write_frame, FrameReader};
use sensei_shared::protocol::{close, AgentMessage};
use sensei_shared::session::{ControlAction, ControlSession, ControlSessionError};
use tokio::time::Instant;

use super::drain::Drain;
use super::gateway::{GatewayContext, STEP_TIMEOUT};

/// What a session's job streams share with it once the agent is registered.
#[derive(Debug)]
pub struct SessionLink {
    /// The certificate the connection was made with.
    pub fingerprint: Fingerprint,
    pub certificate_der: Vec<u8>,
    pub peer: IpAddr,
    /// As the hello gave it (already cut short).
    pub agent_version: String,
    /// Set once the agent stored a renewed certificate.
    pub drain: Drain,
    /// The agent described its host on this session: it does so once, so a second
    /// description is a protocol error (a hostile agent cannot turn streams into writes).
    pub host_facts_seen: std::sync::atomic::AtomicBool,
    /// The agent has polled on this session. Its first poll comes after it reported any
    /// result kept from a lost connection, so it proves that no job from before this session
    /// runs on it any more ([`crate::jobs::sweep::fail_jobs_left_behind`]).
    pub polled: std::sync::atomic::AtomicBool,
}

pub async fn run(
    connection: quinn::Connection,
    leaf: CertificateDer<'static>,
    ctx: &Arc<GatewayContext>,
) {
    let fingerprint = Fingerprint::of_der(&leaf);
    let server_id = match ctx.hub.certificates.status(&fingerprint) {
        AgentCertStatus::Valid(id) => id,
        // Replaced by a renewal the agent already connected with: it should use that one.
        AgentCertStatus::Retired => {
            connection.close(VarInt::from_u32(close::RENEWED), b"certificate renewed");
            return;
        }
        // Revoked (or expired) between the handshake and now.
        AgentCertStatus::Revoked => {
            connection.close(VarInt::from_u32(close::REVOKED), b"certificate revoked");
            return;
        }
        AgentCertStatus::Expired => {
            connection.close(VarInt::from_u32(close::REVOKED), b"certificate expired");
            return;
        }
        AgentCertStatus::Unknown => {
            connection.close(VarInt::from_u32(close::RETRY_LATER), b"1000");
            return;
        }
    };
    let protocol_error = |error: ControlSessionError| {
        tracing::info!(%server_id, reason = %error, "agent protocol error");
        connection.close(
            VarInt::from_u32(error.close_code()),
            error.to_string().as_bytes(),
        );
    };
    let mut session = ControlSession::new(server_id, ctx.heartbeat, STEP_TIMEOUT, Instant::now());
    // The control stream is the agent's first stream.
    let (mut send, recv) = loop {
        tokio::select! {
            stream = connection.accept_bi() => match stream {
                Ok(stream) => break stream,
                Err(_) => {
                    protocol_error(ControlSessionError::NoControlStream);
                    return;
                }
            },
            () = sleep_until(session.poll_timeout()) => {
                if let Err(e) = session.handle_timeout(Instant::now()) {
                    protocol_error(e);
                    return;
                }
            }
        }
    };
    // Cannot be out of order: nothing else happened to the session yet.
    let _ = session.stream_opened(Instant::now());
    let mut recv = FrameReader::new(recv);
    let agent_version = loop {
        let handled = tokio::select! {
            message = recv.next::<AgentMessage>() => match message {
                Ok(Some(message)) => session.handle(message, Instant::now()),
                Ok(None) => session.handle_end(),
                Err(e) => Err(session.handle_unreadable(e.to_string())),
            },
            () = sleep_until(session.poll_timeout()) => session.handle_timeout(Instant::now()),
        };
        if let Err(e) = handled {
            protocol_error(e);
            return;
        }
        if let Some(ControlAction::Register { agent_version }) = session.poll() {
            break agent_version;
        }
    };
    // The certificate is checked again as the session registers: it may have been revoked
    // while the agent took its time to say hello.
    if let Err(status) = ctx.hub.register(server_id, connection.clone(), fingerprint) {
        tracing::info!(%server_id, ?status, "agent refused at registration: certificate no longer valid");
        let (code, why): (u32, &[u8]) = match status {
            AgentCertStatus::Expired => (close::REVOKED, b"certificate expired"),
            AgentCertStatus::Unknown => (close::RETRY_LATER, b"1000"),
            AgentCertStatus::Retired => (close::RENEWED, b"certificate renewed"),
            _ => (close::REVOKED, b"certificate revoked"),
        };
        connection.close(VarInt::from_u32(code), why);
        return;
    }
    ctx.presence
        .connected(server_id, &agent_version, connection.remote_address().ip());
    // The first session with a renewed certificate retires the one it replaces.
    if ctx.hub.take_pending(&fingerprint) {
        let ctx = ctx.clone();
        tokio::spawn(async move { super::renew::activate(&ctx, server_id, fingerprint).await });
    }
    let link = Arc::new(SessionLink {
        fingerprint,
        certificate_der: leaf.to_vec(),
        peer: connection.remote_address().ip(),
        agent_version: agent_version.clone(),
        drain: Drain::default(),
        host_facts_seen: std::sync::atomic::AtomicBool::new(false),
        polled: std::sync::atomic::AtomicBool::new(false),
    });
    // The version is the agent's text: Debug-formatted (escaped), it cannot start a log line.
    tracing::info!(%server_id, ?agent_version, peer = %connection.remote_address(), "agent connected");
    // Cannot be out of order: the machine asked for the registration just above.
    let _ = session.registered(Instant::now());
    let mut polls = tokio::task::JoinSet::new();
    'session: loop {
        // The welcome first, then an ack for each heartbeat.
        while let Some(action) = session.poll() {
            match action {
                ControlAction::Send(message) => {
                    if write_frame(&mut send, &message).await.is_err() {
                        break 'session;
                    }
                }
                // Asked for once, before the welcome (above).
                ControlAction::Register { .. } => {}
            }
        }
        tokio::select! {
            message = recv.next::<AgentMessage>() => {
                let handled = match message {
                    Ok(Some(message)) => session.handle(message, Instant::now()),
                    Ok(None) => match session.handle_end() {
                        Ok(()) => break,
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(session.handle_unreadable(e.to_string())),
                };
                if let Err(e) = handled {
                    protocol_error(e);
                    break;
                }
            },
            // Every further stream is a job stream.
            stream = connection.accept_bi() => match stream {
                Ok((send, recv)) => {
                    let ctx = ctx.clone();
                    let link = link.clone();
                    let connection = connection.clone();
                    polls.spawn(async move {
                        super::dispatch::serve_poll(&ctx, server_id, &link, &connection, send, recv).await
                    });
                }
                Err(_) => break,
            },
            _ = connection.closed() => break,
            // The agent stored a renewed certificate and no job is under way: it reconnects
            // with the new one at once.
            () = link.drain.idle() => {
                tracing::info!(%server_id, "closing the session so that the agent reconnects with its renewed certificate");
                connection.close(VarInt::from_u32(close::RENEWED), b"certificate renewed");
                break;
            }
            // The agent stopped sending heartbeats while its connection stayed up.
            () = sleep_until(session.poll_timeout()) => {
                if let Err(e) = session.handle_timeout(Instant::now()) {
                    protocol_error(e);
                    break;
                }
            }
        }
    }
    polls.abort_all();
    while polls.join_next().await.is_some() {}
    // Boxed so that the database future does not size the whole (long-lived) session task.
    Box::pin(super::dispatch::fail_interrupted(ctx, server_id)).await;
    if ctx.hub.unregister(server_id, &connection) {
        ctx.presence.disconnected(server_id);
        ctx.hub.wakes.forget(server_id);
    }
    tracing::info!(%server_id, reason = ?connection.close_reason(), "agent disconnected");
}

/// Sleeps until `deadline`, or for ever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
