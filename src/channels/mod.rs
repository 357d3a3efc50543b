//! Channel adapters: each turns one authenticated request into `Intake`s for the pipeline and
//! formats the reply its sender expects. One provider, one file.

pub mod api;
