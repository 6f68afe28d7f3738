//! metald-cli end to end against a live metald (issue 4).
