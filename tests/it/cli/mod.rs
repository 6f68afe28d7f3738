//! metald-cli end to end (issue 4, spec §10): the real binary against a live metald and the
//! real Docker Engine — every command in text and `--json`, config files and templates,
//! `config-gen | config-validate -`, exit codes 1/2/3, global flags anywhere, env fallbacks.

use std::io::Write as _;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::support::*;

mod commands;
mod config;
mod flags;
mod tls;

pub(super) const BIN: &str = env!("CARGO_BIN_EXE_metald-cli");

/// The CLI's environment fallbacks: cleared for every run so the caller's shell cannot leak
/// into a test; a test sets the ones it means.
pub(super) const CLI_ENV: [&str; 7] = [
    "UNKEY_METALD_SERVER_ADDRESS",
    "UNKEY_METALD_USER_ID",
    "UNKEY_METALD_TENANT_ID",
    "UNKEY_METALD_TLS_MODE",
    "UNKEY_METALD_TLS_CERT_FILE",
    "UNKEY_METALD_TLS_KEY_FILE",
    "UNKEY_METALD_TLS_CA_FILE",
];

#[derive(Debug)]
pub(super) struct Run {
    pub(super) code: i32,
    pub(super) stdout: String,
    pub(super) stderr: String,
}

impl Run {
    /// Asserts success and returns self.
    pub(super) fn ok(self) -> Self {
        assert_eq!(self.code, 0, "metald-cli failed: {self:#?}");
        self
    }

    /// Asserts the exit code and the one-line `error: <code>: …` on stderr.
    pub(super) fn fails(self, exit: i32, code: &str) -> Self {
        assert_eq!(self.code, exit, "wrong exit code: {self:#?}");
        let last = self.stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with(&format!("error: {code}: ")),
            "stderr does not end in `error: {code}: …`: {self:#?}"
        );
        assert!(self.stdout.is_empty() || exit == 1, "{self:#?}");
        self
    }

    /// stdout as exactly one JSON document.
    pub(super) fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:#?}"))
    }

    /// The value of a `Label: value` line of the text output.
    pub(super) fn field(&self, label: &str) -> String {
        let prefix = format!("{label}: ");
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line: {self:#?}"))
            .to_owned()
    }
}

pub(super) fn cli(args: &[&str]) -> Run {
    cli_with(args, &[], None)
}

pub(super) fn cli_with(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in CLI_ENV {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn metald-cli");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(input.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait for metald-cli");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `metald-cli --server <m> --user <user> <args…>`.
pub(super) fn as_user(m: &Metald, user: &str, args: &[&str]) -> Run {
    let base = m.base();
    let mut all = vec!["--server", base.as_str(), "--user", user];
    all.extend_from_slice(args);
    cli(&all)
}

/// A small VM's flags: the test image, 32 MB.
pub(super) const SMALL: [&str; 6] = [
    "--template",
    "minimal",
    "--docker-image",
    IMAGE,
    "--memory",
    "32",
];

pub(super) fn with_small<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut v = args.to_vec();
    v.extend_from_slice(&SMALL);
    v
}

pub(super) fn config_example(name: &str) -> String {
    format!("{}/examples/configs/{name}", env!("CARGO_MANIFEST_DIR"))
}
