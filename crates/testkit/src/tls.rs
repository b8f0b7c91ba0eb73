//! TLS test servers: a throwaway certificate authority, a server certificate for
//! `127.0.0.1`/`localhost` and a client certificate, generated with the `openssl` command into a
//! temporary directory, and a TLS-only `redis-server` (`--port 0 --tls-port P`) that uses them.
//!
//! The plaintext harness ([`RedisServer`](crate::RedisServer)) checks readiness with a plaintext
//! `PING`, which a TLS-only server never answers; [`TlsRedisServer`] asks `redis-cli --tls`
//! instead, so this crate needs no TLS stack of its own.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// Certificates valid for this many days: tests need minutes, a day spares clock-skew surprises.
const DAYS: &str = "2";

/// A certificate authority and two certificates it signed, as PEM files in a temporary
/// directory (removed on drop): one for a server at `localhost`, `127.0.0.1` and `::1`, one for
/// a client (mutual TLS). Keys are ECDSA P-256, unencrypted.
pub struct Certificates {
    dir: tempfile::TempDir,
}

impl Certificates {
    /// Generates a fresh CA and the server and client certificates it signs. Every call makes a
    /// new, unrelated CA, so certificates of one set are untrusted by another.
    pub fn generate() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("rediskit-tls-")
            .tempdir()
            .expect("create a temporary directory for certificates");
        let certs = Self { dir };
        certs.write(
            "ca.cnf",
            "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = rediskit test CA\n\
             [ext]\nbasicConstraints = critical, CA:TRUE\n\
             keyUsage = critical, keyCertSign, cRLSign\nsubjectKeyIdentifier = hash\n",
        );
        certs.openssl(&[
            "req",
            "-x509",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            DAYS,
            "-config",
            "ca.cnf",
            "-extensions",
            "ext",
        ]);
        certs.issue(
            "server",
            "localhost",
            "extendedKeyUsage = serverAuth\n\
             subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1\n",
        );
        certs.issue(
            "client",
            "rediskit test client",
            "extendedKeyUsage = clientAuth\n",
        );
        certs
    }

    /// Makes `{name}.key` and `{name}.pem`, signed by the CA, with the extensions `extensions`.
    fn issue(&self, name: &str, common_name: &str, extensions: &str) {
        let config = format!("{name}.cnf");
        self.write(
            &config,
            &format!(
                "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = {common_name}\n\
                 [ext]\nbasicConstraints = critical, CA:FALSE\n\
                 keyUsage = critical, digitalSignature\n\
                 authorityKeyIdentifier = keyid, issuer\n{extensions}"
            ),
        );
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        self.openssl(&[
            "req",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-config",
            &config,
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            DAYS,
            "-extfile",
            &config,
            "-extensions",
            "ext",
        ]);
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.dir.path().join(name), text)
            .unwrap_or_else(|err| panic!("write {name}: {err}"));
    }

    fn openssl(&self, args: &[&str]) {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output();
        let output = match output {
            Ok(output) => output,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => panic!(
                "openssl is not installed (or not on PATH), and rediskit's TLS tests use it to \
                 make their certificates. Install it: `apt-get install openssl` on \
                 Debian/Ubuntu; macOS ships one."
            ),
            Err(err) => panic!("cannot run openssl: {err}"),
        };
        assert!(
            output.status.success(),
            "openssl {} failed with {}: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The CA certificate (PEM): what clients trust (`REDIS_TLS_CA_FILE`) and what the server
    /// checks client certificates against.
    pub fn ca_file(&self) -> PathBuf {
        self.file("ca.pem")
    }

    /// The server certificate (PEM), for `localhost`, `127.0.0.1` and `::1`.
    pub fn server_cert_file(&self) -> PathBuf {
        self.file("server.pem")
    }

    /// The server certificate's private key (PEM).
    pub fn server_key_file(&self) -> PathBuf {
        self.file("server.key")
    }

    /// The client certificate (PEM), for mutual TLS (`REDIS_TLS_CERT_FILE`).
    pub fn client_cert_file(&self) -> PathBuf {
        self.file("client.pem")
    }

    /// The client certificate's private key (PEM, `REDIS_TLS_KEY_FILE`).
    pub fn client_key_file(&self) -> PathBuf {
        self.file("client.key")
    }
}

/// A TLS-only `redis-server` (no plaintext port) with certificates of its own
/// ([`Certificates`]). Killed (and its directories removed) on drop.
///
/// By default clients need not present a certificate (`--tls-auth-clients no`); start it with
/// `["--tls-auth-clients", "yes"]` to require one signed by [`TlsRedisServer::ca_file`].
pub struct TlsRedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    certs: Certificates,
    args: Vec<String>,
}

