//! TLS serving (UNKEY_METALD_TLS_MODE=file): HTTP/1.1 and HTTP/2 over TLS, and client
//! certificates required when a CA is configured. curl is the independent client.

use std::path::Path;
use std::process::Command;

use crate::support::*;

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success(), "openssl {args:?}");
}

/// A CA, a server certificate for 127.0.0.1, and a client certificate, all signed by the CA.
fn make_pki(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=metald-test-ca",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "client.key",
            "-out",
            "client.csr",
            "-subj",
            "/CN=metald-client",
        ],
    );
    // An extension makes it an X.509 v3 certificate, which webpki requires.
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "client.pem",
            "-days",
            "2",
            "-extfile",
            "client.ext",
        ],
    );
}

fn curl(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .arg("-sS")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

async fn wait_tls_healthy(dir: &Path, port: u16, client_cert: bool) {
    let url = format!("https://127.0.0.1:{port}/health");
    let mut args = vec!["--cacert", "ca.pem", "-f", url.as_str()];
    if client_cert {
        args.extend(["--cert", "client.pem", "--key", "client.key"]);
    }
    for _ in 0..300 {
        if curl(dir, &args).0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("metald did not answer over TLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_connect_over_tls_and_requires_client_certificates_with_a_ca() {
    ensure_image();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d);
    let cert = d.join("server.pem").display().to_string();
    let key = d.join("server.key").display().to_string();
    let ca = d.join("ca.pem").display().to_string();

    // Server certificate only.
    let m = MetaldTls::start(
        "tlsplain",
        &[
            ("UNKEY_METALD_TLS_MODE", "file"),
            ("UNKEY_METALD_TLS_CERT_FILE", &cert),
            ("UNKEY_METALD_TLS_KEY_FILE", &key),
        ],
    );
    wait_tls_healthy(d, m.port, false).await;
    let url = format!(
        "https://127.0.0.1:{}/metal.vmprovisioner.v1.VmService/ListVms",
        m.port
    );
    let rpc = [
        "-H",
        "content-type: application/json",
        "-H",
        "authorization: Bearer dev_user_alice",
        "-H",
        "x-tenant-id: t",
        "-d",
        "{}",
    ];
    for version in ["--http1.1", "--http2"] {
        let mut args = vec!["--cacert", "ca.pem", version, "-w", " %{http_version}"];
        args.extend(rpc);
        args.push(&url);
        let (ok, out) = curl(d, &args);
        assert!(ok && out.starts_with('{'), "{version}: {out}");
        assert!(
            out.ends_with(if version == "--http2" { " 2" } else { " 1.1" }),
            "{version}: {out}"
        );
    }
    let (ok, _) = curl(d, &["-f", &format!("http://127.0.0.1:{}/health", m.port)]);
    assert!(!ok, "no cleartext on a TLS port");
    drop(m);

    // With a CA: clients must present a certificate it signed.
    let m = MetaldTls::start(
        "tlsmutual",
        &[
            ("UNKEY_METALD_TLS_MODE", "file"),
            ("UNKEY_METALD_TLS_CERT_FILE", &cert),
            ("UNKEY_METALD_TLS_KEY_FILE", &key),
            ("UNKEY_METALD_TLS_CA_FILE", &ca),
        ],
    );
    wait_tls_healthy(d, m.port, true).await;
    let url = format!(
        "https://127.0.0.1:{}/metal.vmprovisioner.v1.VmService/ListVms",
        m.port
    );
    let mut without = vec!["--cacert", "ca.pem"];
    without.extend(rpc);
    without.push(&url);
    assert!(
        !curl(d, &without).0,
        "a client without a certificate is refused"
    );
    let mut with = vec![
        "--cacert",
        "ca.pem",
        "--cert",
        "client.pem",
        "--key",
        "client.key",
    ];
    with.extend(rpc);
    with.push(&url);
    let (ok, out) = curl(d, &with);
    assert!(ok && out.starts_with('{'), "{out}");
}

#[test]
fn a_bad_certificate_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.pem"), "not a certificate").unwrap();
    let bad = dir.path().join("bad.pem").display().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_metald"))
        .env("UNKEY_METALD_ADDRESS", "127.0.0.1")
        .env("UNKEY_METALD_PORT", "0")
        .env("UNKEY_METALD_BILLING_ENABLED", "false")
        .env("UNKEY_METALD_TLS_MODE", "file")
        .env("UNKEY_METALD_TLS_CERT_FILE", &bad)
        .env("UNKEY_METALD_TLS_KEY_FILE", &bad)
        .output()
        .expect("run metald");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.pem"), "{err}");
}

/// A metald serving TLS (the support harness waits on cleartext /health, so this one is
/// started and awaited here).
struct MetaldTls {
    child: std::process::Child,
    port: u16,
    _guard: ScopeGuard,
    _data: tempfile::TempDir,
}

impl MetaldTls {
    fn start(test: &str, env: &[(&str, &str)]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let data = tempfile::tempdir().unwrap();
        let scope = scope(test);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_metald"));
        cmd.env("UNKEY_METALD_ADDRESS", "127.0.0.1")
            .env("UNKEY_METALD_PORT", port.to_string())
            .env("UNKEY_METALD_DOCKER_SCOPE", &scope)
            .env("UNKEY_METALD_DATA_DIR", data.path())
            .env("UNKEY_METALD_BILLING_ENABLED", "false")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        MetaldTls {
            child: cmd.spawn().expect("spawn metald"),
            port,
            _guard: ScopeGuard(scope),
            _data: data,
        }
    }
}

impl Drop for MetaldTls {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
