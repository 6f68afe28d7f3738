//! TLS file mode with client certificates, against an HTTPS stand-in.

use std::process::{Command, Stdio};

use super::*;

/// A stand-in HTTPS peer (Python's ssl): requires a client certificate from our CA, checks the
/// Connect request's path and headers, and answers a ListVmsResponse with total_count 7.
const TLS_PEER: &str = r#"
import http.server, json, ssl, sys
d = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        want = {"content-type": "application/proto", "connect-protocol-version": "1",
                "authorization": "Bearer dev_user_tls-user", "x-tenant-id": "tls-tenant"}
        bad = [f"{k}={self.headers.get(k)!r}" for k, v in want.items() if self.headers.get(k) != v]
        if self.path != "/metal.vmprovisioner.v1.VmService/ListVms":
            bad.append("path " + self.path)
        if not (self.headers.get("connect-timeout-ms") or "").isdigit():
            bad.append("no connect-timeout-ms")
        if bad:
            status, ctype = 400, "application/json"
            body = json.dumps({"code": "invalid_argument", "message": "; ".join(bad)}).encode()
        else:
            status, ctype, body = 200, "application/proto", b"\x18\x07"
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(d + "/server.pem", d + "/server.key")
ctx.load_verify_locations(d + "/ca.pem")
ctx.verify_mode = ssl.CERT_REQUIRED
srv = http.server.HTTPServer(("127.0.0.1", 0), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;

/// Kills the peer it holds when dropped (also when the test fails).
struct Peer(std::process::Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all EC P-256.
fn make_pki(dir: &std::path::Path) {
    let key = |name: &str| {
        openssl(
            dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                name,
            ],
        )
    };
    key("ca.key");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-subj",
            "/CN=metald-cli test CA",
            "-days",
            "2",
            "-out",
            "ca.pem",
        ],
    );
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        key(&format!("{name}.key"));
        std::fs::write(dir.join(format!("{name}.ext")), ext).expect("write ext");
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-key",
                &format!("{name}.key"),
                "-subj",
                &format!("/CN={name}"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }
}

#[test]
fn tls_file_mode_with_client_certificates() {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("skipped: openssl is not installed");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    make_pki(dir.path());
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(TLS_PEER)
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the python TLS peer");
    let stdout = child.stdout.take().expect("stdout");
    let peer = Peer(child);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).expect("port");
    let server = format!("https://127.0.0.1:{}", line.trim());
    let path = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    let (ca, cert, key) = (path("ca.pem"), path("client.pem"), path("client.key"));
    let base = [
        "--server",
        server.as_str(),
        "--user",
        "tls-user",
        "--tenant",
        "tls-tenant",
    ];
    let run = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        cli_with(&args, env, None)
    };

    // Mode, certificate, key and CA from the environment: headers and framing as over h2c.
    let env = [
        ("UNKEY_METALD_TLS_MODE", "file"),
        ("UNKEY_METALD_TLS_CA_FILE", ca.as_str()),
        ("UNKEY_METALD_TLS_CERT_FILE", cert.as_str()),
        ("UNKEY_METALD_TLS_KEY_FILE", key.as_str()),
    ];
    let v = run(&["list", "--json"], &env).ok().json();
    assert_eq!(v["totalCount"], 7, "{v}");
    // The same with flags.
    let flags = [
        "list",
        "--json",
        "--tls-mode",
        "file",
        "--tls-ca",
        &ca,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ];
    let v = run(&flags, &[]).ok().json();
    assert_eq!(v["totalCount"], 7, "{v}");

    // No client certificate: the peer refuses the handshake. Our CA not trusted: we refuse it.
    run(&["list", "--tls-mode", "file", "--tls-ca", &ca], &[]).fails(3, "unavailable");
    let refused = run(
        &[
            "list",
            "--tls-mode",
            "file",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
        &[],
    )
    .fails(3, "unavailable");
    assert!(
        refused.stderr.to_lowercase().contains("certificate"),
        "{refused:#?}"
    );
    // Half an identity, or files that are not what they claim: usage errors.
    run(&["list", "--tls-mode", "file", "--tls-cert", &cert], &[]).fails(2, "invalid_argument");
    run(
        &[
            "list",
            "--tls-mode",
            "file",
            "--tls-ca",
            &key,
            "--tls-cert",
            &cert,
            "--tls-key",
            &ca,
        ],
        &[],
    )
    .fails(2, "invalid_argument");
    drop(peer);
}
