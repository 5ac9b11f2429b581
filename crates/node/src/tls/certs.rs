//! `blockmirror certs init`: a private CA and a certificate per node, for
//! the demo, tests and small deployments (an existing PKI works as well:
//! `[tls]` only needs PEM files).
//!
//! Layout written under DIR:
//!
//! - `ca.pem` (and `ca.key`, the CA's key: keep it off the nodes),
//! - `NAME.pem`, `NAME.key` per node (subject names: NAME, 127.0.0.1,
//!   localhost; usable as server and as client),
//! - `qemu-client/{ca-cert.pem,client-cert.pem,client-key.pem}`: the
//!   credentials directory qemu's `tls-creds-x509,endpoint=client` and
//!   libnbd's `tls-certificates=` read,
//! - `qemu-server/{ca-cert.pem,server-cert.pem,server-key.pem}`: the same
//!   for `qemu-nbd --tls-creds` (the reference server to compare with).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// Validity of the certificates made here, in years from now.
const VALID_YEARS: i32 = 10;

/// Why `certs init` failed.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("certs: {name:?} is not a node name (letters, digits, '-', '_', '.')")]
    BadName { name: String },
    #[error("certs: no node names given")]
    NoNodes,
    #[error("certs: {} exists already (refusing to overwrite a CA; remove it or pick another DIR)", .0.display())]
    Exists(PathBuf),
    #[error("certs: generating {what}: {source}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("certs: writing {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What `init` wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub ca: PathBuf,
    /// Per node: (name, certificate, key).
    pub nodes: Vec<(String, PathBuf, PathBuf)>,
    pub qemu_client: PathBuf,
    pub qemu_server: PathBuf,
}

/// Options for [`init`] beyond the node names.
#[derive(Debug, Clone, Default)]
pub struct InitOptions {
    /// Make the qemu-client certificate already expired (for tests of refusals).
    pub expired_client: bool,
}

fn year_now() -> i32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
}

fn generate(what: &str) -> impl FnOnce(rcgen::Error) -> CertsError + '_ {
    move |source| CertsError::Generate {
        what: what.to_string(),
        source,
    }
}

/// A CA: its certificate and key.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    /// A new self-signed CA named `cn`.
    pub fn new(cn: &str) -> Result<Ca, CertsError> {
        let key = KeyPair::generate().map_err(generate("CA key"))?;
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(generate("CA"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        dn.push(DnType::OrganizationName, "blockmirror");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let y = year_now();
        p.not_before = rcgen::date_time_ymd(y - 1, 1, 1);
        p.not_after = rcgen::date_time_ymd(y + VALID_YEARS, 1, 1);
        let cert = p.self_signed(&key).map_err(generate("CA"))?;
        Ok(Ca { cert, key })
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A leaf certificate for `name` (server and client use), subject names
    /// `name`, 127.0.0.1, localhost; returns (certificate PEM, key PEM).
    pub fn issue(&self, name: &str, expired: bool) -> Result<(String, String), CertsError> {
        let key = KeyPair::generate().map_err(generate(name))?;
        let mut sans = vec![name.to_string()];
        for s in ["127.0.0.1", "localhost"] {
            if s != name {
                sans.push(s.to_string());
            }
        }
        let mut p = CertificateParams::new(sans).map_err(generate(name))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "blockmirror");
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        // GnuTLS (qemu, libnbd) wants both on a leaf when the extension is
        // critical, which rcgen makes it.
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let y = year_now();
        if expired {
            p.not_before = rcgen::date_time_ymd(y - 3, 1, 1);
            p.not_after = rcgen::date_time_ymd(y - 2, 1, 1);
        } else {
            p.not_before = rcgen::date_time_ymd(y - 1, 1, 1);
            p.not_after = rcgen::date_time_ymd(y + VALID_YEARS, 1, 1);
        }
        let cert = p
            .signed_by(&key, &self.cert, &self.key)
            .map_err(generate(name))?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

fn check_name(name: &str) -> Result<(), CertsError> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(CertsError::BadName {
            name: name.to_string(),
        })
    }
}

fn write(path: &Path, text: &str, private: bool) -> Result<(), CertsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| CertsError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(err)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

/// Writes a new CA and a certificate per node under `dir` (layout above).
/// Refuses to overwrite an existing `ca.pem`.
pub fn init(dir: &Path, nodes: &[String], opts: &InitOptions) -> Result<Written, CertsError> {
    if nodes.is_empty() {
        return Err(CertsError::NoNodes);
    }
    for n in nodes {
        check_name(n)?;
    }
    let ca_path = dir.join("ca.pem");
    if ca_path.exists() {
        return Err(CertsError::Exists(ca_path));
    }
    let ca = Ca::new("blockmirror CA")?;
    write(&dir.join("ca.key"), &ca.key_pem(), true)?;
    write(&ca_path, &ca.cert_pem(), false)?;
    let mut written = Written {
        ca: ca_path,
        nodes: Vec::new(),
        qemu_client: dir.join("qemu-client"),
        qemu_server: dir.join("qemu-server"),
    };
    for n in nodes {
        let (cert, key) = ca.issue(n, false)?;
        let cp = dir.join(format!("{n}.pem"));
        let kp = dir.join(format!("{n}.key"));
        write(&kp, &key, true)?;
        write(&cp, &cert, false)?;
        written.nodes.push((n.clone(), cp, kp));
    }
    // Hosts: one client identity, signed by the same CA.
    let (cert, key) = ca.issue("qemu-client", opts.expired_client)?;
    let qc = &written.qemu_client;
    write(&qc.join("ca-cert.pem"), &ca.cert_pem(), false)?;
    write(&qc.join("client-cert.pem"), &cert, false)?;
    write(&qc.join("client-key.pem"), &key, true)?;
    // qemu-nbd's server layout, with the first node's identity.
    let (cert, key) = ca.issue(&nodes[0], false)?;
    let qs = &written.qemu_server;
    write(&qs.join("ca-cert.pem"), &ca.cert_pem(), false)?;
    write(&qs.join("server-cert.pem"), &cert, false)?;
    write(&qs.join("server-key.pem"), &key, true)?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_the_layout_and_refuses_to_overwrite() {
        let d = tempfile::tempdir().unwrap();
        let nodes = vec!["site-a".to_string(), "site-b".to_string()];
        let w = init(d.path(), &nodes, &InitOptions::default()).unwrap();
        for p in [
            "ca.pem",
            "ca.key",
            "site-a.pem",
            "site-a.key",
            "site-b.pem",
            "site-b.key",
            "qemu-client/ca-cert.pem",
            "qemu-client/client-cert.pem",
            "qemu-client/client-key.pem",
            "qemu-server/server-cert.pem",
        ] {
            assert!(d.path().join(p).is_file(), "{p}");
        }
        assert_eq!(w.nodes.len(), 2);
        assert!(matches!(
            init(d.path(), &nodes, &InitOptions::default()),
            Err(CertsError::Exists(_))
        ));
        assert!(matches!(
            init(
                &d.path().join("x"),
                &["a b".to_string()],
                &InitOptions::default()
            ),
            Err(CertsError::BadName { .. })
        ));
    }
}
