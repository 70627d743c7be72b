//! Test credentials made the way docs/security.md tells operators to make them: a CA and
//! certificates with `openssl`, PSK keys with `psktool` (gnutls-bin). A missing tool fails the
//! test (`.ci/run` installs both).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::tools::path;

pub struct Pki {
    pub dir: PathBuf,
}

fn sh(dir: &Path, script: &str) {
    let out =
        Command::new("sh").arg("-ec").arg(script).current_dir(dir).env("PATH", path()).output().expect("spawn sh");
    assert!(
        out.status.success(),
        "making test credentials failed (openssl and psktool are needed; .ci/run installs openssl and \
         gnutls-bin):\n{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    /// A CA; a certificate for each of `names` (CN = the name, valid for localhost and 127.0.0.1, so
    /// it serves as a node's, a server's or a client's); a certificate for "mallory" from another CA;
    /// and a PSK file with a key for each of `names`.
    pub fn new(dir: &Path, names: &[&str]) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        // The commands of docs/security.md, "Certificates with openssl".
        let mut script = String::from(
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
             -subj '/CN=syncblock CA' -keyout ca-key.pem -out ca-cert.pem 2>/dev/null\n\
             openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
             -subj '/CN=rogue CA' -keyout rogue-ca-key.pem -out rogue-ca-cert.pem 2>/dev/null\n",
        );
        let cert = |name: &str, ca: &str| {
            format!(
                "openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj '/CN={name}' \
                 -keyout {name}-key.pem -out {name}.csr 2>/dev/null\n\
                 printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nextendedKeyUsage=serverAuth,clientAuth\\n' > {name}.ext\n\
                 openssl x509 -req -in {name}.csr -CA {ca}-cert.pem -CAkey {ca}-key.pem -CAcreateserial -days 3650 \
                 -extfile {name}.ext -out {name}-cert.pem 2>/dev/null\n"
            )
        };
        for name in names {
            script += &cert(name, "ca");
            script += &format!("psktool -u {name} -p keys.psk >/dev/null\n");
        }
        script += &cert("mallory", "rogue-ca");
        sh(dir, &script);
        Pki { dir: dir.to_path_buf() }
    }

    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-cert.pem"))
    }
    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-key.pem"))
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca-cert.pem")
    }
    pub fn psk(&self) -> PathBuf {
        self.dir.join("keys.psk")
    }

    /// A directory as libnbd (`tls-certificates=`) and qemu (`tls-creds-x509,dir=`) read a client's
    /// credentials: ca-cert.pem, client-cert.pem, client-key.pem.
    pub fn client_dir(&self, name: &str) -> PathBuf {
        let d = self.dir.join(format!("client-{name}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(self.ca(), d.join("ca-cert.pem")).unwrap();
        std::fs::copy(self.cert(name), d.join("client-cert.pem")).unwrap();
        std::fs::copy(self.key(name), d.join("client-key.pem")).unwrap();
        d
    }

    /// A directory as qemu's `tls-creds-psk,dir=` reads it: keys.psk.
    pub fn psk_dir(&self, file: &Path) -> PathBuf {
        let d = self.dir.join(format!("psk-{}", file.file_name().unwrap().to_string_lossy()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(file, d.join("keys.psk")).unwrap();
        d
    }

    /// A PSK file with the same identities as [`Pki::psk`] and other keys.
    pub fn wrong_psk(&self) -> PathBuf {
        let text = std::fs::read_to_string(self.psk()).unwrap();
        let wrong: String =
            text.lines().map(|l| format!("{}:{}\n", l.split(':').next().unwrap(), "5a".repeat(32))).collect();
        let p = self.dir.join("wrong.psk");
        std::fs::write(&p, wrong).unwrap();
        p
    }
}
