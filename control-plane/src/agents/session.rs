//! A connected agent's session: the agent says hello on its control stream (naming the server
//! its certificate was issued to), then sends heartbeats. The session ends when the agent
//! leaves, the connection dies, or the certificate is revoked (the hub closes it).

use quinn::VarInt;
use sensei_certs::{AgentCertStatus, Fingerprint};
use sensei_shared::codec::io::{read_frame, write_frame};
use sensei_shared::protocol::{close, AgentMessage, ControlMessage};

use super::gateway::{GatewayContext, STEP_TIMEOUT};

pub async fn run(
    connection: quinn::Connection,
    fingerprint: Fingerprint,
    ctx: &std::sync::Arc<GatewayContext>,
) {
    let server_id = match ctx.hub.certificates.status(&fingerprint) {
        AgentCertStatus::Valid(id) => id,
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
    let protocol_error = |why: String| {
        tracing::info!(%server_id, reason = %why, "agent protocol error");
        connection.close(VarInt::from_u32(close::PROTOCOL_ERROR), why.as_bytes());
    };
    let Ok(Ok((mut send, mut recv))) =
        tokio::time::timeout(STEP_TIMEOUT, connection.accept_bi()).await
    else {
        protocol_error("expected the control stream".into());
        return;
    };
    let agent_version =
        match tokio::time::timeout(STEP_TIMEOUT, read_frame::<AgentMessage, _>(&mut recv)).await {
            Ok(Ok(Some(AgentMessage::Hello {
                server_id: claimed,
                agent_version,
            }))) => {
                if claimed != server_id {
                    protocol_error(format!(
                        "this certificate was issued to server {server_id}, not {claimed}"
                    ));
                    return;
                }
                agent_version.chars().take(64).collect::<String>()
            }
            _ => {
                protocol_error("expected hello".into());
                return;
            }
        };
    // The certificate is checked again as the session registers: it may have been revoked
    // while the agent took its time to say hello.
    if let Err(status) = ctx.hub.register(server_id, connection.clone(), fingerprint) {
        tracing::info!(%server_id, ?status, "agent refused at registration: certificate no longer valid");
        let (code, why): (u32, &[u8]) = match status {
            AgentCertStatus::Expired => (close::REVOKED, b"certificate expired"),
            AgentCertStatus::Unknown => (close::RETRY_LATER, b"1000"),
            _ => (close::REVOKED, b"certificate revoked"),
        };
        connection.close(VarInt::from_u32(code), why);
        return;
    }
    ctx.presence.connected(server_id, &agent_version);
    tracing::info!(%server_id, %agent_version, peer = %connection.remote_address(), "agent connected");
    let welcome = ControlMessage::Welcome {
        heartbeat_secs: ctx.heartbeat.as_secs().max(1) as u32,
    };
    let mut polls = tokio::task::JoinSet::new();
    if write_frame(&mut send, &welcome).await.is_ok() {
        loop {
            tokio::select! {
                message = read_frame::<AgentMessage, _>(&mut recv) => match message {
                    Ok(Some(AgentMessage::Heartbeat)) => {
                        ctx.last_seen.touch(server_id);
                        if write_frame(&mut send, &ControlMessage::HeartbeatAck).await.is_err() {
                            break;
                        }
                    }
                    Ok(Some(_)) => {
                        protocol_error("only hello and heartbeats belong on the control stream".into());
                        break;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        protocol_error(format!("unreadable message: {e}"));
                        break;
                    }
                },
                // Every further stream is a job poll.
                stream = connection.accept_bi() => match stream {
                    Ok((send, recv)) => {
                        let ctx = ctx.clone();
                        polls.spawn(async move {
                            super::dispatch::serve_poll(&ctx, server_id, fingerprint, send, recv).await
                        });
                    }
                    Err(_) => break,
                },
                _ = connection.closed() => break,
            }
        }
    }
    polls.abort_all();
    while polls.join_next().await.is_some() {}
    // Boxed so that the database future does not size the whole (long-lived) session task.
    Box::pin(super::dispatch::fail_interrupted(ctx, server_id)).await;
    if ctx.hub.unregister(server_id, &connection) {
        ctx.presence.disconnected(server_id);
    }
    tracing::info!(%server_id, reason = ?connection.close_reason(), "agent disconnected");
}
