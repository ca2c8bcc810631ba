//! Where state lives: the PostgreSQL pool, roles and migrations ([`db`]) and the embedded
//! cluster the quickstart and single-box installs run ([`postgres_cluster`]).

pub mod db;
pub mod postgres_cluster;
