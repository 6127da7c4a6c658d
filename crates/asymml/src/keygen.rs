//! `asymml keygen`: the key pairs and self-signed certificates of the mutual TLS between the trusted runtime
//! and a remote accelerator (`--keys DIR` on both sides).
//!
//! Four files: `trusted.key`, `trusted.crt`, `accelerator.key`, `accelerator.crt` (ECDSA P-256, PEM; the keys
//! readable by their owner only). Each side pins the other's certificate, so the trusted machine needs
//! `trusted.key`, `trusted.crt` and `accelerator.crt`, and the accelerator machine `accelerator.key`,
//! `accelerator.crt` and `trusted.crt`: `trusted.key` never goes to the accelerator's machine.

use crate::cli::KeygenArgs;
use anyhow::{bail, Context, Result};
use asymml_protocol::Role;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The files `generate` writes into a folder, in order.
pub fn files() -> [&'static str; 4] {
    [
        Role::Trusted.key_file(),
        Role::Trusted.cert_file(),
        Role::Accelerator.key_file(),
        Role::Accelerator.cert_file(),
    ]
}

/// Makes a key pair and a self-signed certificate for each side in `dir` (created if missing, with mode
/// 0700 on Unix), keys with mode 0600. Refuses to replace an existing file unless `force`; then nothing is
/// written. Returns the paths written.
pub fn generate(dir: &Path, force: bool) -> Result<Vec<PathBuf>> {
    if !force {
        let existing: Vec<String> = files()
            .iter()
            .map(|f| dir.join(f))
            .filter(|p| p.exists())
            .map(|p| p.display().to_string())
            .collect();
        if !existing.is_empty() {
            bail!(
                "{} already exist(s); not replacing keys (--force replaces them, and then both sides need the \
                 new files)",
                existing.join(", ")
            );
        }
    }
    create_dir(dir)?;
    let mut written = Vec::new();
    for role in [Role::Trusted, Role::Accelerator] {
        let ck = rcgen::generate_simple_self_signed(vec![role.subject_name().to_string()])
            .with_context(|| format!("making the {role} side's key pair"))?;
        let key = dir.join(role.key_file());
        write_new(&key, ck.key_pair.serialize_pem().as_bytes(), 0o600)?;
        written.push(key);
        let cert = dir.join(role.cert_file());
        write_new(&cert, ck.cert.pem().as_bytes(), 0o644)?;
        written.push(cert);
    }
    Ok(written)
}

fn create_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// Writes `bytes` to a new file at `path` with `mode` (Unix): an existing file is removed first, so that the
/// mode is the new file's from its creation (a key is never readable by others, not even for a moment).
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("replacing {}", path.display())),
    }
    let mut o = OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = o
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// Runs `asymml keygen`.
pub fn run(a: KeygenArgs) -> Result<()> {
    let written = generate(&a.out, a.force)?;
    for p in &written {
        println!("wrote {}", p.display());
    }
    let d = a.out.display();
    println!(
        "Trusted machine: {d}/trusted.key, {d}/trusted.crt and {d}/accelerator.crt, used with \
         `--accelerator tcp://HOST:PORT --keys DIR`.\n\
         Accelerator machine: {d}/accelerator.key, {d}/accelerator.crt and {d}/trusted.crt, used with \
         `asymml accelerator --listen HOST:PORT --keys DIR`.\n\
         Never copy trusted.key to the accelerator's machine."
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_four_files_keys_private_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("keys");
        let written = generate(&out, false).unwrap();
        assert_eq!(written.len(), 4);
        for f in files() {
            let text = fs::read_to_string(out.join(f)).unwrap();
            let tag = if f.ends_with(".key") {
                "PRIVATE KEY"
            } else {
                "CERTIFICATE"
            };
            assert!(text.contains(&format!("-----BEGIN {tag}-----")), "{f}");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for f in ["trusted.key", "accelerator.key"] {
                let mode = fs::metadata(out.join(f)).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{f}");
            }
        }
        // Both sides load what was written.
        asymml_protocol::PinnedTls::load(&out, Role::Trusted).unwrap();
        asymml_protocol::PinnedTls::load(&out, Role::Accelerator).unwrap();

        let before = fs::read(out.join("trusted.key")).unwrap();
        let e = generate(&out, false).unwrap_err();
        assert!(e.to_string().contains("already exist"), "{e}");
        assert_eq!(fs::read(out.join("trusted.key")).unwrap(), before);
        generate(&out, true).unwrap();
        assert_ne!(fs::read(out.join("trusted.key")).unwrap(), before);
    }
}