impl TlsRedisServer {
    /// Starts a TLS-only server with persistence off on a free port.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a TLS-only server with extra `redis-server` arguments; later arguments override
    /// earlier ones, so these can replace the defaults (e.g. `["--tls-auth-clients", "yes"]`).
    pub fn start_with(args: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("rediskit-test-tls-")
            .tempdir()
            .expect("create a temporary directory for redis-server");
        let mut server = Self {
            child: None,
            port: 0,
            dir,
            certs: Certificates::generate(),
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        // Another test may grab the port between our probe and redis-server's bind: retry.
        for _ in 0..5 {
            server.port = crate::free_port();
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server (TLS) did not start on any of 5 free ports; see its log above");
    }

    /// Launches the process on `self.port` and waits until it answers; false if the port was
    /// taken.
    fn spawn(&mut self) -> bool {
        let mut args: Vec<std::ffi::OsString> = vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            self.port.to_string().into(),
        ];
        args.extend(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"].map(Into::into));
        args.extend([
            "--tls-cert-file".into(),
            self.certs.server_cert_file().into(),
            "--tls-key-file".into(),
            self.certs.server_key_file().into(),
            "--tls-ca-cert-file".into(),
            self.certs.ca_file().into(),
            "--tls-auth-clients".into(),
            "no".into(),
        ]);
        args.extend(self.args.iter().map(Into::into));
        // Any reply means the server is up; with `requirepass` it answers NOAUTH.
        let ready = || !self.cli_output(&["PING"]).stdout.is_empty();
        match crate::launch(self.dir.path(), &args, &[], ready) {
            Some(child) => {
                self.child = Some(child);
                true
            }
            None => false,
        }
    }

    fn cli_output(&self, args: &[&str]) -> Output {
        let output = Command::new("redis-cli")
            .args(["--tls", "-h", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("--cacert")
            .arg(self.certs.ca_file())
            .arg("--cert")
            .arg(self.certs.client_cert_file())
            .arg("--key")
            .arg(self.certs.client_key_file())
            .args(args)
            .stdin(Stdio::null())
            .output();
        match output {
            Ok(output) => output,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-cli is not installed (or not on PATH); the TLS test harness uses it. It \
                 comes with redis-server (`apt-get install redis-tools` on Debian/Ubuntu)."
            ),
            Err(err) => panic!("cannot run redis-cli: {err}"),
        }
    }

    /// Runs one command with `redis-cli --tls` (trusting the CA, presenting the client
    /// certificate, as the default user) and returns its output, trimmed. Panics if redis-cli
    /// cannot connect. For arranging test state, e.g. `["ACL", "SETUSER", ...]`; an error reply
    /// comes back as text starting with `ERR`, `NOPERM`, ...
    pub fn cli(&self, args: &[&str]) -> String {
        let output = self.cli_output(args);
        let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        assert!(
            !stdout.is_empty(),
            "redis-cli {} got no reply from the TLS server on port {}: {}",
            args.join(" "),
            self.port,
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    /// The TLS port (the only one: plaintext is off).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `rediss://127.0.0.1:{port}/0`.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/0", self.port)
    }

    /// The certificates the server uses and the client certificate it accepts.
    pub fn certificates(&self) -> &Certificates {
        &self.certs
    }

    /// The CA certificate clients must trust (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.certs.ca_file()
    }

    /// A client certificate (PEM) signed by [`TlsRedisServer::ca_file`].
    pub fn client_cert_file(&self) -> PathBuf {
        self.certs.client_cert_file()
    }

    /// The private key (PEM) of [`TlsRedisServer::client_cert_file`].
    pub fn client_key_file(&self) -> PathBuf {
        self.certs.client_key_file()
    }

    /// The server's working directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server with SIGKILL and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for TlsRedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
