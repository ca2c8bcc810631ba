//! Everything about agents on the control-plane side, one file per step of their life:
//! [`authority`] holds the CAs and follows a CA rotation, which [`ca_rotation`] starts and ends;
//! [`gateway`] accepts QUIC connections and tells enrollments from sessions; [`enroll`] turns
//! a token and a CSR into a certificate; [`session`] keeps a connected agent's control stream;
//! [`hub`] is the live state (valid certificates, open connections) shared with the API;
//! [`cert_events`] keeps every replica's hub in step through PostgreSQL NOTIFY;
//! [`presence`] batches connection marks (a connected agent's "last seen" is its replica's
//! heartbeat, so agents' own heartbeats cost the database nothing);
//! [`dispatch`] serves an agent's job polls over the life of a job kept in
//! [`crate::jobs`]; [`renew`] renews a connected agent's certificate, and [`drain`] lets its
//! session end between jobs so that the agent reconnects with the new one.

pub mod authority;
pub mod ca_rotation;
pub mod cert_events;
pub mod dispatch;
pub mod drain;
pub mod enroll;
pub mod gateway;
pub mod hub;
pub mod job_key_rotation;
pub mod presence;
pub mod renew;
pub mod session;

pub use hub::AgentHub;
