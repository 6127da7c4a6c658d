//! `asymml keygen` and mutual TLS between `asymml verify` and `asymml accelerator` over loopback TCP: a step
//! that passes with the right keys; clear failures (exit code 2) with the wrong keys on either side, without
//! keys, and with missing key files; plaintext only with the loudly named flag, which warns.
//!
//! Every accelerator process is killed when its guard drops.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

mod common;
use common::{asymml, stderr};

/// Asserts that `asymml verify` ran its step against the accelerator to the end: its JSON report on stdout
/// and exit code 0 (or 1: the step ran, and its numbers are tests/split.rs's concern), no error.
fn ran(o: &Output, log: &str) -> serde_json::Value {
    let out = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}): {out}\nstderr: {}\naccelerator:\n{log}",
            stderr(o)
        )
    });
    assert!(
        matches!(o.status.code(), Some(0 | 1)),
        "{v}\nstderr: {}\naccelerator:\n{log}",
        stderr(o)
    );
    assert!(v["max_rel_err"].as_f64().is_some(), "{v}");
    assert!(!stderr(o).contains("error"), "{}", stderr(o));
    v
}

/// Asserts a clean failure: exit code 2, `needle` on stderr, no panic.
fn fails_with(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "expected exit 2, stderr: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert!(err.contains(needle), "stderr lacks '{needle}': {err}");
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `asymml keygen --out DIR`, which must succeed.
fn keygen(dir: &Path) {
    let o = asymml(&["keygen", "--out", p(dir)]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A folder holding `files`, each copied from `from`.
fn mix(dir: &Path, files: &[(&Path, &str)]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for (from, name) in files {
        std::fs::copy(from.join(name), dir.join(name)).unwrap();
    }
    dir.to_path_buf()
}

/// A running `asymml accelerator` on a free loopback port, and its stderr so far.
struct Server {
    child: Child,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_asymml"))
            .args([
                "accelerator",
                "--listen",
                "127.0.0.1:0",
                "--accelerator-threads",
                "1",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start asymml accelerator");
        let err = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                // Logged before the address is reported, so that the log holds the line by then.
                let addr = line
                    .split("listening on ")
                    .nth(1)
                    .map(|rest| rest.split_whitespace().next().unwrap_or("").to_string());
                lines.lock().unwrap().push(line);
                if let Some(addr) = addr {
                    let _ = tx.send(addr);
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!(
                    "the accelerator did not report its address: {}",
                    log.lock().unwrap().join("\n")
                )
            });
        assert!(addr.starts_with("tcp://127.0.0.1:"), "{addr}");
        Server { child, addr, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits for the process to exit by itself (`--once`) and returns whether it succeeded.
    fn wait_success(&mut self) -> bool {
        for _ in 0..600 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("the accelerator did not exit: {}", self.log());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `asymml verify` (one vgg16 step on 2 images of 32 px) against `addr` with more flags.
fn verify(addr: &str, more: &[&str]) -> Output {
    // (How close split and trusted-only come is tests/split.rs's business, over TLS too.)
    let mut args = vec![
        "verify",
        "--model",
        "vgg16",
        "--batch",
        "2",
        "--accelerator",
        addr,
        "--accelerator-timeout",
        "60",
        "--json",
    ];
    args.extend_from_slice(more);
    asymml(&args)
}

#[test]
fn keygen_writes_private_keys_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let o = asymml(&["keygen", "--out", p(&keys)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Never copy trusted.key"), "{out}");
    for f in [
        "trusted.key",
        "trusted.crt",
        "accelerator.key",
        "accelerator.crt",
    ] {
        assert!(keys.join(f).is_file(), "{f}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["trusted.key", "accelerator.key"] {
            let mode = std::fs::metadata(keys.join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
    }
    let before = std::fs::read(keys.join("accelerator.key")).unwrap();
    fails_with(&asymml(&["keygen", "--out", p(&keys)]), "already exist");
    assert_eq!(std::fs::read(keys.join("accelerator.key")).unwrap(), before);
    let o = asymml(&["keygen", "--out", p(&keys), "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(std::fs::read(keys.join("accelerator.key")).unwrap(), before);
}

#[test]
fn verify_over_mutual_tls_with_pinned_keys() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    keygen(&keys);
    // Each machine holds its own pair and the peer's certificate only.
    let accel_dir = mix(
        &dir.path().join("accelerator"),
        &[
            (&keys, "accelerator.key"),
            (&keys, "accelerator.crt"),
            (&keys, "trusted.crt"),
        ],
    );
    let trusted_dir = mix(
        &dir.path().join("trusted"),
        &[
            (&keys, "trusted.key"),
            (&keys, "trusted.crt"),
            (&keys, "accelerator.crt"),
        ],
    );
    let mut server = Server::start(&["--keys", p(&accel_dir), "--once"]);
    assert!(server.log().contains("mutual TLS 1.3"), "{}", server.log());
    let o = verify(&server.addr, &["--keys", p(&trusted_dir)]);
    ran(&o, &server.log());
    assert!(!stderr(&o).contains("WARNING"), "{}", stderr(&o));
    // --once: the accelerator exits after its one connection.
    assert!(server.wait_success(), "{}", server.log());
}

#[test]
fn wrong_keys_on_either_side_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    keygen(&a);
    keygen(&b);
    let server = Server::start(&["--keys", p(&a)]);

    // A trusted side with another key pair (it even pins the right accelerator certificate): the accelerator
    // refuses it in the TLS handshake, and the trusted side says so.
    let intruder = mix(
        &dir.path().join("intruder"),
        &[
            (&b, "trusted.key"),
            (&b, "trusted.crt"),
            (&a, "accelerator.crt"),
        ],
    );
    let o = verify(&server.addr, &["--keys", p(&intruder)]);
    fails_with(&o, "refused this side's certificate");

    // A trusted side whose pinned accelerator certificate is another: it refuses the accelerator.
    let o = verify(&server.addr, &["--keys", p(&b)]);
    fails_with(&o, "other than the pinned one");

    // Neither reached the service: the accelerator logged two refusals and is still up for the right keys.
    let log = server.log();
    assert!(
        log.matches("refused").count() >= 2,
        "the accelerator log lacks the refusals: {log}"
    );
    let o = verify(&server.addr, &["--keys", p(&a)]);
    ran(&o, &log);
}

#[test]
fn tcp_without_keys_is_an_error_that_says_how_to_make_them() {
    fails_with(&verify("tcp://127.0.0.1:9", &[]), "asymml keygen");
    fails_with(
        &asymml(&["accelerator", "--listen", "127.0.0.1:0", "--once"]),
        "asymml keygen",
    );
    // A key folder without the files names the missing one.
    let empty = tempfile::tempdir().unwrap();
    let o = verify("tcp://127.0.0.1:9", &["--keys", p(empty.path())]);
    fails_with(&o, "trusted.key");
    fails_with(&o, "asymml keygen");
    let o = asymml(&[
        "accelerator",
        "--listen",
        "127.0.0.1:0",
        "--keys",
        p(empty.path()),
    ]);
    fails_with(&o, "accelerator.key");
    // Keys and plaintext exclude each other.
    let o = verify(
        "tcp://127.0.0.1:9",
        &["--keys", p(empty.path()), "--insecure-plaintext-tcp"],
    );
    fails_with(&o, "--insecure-plaintext-tcp");
}

#[test]
fn plaintext_only_with_the_flag_and_a_warning() {
    let mut server = Server::start(&["--insecure-plaintext-tcp", "--once"]);
    let log = server.log();
    assert!(log.contains("WARNING: --insecure-plaintext-tcp"), "{log}");
    assert!(log.contains("PLAINTEXT"), "{log}");
    let o = verify(&server.addr, &["--insecure-plaintext-tcp"]);
    ran(&o, &server.log());
    assert!(
        stderr(&o).contains("WARNING: --insecure-plaintext-tcp"),
        "{}",
        stderr(&o)
    );
    assert!(server.wait_success(), "{}", server.log());
}
