//! Switchboard: the front door of a telecom operator's complaint handling.
//!
//! Data flows one way: listener (`http`) → channel (`channels`) → `pipeline` → `sink`.
#![forbid(unsafe_code)]

pub mod ack_mail;
pub mod app;
pub mod attachments;
pub mod auth;
pub mod channels;
pub mod config;
pub mod dedupe;
pub mod disk;
pub mod error;
pub mod fuzzing;
pub mod http;
pub mod identity;
pub mod limits;
pub mod pipeline;
pub mod record;
pub mod replies;
pub mod shared;
pub mod sink;
pub mod smtp;
pub mod telemetry;
pub mod tls;
pub mod triage;
