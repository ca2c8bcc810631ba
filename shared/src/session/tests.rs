//! The session machines on simulated time: `Duration` since an arbitrary start is the clock,
//! advanced by hand.

use std::time::Duration;

use uuid::Uuid;

use super::*;
use crate::job::SignedJob;
use crate::protocol::{
    close, AgentMessage, CloseVerdict, ControlMessage, JobResult, LogLine, RenewalRefusal,
};

const AGENT_STEP: Duration = Duration::from_secs(15);
const CONTROL_STEP: Duration = Duration::from_secs(10);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn job() -> SignedJob {
    SignedJob {
        payload: vec![1, 2, 3],
        signature: vec![4; 64],
    }
}

fn succeeded() -> JobResult {
    JobResult {
        succeeded: true,
        release_id: Some("20260101T000000Z".into()),
        commit: Some("0".repeat(40)),
        error: None,
    }
}

fn drain_agent(session: &mut AgentSession<Duration>) -> Vec<AgentAction> {
    std::iter::from_fn(|| session.poll()).collect()
}

fn drain_control(session: &mut ControlSession<Duration>) -> Vec<ControlAction> {
    std::iter::from_fn(|| session.poll()).collect()
}

fn drain_agent_job(job: &mut AgentJob) -> Vec<AgentJobAction> {
    std::iter::from_fn(|| job.poll()).collect()
}

fn drain_control_job(job: &mut ControlJob) -> Vec<ControlJobAction> {
    std::iter::from_fn(|| job.poll()).collect()
}

/// An agent session welcomed at `at` with a heartbeat of `heartbeat_secs`.
fn welcomed_agent(server_id: Uuid, heartbeat_secs: u32, at: Duration) -> AgentSession<Duration> {
    let mut agent = AgentSession::new(server_id, "1.0.0".into(), AGENT_STEP, Duration::ZERO);
    drain_agent(&mut agent);
    agent
        .handle(ControlMessage::Welcome { heartbeat_secs }, at)
        .expect("welcome");
    drain_agent(&mut agent);
    agent
}

/// A control session registered at `at`, its welcome drained.
fn established_control(
    server_id: Uuid,
    heartbeat: Duration,
    at: Duration,
) -> ControlSession<Duration> {
    let mut control = ControlSession::new(server_id, heartbeat, CONTROL_STEP, Duration::ZERO);
    control.stream_opened(Duration::ZERO).expect("stream");
    control
        .handle(
            AgentMessage::Hello {
                server_id,
                agent_version: "1.0.0".into(),
            },
            Duration::ZERO,
        )
        .expect("hello");
    drain_control(&mut control);
    control.registered(at).expect("registered");
    drain_control(&mut control);
    control
}

#[test]
fn the_agent_says_hello_before_it_may_open_a_job_stream() {
    let server_id = Uuid::new_v4();
    let mut agent = AgentSession::new(server_id, "1.0.0".into(), AGENT_STEP, Duration::ZERO);
    // No proof of a hello, so no job stream can be built yet.
    assert_eq!(agent.hello_sent(), None);
    assert_eq!(
        agent.poll(),
        Some(AgentAction::Send(AgentMessage::Hello {
            server_id,
            agent_version: "1.0.0".into(),
        }))
    );
    let hello = agent.hello_sent().expect("the hello went out");
    let mut poll = AgentJob::next(hello, None, 4);
    assert_eq!(
        drain_agent_job(&mut poll),
        [AgentJobAction::Send(AgentMessage::Poll {
            highest_sequence: 4
        })]
    );
}

/// Regression test for b1612cc: a poll stream that overtook the control stream's hello got
/// the connection closed.
#[test]
fn the_control_plane_refuses_a_poll_where_the_hello_belongs() {
    let mut control = ControlSession::new(Uuid::new_v4(), secs(30), CONTROL_STEP, Duration::ZERO);
    control.stream_opened(secs(1)).expect("stream");
    let error = control
        .handle(
            AgentMessage::Poll {
                highest_sequence: 0,
            },
            secs(1),
        )
        .expect_err("a poll is no hello");
    assert_eq!(error, ControlSessionError::ExpectedHello);
    assert_eq!(error.close_code(), close::PROTOCOL_ERROR);
    assert_eq!(error.to_string(), "expected hello");
    assert_eq!(control.poll(), None, "nothing registered, nothing welcomed");
    assert_eq!(control.poll_timeout(), None);
}

#[test]
fn hello_register_welcome_on_the_control_plane() {
    let server_id = Uuid::new_v4();
    let mut control = ControlSession::new(server_id, secs(30), CONTROL_STEP, Duration::ZERO);
    control.stream_opened(secs(1)).expect("stream");
    control
        .handle(
            AgentMessage::Hello {
                server_id,
                // NULs dropped (PostgreSQL text cannot hold them), then cut at 64.
                agent_version: format!("\0{}", "v".repeat(100)),
            },
            secs(2),
        )
        .expect("hello");
    assert_eq!(
        drain_control(&mut control),
        [ControlAction::Register {
            agent_version: "v".repeat(64)
        }]
    );
    assert!(!control.is_established());
    control.registered(secs(2)).expect("registered");
    assert_eq!(
        drain_control(&mut control),
        [ControlAction::Send(ControlMessage::Welcome {
            heartbeat_secs: 30
        })]
    );
    assert!(control.is_established());
    assert_eq!(control.registered(secs(3)), Err(OutOfOrder("registered")));
}

#[test]
fn a_hello_naming_another_server_is_a_protocol_error() {
    let certified = Uuid::new_v4();
    let claimed = Uuid::new_v4();
    let mut control = ControlSession::new(certified, secs(30), CONTROL_STEP, Duration::ZERO);
    control.stream_opened(Duration::ZERO).expect("stream");
    let error = control
        .handle(
            AgentMessage::Hello {
                server_id: claimed,
                agent_version: "1".into(),
            },
            secs(1),
        )
        .expect_err("wrong server");
    assert_eq!(
        error,
        ControlSessionError::WrongServer { certified, claimed }
    );
    assert_eq!(error.close_code(), close::PROTOCOL_ERROR);
    assert_eq!(drain_control(&mut control), []);
}

