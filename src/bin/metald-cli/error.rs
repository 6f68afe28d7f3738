//! The CLI's one error type and its exit codes (spec §10: 1 server error, 2 usage, 3 unreachable).

use std::fmt;

/// Everything that ends a command early. Each variant decides the exit code; `Display` is the
/// single stderr line `error: <code>: <message>`.
#[derive(Debug)]
pub enum CliError {
    /// The server answered with a Connect error.
    Server { code: String, message: String },
    /// The server could not be reached or did not answer in time.
    Unreachable { code: &'static str, message: String },
    /// The command line itself is wrong (exit 2, like clap's own errors).
    Usage(String),
    /// Input the command was given is invalid (a config file, a failed validation): exit 1,
    /// because the spec treats "the reasons" of config-validate as a failed check, not a usage error.
    Invalid(String),
    /// Local I/O that should not fail (writing stdout, the runtime).
    Internal(String),
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Server { .. } | CliError::Invalid(_) | CliError::Internal(_) => 1,
            CliError::Usage(_) => 2,
            CliError::Unreachable { .. } => 3,
        }
    }

    /// The Connect code shown after `error:`. Local failures use the Connect code that
    /// describes them best, so scripts see one vocabulary whatever failed.
    pub fn code(&self) -> &str {
        match self {
            CliError::Server { code, .. } => code,
            CliError::Unreachable { code, .. } => code,
            CliError::Usage(_) | CliError::Invalid(_) => "invalid_argument",
            CliError::Internal(_) => "internal",
        }
    }

    fn message(&self) -> &str {
        match self {
            CliError::Server { message, .. }
            | CliError::Unreachable { message, .. }
            | CliError::Usage(message)
            | CliError::Invalid(message)
            | CliError::Internal(message) => message,
        }
    }

    /// Adds context after the message (e.g. which VM was left created when boot failed).
    pub fn with_suffix(mut self, suffix: &str) -> Self {
        match &mut self {
            CliError::Server { message, .. }
            | CliError::Unreachable { message, .. }
            | CliError::Usage(message)
            | CliError::Invalid(message)
            | CliError::Internal(message) => message.push_str(suffix),
        }
        self
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line, always: scripts read the last line of stderr.
        let message = one_line(self.message());
        write!(f, "error: {}: {}", self.code(), message)
    }
}

/// Collapses whitespace runs (newlines included) into single spaces.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Writing to stdout failed (closed pipe etc.).
pub fn io_error(e: std::io::Error) -> CliError {
    CliError::Internal(format!("writing output: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_one_line_with_code() {
        let e = CliError::Server {
            code: "not_found".into(),
            message: "vm x\nnot found".into(),
        };
        assert_eq!(e.to_string(), "error: not_found: vm x not found");
        assert_eq!(e.exit_code(), 1);
        assert_eq!(CliError::Usage("x".into()).exit_code(), 2);
        let u = CliError::Unreachable {
            code: "unavailable",
            message: "refused".into(),
        };
        assert_eq!(u.exit_code(), 3);
    }
}
