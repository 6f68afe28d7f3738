//! The integration suite: real metald processes against the real Docker Engine.

mod bad_input;
mod binary;
mod caps;
mod cli;
mod concurrency;
mod isolation;
mod lifecycle;
mod load;
mod outage;
mod restart;
mod support;
mod tls;
mod vm_refused;