#[test]
fn the_control_plane_times_out_each_step() {
    // No stream at all.
    let mut control = ControlSession::new(Uuid::new_v4(), secs(30), CONTROL_STEP, secs(100));
    assert_eq!(control.poll_timeout(), Some(secs(110)));
    assert_eq!(control.handle_timeout(secs(109)), Ok(()));
    assert_eq!(
        control.handle_timeout(secs(110)),
        Err(ControlSessionError::NoControlStream)
    );
    assert_eq!(control.poll_timeout(), None);

    // A stream, but no hello: the hello's step starts when the stream opens.
    let mut control = ControlSession::new(Uuid::new_v4(), secs(30), CONTROL_STEP, secs(100));
    control.stream_opened(secs(104)).expect("stream");
    assert_eq!(control.poll_timeout(), Some(secs(114)));
    assert_eq!(control.handle_timeout(secs(110)), Ok(()));
    let error = control.handle_timeout(secs(114)).expect_err("no hello");
    assert_eq!(error, ControlSessionError::ExpectedHello);
    assert_eq!(error.close_code(), close::PROTOCOL_ERROR);

    // The stream ending or carrying garbage before the hello is the same error.
    let mut control = ControlSession::new(Uuid::new_v4(), secs(30), CONTROL_STEP, secs(0));
    control.stream_opened(secs(0)).expect("stream");
    assert_eq!(
        control.handle_end(),
        Err(ControlSessionError::ExpectedHello)
    );
    let mut control = ControlSession::new(Uuid::new_v4(), secs(30), CONTROL_STEP, secs(0));
    control.stream_opened(secs(0)).expect("stream");
    assert_eq!(
        control.handle_unreadable("bad".into()),
        ControlSessionError::ExpectedHello
    );
}

#[test]
fn the_agent_gives_up_without_a_welcome() {
    let mut agent = AgentSession::new(Uuid::new_v4(), "1".into(), AGENT_STEP, secs(50));
    drain_agent(&mut agent);
    assert_eq!(agent.poll_timeout(), Some(secs(65)));
    assert_eq!(agent.handle_timeout(secs(64)), Ok(()));
    let error = agent.handle_timeout(secs(65)).expect_err("no welcome");
    assert_eq!(error, AgentSessionError::NoWelcome(AGENT_STEP));
    assert_eq!(error.close_code(), close::LEAVING);
    assert_eq!(agent.poll_timeout(), None);
}

#[test]
fn the_agent_wants_a_welcome_first() {
    let mut agent = AgentSession::new(Uuid::new_v4(), "1".into(), AGENT_STEP, secs(0));
    drain_agent(&mut agent);
    let error = agent
        .handle(ControlMessage::HeartbeatAck, secs(1))
        .expect_err("an ack is no welcome");
    assert_eq!(error, AgentSessionError::ExpectedWelcome("HeartbeatAck"));
    assert_eq!(error.close_code(), close::PROTOCOL_ERROR);
}

#[test]
fn heartbeats_go_out_on_schedule_and_acks_keep_the_session() {
    let mut agent = welcomed_agent(Uuid::new_v4(), 30, secs(1));
    assert!(agent.is_established());
    // The first heartbeat one interval after the welcome, not at once.
    assert_eq!(agent.poll_timeout(), Some(secs(31)));
    agent.handle_timeout(secs(30)).expect("early");
    assert_eq!(drain_agent(&mut agent), []);
    for beat in 1..=10u64 {
        let at = secs(1 + 30 * beat);
        assert_eq!(agent.poll_timeout(), Some(at));
        agent.handle_timeout(at).expect("on time");
        assert_eq!(
            drain_agent(&mut agent),
            [AgentAction::Send(AgentMessage::Heartbeat)]
        );
        agent
            .handle(ControlMessage::HeartbeatAck, at + Duration::from_millis(20))
            .expect("ack");
    }
    // A late timer sends one heartbeat, not a burst, and the schedule moves on from now.
    agent.handle_timeout(secs(400)).expect("late");
    assert_eq!(
        drain_agent(&mut agent),
        [AgentAction::Send(AgentMessage::Heartbeat)]
    );
    agent
        .handle(ControlMessage::HeartbeatAck, secs(400))
        .expect("ack");
    assert_eq!(agent.poll_timeout(), Some(secs(430)));
}

#[test]
fn the_welcome_announces_the_interval_within_bounds() {
    let mut agent = AgentSession::new(Uuid::new_v4(), "1".into(), AGENT_STEP, secs(0));
    drain_agent(&mut agent);
    agent
        .handle(ControlMessage::Welcome { heartbeat_secs: 0 }, secs(0))
        .expect("welcome");
    assert_eq!(
        drain_agent(&mut agent),
        [AgentAction::Established { heartbeat: secs(1) }]
    );
    let mut agent = AgentSession::new(Uuid::new_v4(), "1".into(), AGENT_STEP, secs(0));
    drain_agent(&mut agent);
    agent
        .handle(
            ControlMessage::Welcome {
                heartbeat_secs: u32::MAX,
            },
            secs(0),
        )
        .expect("welcome");
    assert_eq!(
        drain_agent(&mut agent),
        [AgentAction::Established {
            heartbeat: secs(300)
        }]
    );
}

#[test]
fn the_agent_notices_a_control_plane_that_stopped_acking() {
    // Welcomed at 0 with 30 s: silent after 3 × 30 s + 15 s.
    let mut agent = welcomed_agent(Uuid::new_v4(), 30, secs(0));
    agent
        .handle(ControlMessage::HeartbeatAck, secs(10))
        .expect("ack");
    // From the last ack at 10 s: 115 s.
    for at in [30, 60, 90] {
        agent.handle_timeout(secs(at)).expect("still alive");
        assert_eq!(
            drain_agent(&mut agent),
            [AgentAction::Send(AgentMessage::Heartbeat)]
        );
    }
    assert_eq!(agent.poll_timeout(), Some(secs(115)));
    agent.handle_timeout(secs(114)).expect("not yet");
    let error = agent.handle_timeout(secs(115)).expect_err("silent");
    assert_eq!(error, AgentSessionError::Silent(secs(105)));
    assert_eq!(error.close_code(), close::LEAVING);
    assert_eq!(agent.poll_timeout(), None);
}

#[test]
fn the_control_plane_notices_an_agent_that_stopped_heartbeating() {
    let server_id = Uuid::new_v4();
    // The tests' 1 s heartbeat: silent after 3 × 1 s + 10 s.
    let mut control = established_control(server_id, secs(1), secs(2));
    assert_eq!(control.poll_timeout(), Some(secs(15)));
    control
        .handle(AgentMessage::Heartbeat, secs(5))
        .expect("heartbeat");
    assert_eq!(
        drain_control(&mut control),
        [ControlAction::Send(ControlMessage::HeartbeatAck)]
    );
    assert_eq!(control.poll_timeout(), Some(secs(18)));
    control.handle_timeout(secs(17)).expect("not yet");
    let error = control.handle_timeout(secs(18)).expect_err("silent");
    assert_eq!(error, ControlSessionError::Silent(secs(13)));
    assert_eq!(error.close_code(), close::PROTOCOL_ERROR);
    // At the default 30 s heartbeat: 100 s.
    let control = established_control(server_id, secs(30), secs(0));
    assert_eq!(control.poll_timeout(), Some(secs(100)));
}

