//! The integration suite: real metald processes against the real Docker Engine.

mod bad_input;
mod binary;
mod cli;
mod concurrency;
mod lifecycle;
mod outage;
mod restart;
mod support;
mod tls;