#[test]
fn only_heartbeats_follow_the_hello_on_the_control_stream() {
    let server_id = Uuid::new_v4();
    let mut control = established_control(server_id, secs(30), secs(0));
    let error = control
        .handle(
            AgentMessage::Poll {
                highest_sequence: 0,
            },
            secs(1),
        )
        .expect_err("a poll on the control stream");
    assert_eq!(error, ControlSessionError::Unexpected("Poll"));
    assert_eq!(error.close_code(), close::PROTOCOL_ERROR);
    assert_eq!(
        error.to_string(),
        "only hello and heartbeats belong on the control stream"
    );
    // A second hello as well.
    let mut control = established_control(server_id, secs(30), secs(0));
    assert!(control
        .handle(
            AgentMessage::Hello {
                server_id,
                agent_version: "1".into()
            },
            secs(1)
        )
        .is_err());
    // Garbage after the hello says what it was; the stream ending is the agent leaving.
    let mut control = established_control(server_id, secs(30), secs(0));
    assert_eq!(
        control.handle_unreadable("truncated".into()),
        ControlSessionError::Unreadable("truncated".into())
    );
    let mut control = established_control(server_id, secs(30), secs(0));
    assert_eq!(control.handle_end(), Ok(()));
    assert_eq!(control.poll_timeout(), None);
}

#[test]
fn the_agent_refuses_anything_but_acks_once_welcomed() {
    let mut agent = welcomed_agent(Uuid::new_v4(), 30, secs(0));
    let error = agent
        .handle(ControlMessage::JobRecorded, secs(1))
        .expect_err("not on the control stream");
    assert_eq!(error, AgentSessionError::Unexpected("JobRecorded"));
    assert_eq!(error.close_code(), close::PROTOCOL_ERROR);
}

#[test]
fn a_job_runs_logs_and_is_recorded_on_both_sides() {
    let job_id = Uuid::new_v4();
    let mut agent = AgentSession::new(Uuid::new_v4(), "1".into(), AGENT_STEP, secs(0));
    drain_agent(&mut agent);
    let hello = agent.hello_sent().expect("hello");
    let mut agent_job = AgentJob::next(hello, None, 3);
    let mut control_job = ControlJob::new();

    let [AgentJobAction::Send(poll)] = &drain_agent_job(&mut agent_job)[..] else {
        panic!("a poll first");
    };
    control_job.handle(poll.clone()).expect("poll");
    assert_eq!(
        drain_control_job(&mut control_job),
        [ControlJobAction::Claim {
            highest_sequence: 3
        }]
    );
    control_job.claimed(job_id, job()).expect("claimed");
    assert_eq!(control_job.running(), Some(job_id));
    let [ControlJobAction::Send(sent)] = &drain_control_job(&mut control_job)[..] else {
        panic!("the job");
    };
    agent_job.handle(sent.clone()).expect("job");
    assert_eq!(
        drain_agent_job(&mut agent_job),
        [AgentJobAction::Run(job())]
    );

    let lines = vec![LogLine {
        stream: 1,
        text: "building".into(),
    }];
    agent_job.log(job_id, lines.clone()).expect("log");
    agent_job.log(job_id, Vec::new()).expect("nothing to log");
    agent_job.finish(job_id, succeeded()).expect("finish");
    let actions = drain_agent_job(&mut agent_job);
    assert_eq!(
        actions,
        [
            AgentJobAction::Send(AgentMessage::JobLog {
                job_id,
                lines: lines.clone()
            }),
            AgentJobAction::Keep {
                job_id,
                result: succeeded()
            },
            AgentJobAction::Send(AgentMessage::JobFinished {
                job_id,
                result: succeeded()
            }),
        ]
    );
    for action in actions {
        if let AgentJobAction::Send(message) = action {
            control_job.handle(message).expect("log and end");
        }
    }
    assert_eq!(
        drain_control_job(&mut control_job),
        [
            ControlJobAction::StoreLines { job_id, lines },
            ControlJobAction::Record {
                job_id,
                result: succeeded()
            },
        ]
    );
    control_job.recorded().expect("recorded");
    assert_eq!(
        drain_control_job(&mut control_job),
        [
            ControlJobAction::Send(ControlMessage::JobRecorded),
            ControlJobAction::Finish
        ]
    );
    assert!(control_job.is_done());
    agent_job
        .handle(ControlMessage::JobRecorded)
        .expect("recorded");
    assert_eq!(
        drain_agent_job(&mut agent_job),
        [AgentJobAction::Forget { job_id }, AgentJobAction::Finish]
    );
    assert!(agent_job.is_done());
}

#[test]
fn a_refused_job_is_recorded_as_failed_verification() {
    let job_id = Uuid::new_v4();
    let mut agent = AgentSession::new(Uuid::new_v4(), "1".into(), AGENT_STEP, secs(0));
    drain_agent(&mut agent);
    let mut agent_job = AgentJob::next(agent.hello_sent().expect("hello"), None, 0);
    drain_agent_job(&mut agent_job);
    agent_job.handle(ControlMessage::Job(job())).expect("job");
    drain_agent_job(&mut agent_job);
    agent_job
        .refuse(None, "bad signature".into())
        .expect("refuse");
    // Nothing to keep: a refused job has no result to report later.
    let refusal = AgentMessage::JobRefused {
        job_id: None,
        reason: "bad signature".into(),
    };
    assert_eq!(
        drain_agent_job(&mut agent_job),
        [AgentJobAction::Send(refusal.clone())]
    );
    assert_eq!(
        agent_job.finish(job_id, succeeded()),
        Err(OutOfOrder("finish"))
    );

    let mut control_job = running_control_job(job_id);
    control_job.handle(refusal).expect("refusal");
    assert_eq!(
        drain_control_job(&mut control_job),
        [
            ControlJobAction::Refused {
                job_id,
                reason: "bad signature".into()
            },
            ControlJobAction::Record {
                job_id,
                result: JobResult::failed("verify", "refused by the agent: bad signature")
            },
        ]
    );
    control_job.recorded().expect("recorded");
    agent_job.handle(ControlMessage::JobRecorded).expect("ack");
    assert_eq!(drain_agent_job(&mut agent_job), [AgentJobAction::Finish]);

    // A hostile agent's reason is cut (4,096 characters, NULs dropped) before anything is
    // appended to it or logged.
    let mut control_job = running_control_job(job_id);
    control_job
        .handle(AgentMessage::JobRefused {
            job_id: None,
            reason: format!("\0{}", "r".repeat(100_000)),
        })
        .expect("refusal");
    match drain_control_job(&mut control_job).as_slice() {
        [ControlJobAction::Refused { reason, .. }, ControlJobAction::Record { .. }] => {
            assert_eq!(reason, &"r".repeat(4096));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_result_from_a_lost_connection_is_reported_first_on_the_next() {
    let job_id = Uuid::new_v4();
    let mut agent = AgentSession::new(Uuid::new_v4(), "1".into(), AGENT_STEP, secs(0));
    drain_agent(&mut agent);
    let mut agent_job = AgentJob::next(agent.hello_sent().expect("hello"), None, 0);
    drain_agent_job(&mut agent_job);
    agent_job.handle(ControlMessage::Job(job())).expect("job");
    drain_agent_job(&mut agent_job);
    agent_job.finish(job_id, succeeded()).expect("finish");
    // The result is kept before it is sent; then the connection dies before the ack.
    let kept = match drain_agent_job(&mut agent_job).first() {
        Some(AgentJobAction::Keep { job_id, result }) => (*job_id, result.clone()),
        other => panic!("expected the result kept first, got {other:?}"),
    };
    drop(agent_job);
    drop(agent);

    // The next connection: hello, then the report before any poll.
    let mut agent = AgentSession::new(Uuid::new_v4(), "1".into(), AGENT_STEP, secs(60));
    drain_agent(&mut agent);
    let hello = agent.hello_sent().expect("hello");
    let mut report = AgentJob::next(hello, Some(kept), 9);
    let [AgentJobAction::Send(first)] = &drain_agent_job(&mut report)[..] else {
        panic!("one message first");
    };
    assert_eq!(
        first,
        &AgentMessage::JobReport {
            job_id,
            result: succeeded()
        }
    );
    let mut control_job = ControlJob::new();
    control_job.handle(first.clone()).expect("report");
    assert_eq!(
        drain_control_job(&mut control_job),
        [ControlJobAction::RecordReport {
            job_id,
            result: succeeded()
        }]
    );
    control_job.recorded().expect("recorded");
    assert_eq!(
        drain_control_job(&mut control_job),
        [
            ControlJobAction::Send(ControlMessage::JobRecorded),
            ControlJobAction::Finish
        ]
    );
    report.handle(ControlMessage::JobRecorded).expect("ack");
    assert_eq!(
        drain_agent_job(&mut report),
        [AgentJobAction::Forget { job_id }, AgentJobAction::Finish]
    );
    // Nothing left to report: the next stream polls.
    let mut poll = AgentJob::next(hello, None, 9);
    assert_eq!(
        drain_agent_job(&mut poll),
        [AgentJobAction::Send(AgentMessage::Poll {
            highest_sequence: 9
        })]
    );
}

#[test]
fn a_log_for_another_job_is_a_protocol_error() {
    let job_id = Uuid::new_v4();
    let other = Uuid::new_v4();
    let running = || running_control_job(job_id);
    let mut control_job = running();
    let error = control_job
        .handle(AgentMessage::JobLog {
            job_id: other,
            lines: Vec::new(),
        })
        .expect_err("foreign log");
    assert_eq!(
        error,
        ControlJobError::ForeignJob {
            expected: job_id,
            got: other
        }
    );
    assert_eq!(error.close_code(), close::PROTOCOL_ERROR);
    assert_eq!(drain_control_job(&mut control_job), [], "nothing stored");
    assert!(control_job.is_done());

    let mut control_job = running();
    assert!(matches!(
        control_job.handle(AgentMessage::JobFinished {
            job_id: other,
            result: succeeded()
        }),
        Err(ControlJobError::ForeignJob { .. })
    ));
    assert_eq!(drain_control_job(&mut control_job), [], "nothing recorded");
}

#[test]
fn a_job_stream_starts_with_a_poll_or_a_report() {
    let mut control_job = ControlJob::new();
    let error = control_job
        .handle(AgentMessage::Heartbeat)
        .expect_err("heartbeat on a job stream");
    assert_eq!(error, ControlJobError::ExpectedPollOrReport("Heartbeat"));
    assert_eq!(error.close_code(), close::PROTOCOL_ERROR);
    // And the agent waits for its job before it says anything more.
    let mut control_job = ControlJob::new();
    control_job
        .handle(AgentMessage::Poll {
            highest_sequence: 0,
        })
        .expect("poll");
    drain_control_job(&mut control_job);
    assert_eq!(
        control_job.handle(AgentMessage::Poll {
            highest_sequence: 0
        }),
        Err(ControlJobError::Unexpected("Poll"))
    );
}

#[test]
fn the_agent_refuses_what_does_not_answer_its_poll() {
    let mut agent = AgentSession::new(Uuid::new_v4(), "1".into(), AGENT_STEP, secs(0));
    drain_agent(&mut agent);
    let hello = agent.hello_sent().expect("hello");
    let mut agent_job = AgentJob::next(hello, None, 0);
    drain_agent_job(&mut agent_job);
    let error = agent_job
        .handle(ControlMessage::JobRecorded)
        .expect_err("no job");
    assert_eq!(error, AgentJobError::ExpectedJob("JobRecorded"));
    assert_eq!(error.close_code(), close::PROTOCOL_ERROR);
    let mut agent_job = AgentJob::next(hello, None, 0);
    agent_job.handle(ControlMessage::Job(job())).expect("job");
    assert_eq!(
        agent_job.handle(ControlMessage::Job(job())),
        Err(AgentJobError::WhileRunning("Job"))
    );
    assert_eq!(agent_job.log(Uuid::nil(), Vec::new()), Ok(()));
}

#[test]
fn a_revoked_close_stops_the_agent() {
    assert_eq!(
        CloseVerdict::from_application_close(close::REVOKED.into(), b"certificate revoked"),
        CloseVerdict::Stop
    );
    assert_eq!(
        CloseVerdict::from_application_close(close::REVOKED.into(), b""),
        CloseVerdict::Stop
    );
    // A protocol error or the agent's own leaving is never a reason to stop.
    assert_eq!(
        CloseVerdict::from_application_close(close::PROTOCOL_ERROR.into(), b"expected hello"),
        CloseVerdict::Retry
    );
    assert_eq!(
        CloseVerdict::from_application_close(close::LEAVING.into(), b""),
        CloseVerdict::Retry
    );
}

#[test]
fn retry_later_carries_a_delay_in_milliseconds() {
    let code = u64::from(close::RETRY_LATER);
    assert_eq!(
        CloseVerdict::from_application_close(code, b"1000"),
        CloseVerdict::RetryAfter(secs(1))
    );
    assert_eq!(
        CloseVerdict::from_application_close(code, b"0"),
        CloseVerdict::RetryAfter(Duration::ZERO)
    );
    // Capped at ten minutes; garbage falls back to the usual backoff.
    assert_eq!(
        CloseVerdict::from_application_close(code, b"3600000"),
        CloseVerdict::RetryAfter(secs(600))
    );
    for garbage in [&b""[..], b"-5", b"1.5", b" 100", b"\xff"] {
        assert_eq!(
            CloseVerdict::from_application_close(code, garbage),
            CloseVerdict::Retry,
            "{garbage:?}"
        );
    }
}

/// Every message in every state: the machines answer with errors, never panics.
#[test]
fn no_message_in_any_state_panics() {
    let id = Uuid::new_v4();
    let agent_messages = || {
        vec![
            AgentMessage::Hello {
                server_id: id,
                agent_version: String::new(),
            },
            AgentMessage::Heartbeat,
            AgentMessage::Poll {
                highest_sequence: u64::MAX,
            },
            AgentMessage::JobLog {
                job_id: id,
                lines: Vec::new(),
            },
            AgentMessage::JobFinished {
                job_id: id,
                result: succeeded(),
            },
            AgentMessage::JobRefused {
                job_id: None,
                reason: String::new(),
            },
            AgentMessage::JobReport {
                job_id: id,
                result: succeeded(),
            },
        ]
    };
    let control_messages = || {
        vec![
            ControlMessage::Welcome { heartbeat_secs: 0 },
            ControlMessage::HeartbeatAck,
            ControlMessage::Job(job()),
            ControlMessage::JobRecorded,
        ]
    };
    for first in agent_messages() {
        for second in agent_messages() {
            let mut control = ControlSession::new(id, secs(1), CONTROL_STEP, Duration::ZERO);
            let _ = control.stream_opened(Duration::ZERO);
            let _ = control.handle(first.clone(), secs(1));
            let _ = control.registered(secs(1));
            let _ = control.handle(second.clone(), secs(2));
            let _ = control.handle_timeout(secs(1000));
            drain_control(&mut control);

            let mut job_stream = ControlJob::new();
            let _ = job_stream.handle(first.clone());
            let _ = job_stream.claimed(id, job());
            let _ = job_stream.handle(second.clone());
            let _ = job_stream.recorded();
            let _ = job_stream.handle(second.clone());
            drain_control_job(&mut job_stream);
        }
    }
    for first in control_messages() {
        for second in control_messages() {
            let mut agent = AgentSession::new(id, String::new(), AGENT_STEP, Duration::ZERO);
            drain_agent(&mut agent);
            let _ = agent.handle(first.clone(), secs(1));
            let _ = agent.handle(second.clone(), secs(2));
            let _ = agent.handle_timeout(secs(1000));
            drain_agent(&mut agent);
            let hello = agent.hello_sent().expect("hello");
            let mut job_stream = AgentJob::next(hello, None, 0);
            let _ = job_stream.handle(first.clone());
            let _ = job_stream.finish(id, succeeded());
            let _ = job_stream.handle(second.clone());
            let _ = job_stream.handle(first.clone());
            drain_agent_job(&mut job_stream);
        }
    }
}

fn drain_renewal(renewal: &mut AgentRenewal<Duration>) -> Vec<AgentRenewalAction> {
    std::iter::from_fn(|| renewal.poll()).collect()
}

fn hello_sent() -> HelloSent {
    let mut agent = AgentSession::new(Uuid::new_v4(), "1.0.0".into(), AGENT_STEP, Duration::ZERO);
    drain_agent(&mut agent);
    agent.hello_sent().expect("hello")
}

#[test]
fn a_renewal_is_answered_stored_and_then_drains_the_session() {
    let mut renewal = AgentRenewal::new(hello_sent(), vec![1, 2, 3], AGENT_STEP, secs(100));
    assert_eq!(
        drain_renewal(&mut renewal),
        [AgentRenewalAction::Send(AgentMessage::Renew {
            csr_der: vec![1, 2, 3]
        })]
    );
    assert_eq!(renewal.poll_timeout(), Some(secs(115)));

    let mut control = ControlJob::new();
    control
        .handle(AgentMessage::Renew {
            csr_der: vec![1, 2, 3],
        })
        .expect("renew");
    assert_eq!(
        drain_control_job(&mut control),
        [ControlJobAction::Renew {
            csr_der: vec![1, 2, 3]
        }]
    );
    assert_eq!(
        control.claimed(Uuid::new_v4(), job()),
        Err(OutOfOrder("claimed"))
    );
    control.renewed("CERT".into()).expect("renewed");
    let sent = drain_control_job(&mut control);
    assert_eq!(
        sent,
        [ControlJobAction::Send(ControlMessage::Renewed {
            certificate_pem: "CERT".into()
        })]
    );
    assert!(!control.is_done(), "the agent has not stored it yet");

    renewal
        .handle(ControlMessage::Renewed {
            certificate_pem: "CERT".into(),
        })
        .expect("renewed");
    assert_eq!(
        drain_renewal(&mut renewal),
        [AgentRenewalAction::Store {
            certificate_pem: "CERT".into()
        }]
    );
    assert_eq!(renewal.poll_timeout(), None, "storing takes what it takes");
    renewal.stored().expect("stored");
    assert_eq!(drain_renewal(&mut renewal), [AgentRenewalAction::Finish]);
    assert!(renewal.is_done());
    assert_eq!(renewal.handle_end(), Ok(()));

    // The agent's end of stream is the sign that it stored the certificate.
    control.handle_end();
    assert_eq!(
        drain_control_job(&mut control),
        [ControlJobAction::Drain, ControlJobAction::Finish]
    );
    assert!(control.is_done());
}

#[test]
fn a_renewal_whose_certificate_was_not_stored_does_not_drain() {
    let mut control = ControlJob::new();
    control
        .handle(AgentMessage::Renew { csr_der: vec![1] })
        .expect("renew");
    drain_control_job(&mut control);
    control.renewed("CERT".into()).expect("renewed");
    drain_control_job(&mut control);
    // The agent could not store it and reset the stream: the driver sees an error, not an
    // end, and calls nothing. A message instead of the end is a protocol error.
    assert_eq!(
        control.handle(AgentMessage::Heartbeat),
        Err(ControlJobError::Unexpected("Heartbeat"))
    );
    assert_eq!(drain_control_job(&mut control), []);
}

#[test]
fn a_refused_renewal_says_why_and_ends_the_stream() {
    let mut control = ControlJob::new();
    control
        .handle(AgentMessage::Renew { csr_der: vec![1] })
        .expect("renew");
    drain_control_job(&mut control);
    control
        .renewal_refused(RenewalRefusal::KeyReused)
        .expect("refused");
    assert_eq!(
        drain_control_job(&mut control),
        [
            ControlJobAction::Send(ControlMessage::RenewalRefused {
                reason: RenewalRefusal::KeyReused
            }),
            ControlJobAction::Finish
        ]
    );
    assert!(control.is_done());
    control.handle_end();
    assert_eq!(
        drain_control_job(&mut control),
        [],
        "no drain after a refusal"
    );

    let mut renewal = AgentRenewal::new(hello_sent(), vec![1], AGENT_STEP, Duration::ZERO);
    drain_renewal(&mut renewal);
    let error = renewal
        .handle(ControlMessage::RenewalRefused {
            reason: RenewalRefusal::KeyReused,
        })
        .expect_err("refused");
    assert_eq!(error, AgentRenewalError::Refused(RenewalRefusal::KeyReused));
    assert!(!error.is_final(), "a new key may do");
    assert!(AgentRenewalError::Refused(RenewalRefusal::Revoked).is_final());
    assert!(AgentRenewalError::Refused(RenewalRefusal::Expired).is_final());
    assert!(renewal.is_done());
    assert_eq!(renewal.stored(), Err(OutOfOrder("stored")));
}

#[test]
fn an_oversized_csr_is_refused_unread() {
    let mut control = ControlJob::new();
    control
        .handle(AgentMessage::Renew {
            csr_der: vec![0; crate::protocol::MAX_CSR_LEN + 1],
        })
        .expect("refused, not a protocol error");
    assert_eq!(
        drain_control_job(&mut control),
        [
            ControlJobAction::Send(ControlMessage::RenewalRefused {
                reason: RenewalRefusal::MalformedCsr
            }),
            ControlJobAction::Finish
        ]
    );
}

/// A control plane older than renewal cannot decode `Renew` and drops the stream: the agent
/// sees its stream end without an answer, which is a failed attempt (backed off by the
/// schedule), never a reason to close the session.
#[test]
fn an_older_control_plane_that_drops_the_stream_is_a_failed_attempt() {
    let mut renewal = AgentRenewal::new(hello_sent(), vec![1], AGENT_STEP, Duration::ZERO);
    drain_renewal(&mut renewal);
    assert_eq!(renewal.handle_end(), Err(AgentRenewalError::Unanswered));
    assert!(renewal.is_done());
    assert_eq!(renewal.poll_timeout(), None);

    // Silence instead: the step timeout.
    let mut renewal = AgentRenewal::new(hello_sent(), vec![1], AGENT_STEP, secs(10));
    drain_renewal(&mut renewal);
    assert_eq!(renewal.handle_timeout(secs(24)), Ok(()));
    assert_eq!(
        renewal.handle_timeout(secs(25)),
        Err(AgentRenewalError::NoAnswer(AGENT_STEP))
    );

    // A job where the answer belongs, or a certificate too large to be one.
    let mut renewal = AgentRenewal::new(hello_sent(), vec![1], AGENT_STEP, Duration::ZERO);
    assert_eq!(
        renewal.handle(ControlMessage::Job(job())),
        Err(AgentRenewalError::Unexpected("Job"))
    );
    let mut renewal = AgentRenewal::new(hello_sent(), vec![1], AGENT_STEP, Duration::ZERO);
    assert_eq!(
        renewal.handle(ControlMessage::Renewed {
            certificate_pem: "x".repeat(crate::protocol::MAX_CERTIFICATE_PEM_LEN + 1)
        }),
        Err(AgentRenewalError::Unexpected("Renewed"))
    );
}

#[test]
fn renewal_messages_out_of_place_are_protocol_errors() {
    // On the control stream, after the welcome.
    let server_id = Uuid::new_v4();
    let mut control = established_control(server_id, secs(30), Duration::ZERO);
    assert_eq!(
        control.handle(AgentMessage::Renew { csr_der: vec![1] }, secs(1)),
        Err(ControlSessionError::Unexpected("Renew"))
    );
    // In the middle of a job.
    let mut exchange = ControlJob::new();
    exchange
        .handle(AgentMessage::Poll {
            highest_sequence: 0,
        })
        .expect("poll");
    drain_control_job(&mut exchange);
    exchange.claimed(Uuid::new_v4(), job()).expect("claimed");
    assert_eq!(
        exchange.handle(AgentMessage::Renew { csr_der: vec![1] }),
        Err(ControlJobError::Unexpected("Renew"))
    );
    // On the agent's control stream.
    let mut agent = welcomed_agent(server_id, 30, secs(1));
    assert_eq!(
        agent.handle(
            ControlMessage::RenewalRefused {
                reason: RenewalRefusal::TooSoon
            },
            secs(2)
        ),
        Err(AgentSessionError::Unexpected("RenewalRefused"))
    );
}

fn drain_trust(trust: &mut AgentTrust) -> Vec<AgentTrustAction> {
    std::iter::from_fn(|| trust.poll()).collect()
}

fn endorsement(renew: bool) -> ControlMessage {
    ControlMessage::CaEndorsed {
        ca_pem: "-----BEGIN CERTIFICATE-----\n...".into(),
        endorser: [7; 32],
        signature: vec![9; 70],
        renew,
    }
}

/// The watch is held open (no timer on either side: a rotation may come days later); the
/// endorsement is checked and stored by the agent's driver, and only the end of the stream
/// tells the control plane the new CA is pinned.
#[test]
fn a_trust_watch_waits_for_a_rotation_and_ends_once_the_ca_is_pinned() {
    let mut agent = AgentTrust::new(hello_sent(), vec![[7; 32]]).expect("watch");
    let actions: [AgentTrustAction; 1] = drain_trust(&mut agent).try_into().expect("one");
    let [AgentTrustAction::Send(watch)] = actions else {
        panic!("the watch goes out first");
    };
    assert_eq!(
        watch,
        AgentMessage::WatchTrust {
            pinned_cas: vec![[7; 32]]
        }
    );
    let mut control = ControlJob::new();
    control.handle(watch).expect("watch");
    assert_eq!(
        drain_control_job(&mut control),
        [ControlJobAction::WatchTrust {
            pinned_cas: vec![[7; 32]]
        }]
    );
    assert!(control.is_watching());
    // Only an endorsement is sent on a watch.
    assert_eq!(
        control.announce(ControlMessage::HeartbeatAck),
        Err(OutOfOrder("announce"))
    );
    control.announce(endorsement(true)).expect("endorse");
    let actions: [ControlJobAction; 1] = drain_control_job(&mut control).try_into().expect("one");
    let [ControlJobAction::Send(sent)] = actions else {
        panic!("the endorsement is sent");
    };
    agent.handle(sent).expect("endorsement");
    assert_eq!(
        drain_trust(&mut agent),
        [AgentTrustAction::Check {
            ca_pem: "-----BEGIN CERTIFICATE-----\n...".into(),
            endorser: [7; 32],
            signature: vec![9; 70],
            renew: true,
        }]
    );
    // Not pinned yet: no ack until the driver says it is stored.
    assert!(!agent.is_done());
    agent.stored().expect("stored");
    assert_eq!(drain_trust(&mut agent), [AgentTrustAction::Finish]);
    assert!(agent.is_done());
    control.handle_end();
    assert_eq!(
        drain_control_job(&mut control),
        [ControlJobAction::TrustStored, ControlJobAction::Finish]
    );
    assert!(control.is_done());
}

/// A forged endorsement (the driver's check fails) resets the stream: the control plane
/// never hears "pinned", and the agent stored nothing.
#[test]
fn a_refused_endorsement_resets_the_stream_and_records_nothing() {
    let mut agent = AgentTrust::new(hello_sent(), vec![[7; 32]]).expect("watch");
    drain_trust(&mut agent);
    let mut control = ControlJob::new();
    control
        .handle(AgentMessage::WatchTrust {
            pinned_cas: vec![[7; 32]],
        })
        .expect("watch");
    drain_control_job(&mut control);
    control.announce(endorsement(false)).expect("endorse");
    drain_control_job(&mut control);
    agent.handle(endorsement(false)).expect("read");
    drain_trust(&mut agent);
    agent.stored().expect("stored");
    // One verdict per endorsement: a second is out of order.
    assert_eq!(agent.refused(), Err(OutOfOrder("refused")));

    let mut forged = AgentTrust::new(hello_sent(), vec![[7; 32]]).expect("watch");
    drain_trust(&mut forged);
    forged.handle(endorsement(false)).expect("read");
    drain_trust(&mut forged);
    forged.refused().expect("refused");
    assert_eq!(drain_trust(&mut forged), [AgentTrustAction::Reset]);
    assert!(forged.is_done());
    // A reset is no end of stream on the control plane's side: it only sees the stream go,
    // which for a watch records nothing.
    let mut control = ControlJob::new();
    control
        .handle(AgentMessage::WatchTrust { pinned_cas: vec![] })
        .expect("watch");
    drain_control_job(&mut control);
    control.handle_end();
    assert_eq!(drain_control_job(&mut control), []);
    assert!(control.is_done());
}

/// Everything but an endorsement within bounds is refused on a trust stream, on both sides;
/// an older control plane dropping the stream is no error for the session.
#[test]
fn trust_messages_out_of_place_or_too_large_are_refused() {
    let oversized = [
        ControlMessage::CaEndorsed {
            ca_pem: "x".repeat(crate::protocol::MAX_CERTIFICATE_PEM_LEN + 1),
            endorser: [0; 32],
            signature: vec![],
            renew: false,
        },
        ControlMessage::CaEndorsed {
            ca_pem: String::new(),
            endorser: [0; 32],
            signature: vec![0; crate::protocol::MAX_SIGNATURE_LEN + 1],
            renew: false,
        },
        ControlMessage::HeartbeatAck,
        ControlMessage::Job(job()),
    ];
    for message in oversized {
        let mut agent = AgentTrust::new(hello_sent(), vec![]).expect("watch");
        drain_trust(&mut agent);
        assert!(matches!(
            agent.handle(message),
            Err(AgentTrustError::Unexpected(_))
        ));
        assert_eq!(drain_trust(&mut agent), [AgentTrustAction::Reset]);
        assert!(agent.is_done());
    }
    // A second endorsement on the same stream.
    let mut agent = AgentTrust::new(hello_sent(), vec![]).expect("watch");
    drain_trust(&mut agent);
    agent.handle(endorsement(false)).expect("first");
    assert!(agent.handle(endorsement(false)).is_err());
    // Too many pinned CAs: the agent does not send it, the control plane refuses it.
    let many = vec![[1; 32]; crate::protocol::MAX_PINNED_CAS + 1];
    assert_eq!(
        AgentTrust::new(hello_sent(), many.clone()).map(|_| ()),
        Err(AgentTrustError::TooManyPinned(many.len()))
    );
    let mut control = ControlJob::new();
    assert!(control
        .handle(AgentMessage::WatchTrust { pinned_cas: many })
        .is_err());
    // The agent may send nothing on a watch but the watch.
    let mut control = ControlJob::new();
    control
        .handle(AgentMessage::WatchTrust { pinned_cas: vec![] })
        .expect("watch");
    assert!(control.handle(AgentMessage::Heartbeat).is_err());
    // An older control plane cannot read WatchTrust and drops the stream.
    let mut agent = AgentTrust::new(hello_sent(), vec![]).expect("watch");
    drain_trust(&mut agent);
    assert_eq!(agent.handle_end(), Err(AgentTrustError::Unanswered));
    assert_eq!(agent.handle_end(), Ok(()));
}

/// The rotation messages are appended: the older variants keep their encoding.
#[test]
fn trust_messages_are_appended_to_the_protocol() {
    let watch = crate::encode(&AgentMessage::WatchTrust { pinned_cas: vec![] }).expect("enc");
    assert_eq!(watch[0], 8);
    assert_eq!(crate::encode(&endorsement(true)).expect("enc")[0], 6);
    assert_eq!(crate::encode(&AgentMessage::Heartbeat).expect("enc"), [1]);
}

/// After `ca retire`, a watching agent that still pins the retired CA is told to unpin it;
/// the agent's driver keeps the current CA whatever the message says.
#[test]
fn a_retired_ca_is_unpinned_through_the_watch() {
    let mut agent = AgentTrust::new(hello_sent(), vec![[1; 32], [2; 32]]).expect("watch");
    drain_trust(&mut agent);
    let mut control = ControlJob::new();
    control
        .handle(AgentMessage::WatchTrust {
            pinned_cas: vec![[1; 32], [2; 32]],
        })
        .expect("watch");
    drain_control_job(&mut control);
    let retired = ControlMessage::CaRetired {
        retired: vec![[1; 32]],
        current: [2; 32],
    };
    control.announce(retired.clone()).expect("announce");
    assert_eq!(
        drain_control_job(&mut control),
        [ControlJobAction::Send(retired.clone())]
    );
    agent.handle(retired).expect("read");
    assert_eq!(
        drain_trust(&mut agent),
        [AgentTrustAction::Unpin {
            retired: vec![[1; 32]],
            current: [2; 32]
        }]
    );
    agent.stored().expect("unpinned");
    assert_eq!(drain_trust(&mut agent), [AgentTrustAction::Finish]);
    control.handle_end();
    assert_eq!(
        drain_control_job(&mut control),
        [ControlJobAction::TrustStored, ControlJobAction::Finish]
    );
    // Naming more CAs than a watch may is refused unread.
    let mut agent = AgentTrust::new(hello_sent(), vec![]).expect("watch");
    drain_trust(&mut agent);
    assert!(agent
        .handle(ControlMessage::CaRetired {
            retired: vec![[0; 32]; crate::protocol::MAX_PINNED_CAS + 1],
            current: [2; 32],
        })
        .is_err());
    assert_eq!(drain_trust(&mut agent), [AgentTrustAction::Reset]);
}

/// A watch naming job keys too: a new job key endorsed by a pinned one is checked and stored
/// by the driver, the stream ends; a retirement is handled the same way. The job-key answers
/// are appended to the protocol and refused on a plain `WatchTrust`, or when too large.
#[test]
fn a_watch_with_job_keys_follows_a_job_key_rotation() {
    let mut agent =
        AgentTrust::with_job_keys(hello_sent(), vec![[7; 32]], vec![[1; 32]]).expect("watch");
    let actions: [AgentTrustAction; 1] = drain_trust(&mut agent).try_into().expect("one");
    let [AgentTrustAction::Send(watch)] = actions else {
        panic!("the watch goes out first");
    };
    let encoded = crate::encode(&watch).expect("enc");
    assert_eq!(encoded[0], 9, "appended after WatchTrust");
    let mut control = ControlJob::new();
    control.handle(watch).expect("watch");
    assert_eq!(
        drain_control_job(&mut control),
        [ControlJobAction::WatchTrustAndJobKeys {
            pinned_cas: vec![[7; 32]],
            job_keys: vec![[1; 32]],
        }]
    );
    let news = ControlMessage::JobKeyEndorsed {
        new_key: [2; 32],
        endorser: [1; 32],
        signature: vec![5; 64],
    };
    assert_eq!(crate::encode(&news).expect("enc")[0], 8);
    control.announce(news.clone()).expect("announce");
    assert_eq!(
        drain_control_job(&mut control),
        [ControlJobAction::Send(news.clone())]
    );
    agent.handle(news).expect("read");
    assert_eq!(
        drain_trust(&mut agent),
        [AgentTrustAction::CheckJobKey {
            new_key: [2; 32],
            endorser: [1; 32],
            signature: vec![5; 64],
        }]
    );
    agent.stored().expect("stored");
    assert_eq!(drain_trust(&mut agent), [AgentTrustAction::Finish]);
    control.handle_end();
    assert_eq!(
        drain_control_job(&mut control),
        [ControlJobAction::TrustStored, ControlJobAction::Finish]
    );

    let retired = ControlMessage::JobKeyRetired {
        retired: vec![[1; 32]],
        current: [2; 32],
    };
    assert_eq!(crate::encode(&retired).expect("enc")[0], 9);
    let mut agent =
        AgentTrust::with_job_keys(hello_sent(), vec![], vec![[1; 32], [2; 32]]).expect("watch");
    drain_trust(&mut agent);
    agent.handle(retired.clone()).expect("read");
    assert_eq!(
        drain_trust(&mut agent),
        [AgentTrustAction::UnpinJobKeys {
            retired: vec![[1; 32]],
            current: [2; 32]
        }]
    );
    // A forged one is refused by the driver: the stream is reset.
    agent.refused().expect("refused");
    assert_eq!(drain_trust(&mut agent), [AgentTrustAction::Reset]);

    // A plain WatchTrust takes no job-key news; nor does any watch take one too large.
    let too_large = [
        ControlMessage::JobKeyEndorsed {
            new_key: [2; 32],
            endorser: [1; 32],
            signature: vec![0; crate::protocol::MAX_SIGNATURE_LEN + 1],
        },
        ControlMessage::JobKeyRetired {
            retired: vec![[0; 32]; crate::protocol::MAX_PINNED_JOB_KEYS + 1],
            current: [2; 32],
        },
    ];
    for message in [retired].into_iter().chain(too_large.clone()) {
        let mut plain = AgentTrust::new(hello_sent(), vec![]).expect("watch");
        drain_trust(&mut plain);
        assert!(plain.handle(message).is_err());
        assert_eq!(drain_trust(&mut plain), [AgentTrustAction::Reset]);
    }
    for message in too_large {
        let mut agent =
            AgentTrust::with_job_keys(hello_sent(), vec![], vec![[1; 32]]).expect("watch");
        drain_trust(&mut agent);
        assert!(agent.handle(message).is_err());
        assert_eq!(drain_trust(&mut agent), [AgentTrustAction::Reset]);
    }
    // A control plane older than job-key rotation cannot read the watch and drops the
    // stream: `Unanswered`, on which the agent's driver watches again with `WatchTrust`.
    let mut agent =
        AgentTrust::with_job_keys(hello_sent(), vec![[7; 32]], vec![[1; 32]]).expect("watch");
    drain_trust(&mut agent);
    assert_eq!(agent.handle_end(), Err(AgentTrustError::Unanswered));
    // Naming too many keys: the agent does not send it, the control plane refuses it.
    let many = vec![[1; 32]; crate::protocol::MAX_PINNED_JOB_KEYS + 1];
    assert_eq!(
        AgentTrust::with_job_keys(hello_sent(), vec![], many.clone()).map(|_| ()),
        Err(AgentTrustError::TooManyJobKeys(many.len()))
    );
    assert!(ControlJob::new()
        .handle(AgentMessage::WatchTrustAndJobKeys {
            pinned_cas: vec![],
            job_keys: many,
        })
        .is_err());
}

/// A host description within bounds is stored and the stream finished; one out of bounds is
/// a protocol error and stores nothing.
#[test]
fn host_facts_are_stored_only_within_bounds() {
    let mut job = ControlJob::new();
    job.handle(AgentMessage::HostFacts {
        os: "Debian GNU/Linux 12 (bookworm)".into(),
        arch: "x86_64".into(),
    })
    .expect("accepted");
    assert_eq!(
        job.poll(),
        Some(ControlJobAction::StoreHostFacts {
            os: "Debian GNU/Linux 12 (bookworm)".into(),
            arch: "x86_64".into()
        })
    );
    assert_eq!(job.poll(), Some(ControlJobAction::Finish));
    assert!(job.is_done());

    for (os, arch) in [
        ("x".repeat(101), "x86_64".to_owned()),
        ("Linux\u{1b}[2J".to_owned(), "x86_64".to_owned()),
        ("Linux".to_owned(), "x86_64; rm".to_owned()),
    ] {
        let mut job = ControlJob::new();
        assert!(job.handle(AgentMessage::HostFacts { os, arch }).is_err());
        assert_eq!(job.poll(), None, "nothing to store");
        assert!(job.is_done());
    }
}

/// The control plane's side of a job stream whose poll was answered with job `job_id`.
fn running_control_job(job_id: Uuid) -> ControlJob {
    let mut control_job = ControlJob::new();
    control_job
        .handle(AgentMessage::Poll {
            highest_sequence: 0,
        })
        .expect("poll");
    control_job.claimed(job_id, job()).expect("claimed");
    drain_control_job(&mut control_job);
    control_job
}
