//! rustls, for processes whose TLS credentials are certificates only (no PSK file).
//!
//! OpenSSL 3 spends more CPU per record than rustls: about 4.6 µs against 1.9 µs for a 4 KiB
//! record and its reply on this project's test machine (docs/security.md, "Cost"). A replicated
//! write crosses three links, and on a small server the client, the primary and the secondary
//! share its cores, so that difference is throughput. rustls cannot do external PSK, so a process
//! with a PSK file keeps OpenSSL for every link; both stacks speak the same TLS, so a node on one
//! and a peer on the other interoperate.
//!
//! The rules are OpenSSL's in [`super::Tls`]: TLS 1.2 or 1.3, AES-128-GCM preferred; with a CA,
//! a peer's certificate must chain to it (both ways) and its identity is its CN; without one, a
//! client checks nothing (encryption only). A server's certificate is not checked against the
//! address dialled, only its CN against the node name expected (`check_server_name`). No session
//! resumption: links are long-lived. No renegotiation: rustls has none, and a TLS 1.2 peer that
//! asks gets a fatal alert.

use std::sync::Arc;

use openssl::pkey::{PKey, Private};
use openssl::x509::X509;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::{NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// A process's rustls configurations: one for links it accepts, one for links it opens.
pub(super) struct Configs {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

/// The provider: aws-lc-rs (AES-GCM with the CPU's AES and carry-less multiply instructions),
/// its suites reordered so that AES-128-GCM comes first, as in OpenSSL's list.
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    use rustls::CipherSuite as C;
    p.cipher_suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            C::TLS13_AES_128_GCM_SHA256
                | C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    Arc::new(p)
}

/// Builds the configurations from credentials OpenSSL has already parsed (and checked: the key
/// belongs to the certificate). `Err` names what rustls refused (a key type it lacks, a CA it
/// cannot use); the caller then keeps OpenSSL.
pub(super) fn configs(chain: &[X509], key: &PKey<Private>, ca: Option<&[X509]>) -> Result<Configs, String> {
    let der = |c: &X509| c.to_der().map(CertificateDer::from).map_err(|e| format!("certificate: {e}"));
    let certs = chain.iter().map(der).collect::<Result<Vec<_>, _>>()?;
    let pkcs8 = key.private_key_to_pkcs8().map_err(|e| format!("key: {e}"))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8));
    let roots = match ca {
        None => None,
        Some(cas) => {
            let mut roots = RootCertStore::empty();
            for c in cas {
                roots.add(der(c)?).map_err(|e| format!("CA certificate: {e}"))?;
            }
            Some(Arc::new(roots))
        }
    };
    let provider = provider();
    let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| e.to_string())?;
    let server = match &roots {
        Some(roots) => server.with_client_cert_verifier(
            // No CA names in the request (OpenSSL sends none either): a client with a certificate
            // from another CA then presents it, and the log says it was refused, rather than that
            // the client had none.
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .clear_root_hint_subjects()
                .build()
                .map_err(|e| format!("CA: {e}"))?,
        ),
        None => server.with_no_client_auth(),
    };
    let mut server = server.with_single_cert(certs.clone(), key.clone_key()).map_err(|e| e.to_string())?;
    server.ignore_client_order = true;
    server.send_tls13_tickets = 0;
    server.session_storage = Arc::new(NoServerSessionStorage {});

    let verifier = PeerVerifier { roots, algorithms: provider.signature_verification_algorithms };
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(certs, key)
        .map_err(|e| e.to_string())?;
    client.enable_sni = false;
    client.resumption = Resumption::disabled();
    Ok(Configs { server: Arc::new(server), client: Arc::new(client) })
}

/// The name a client sends: unused (no SNI, and the name is checked on the CN afterwards).
pub(super) fn server_name() -> ServerName<'static> {
    ServerName::try_from("syncblock").expect("a valid DNS name")
}

/// How a client checks a server's certificate: signed by the CA (if one is configured), without
/// regard to the name dialled. The handshake's signatures are always checked: the server holds
/// the key of the certificate it presented.
#[derive(Debug)]
struct PeerVerifier {
    roots: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The CN of the first certificate a peer presented (verified when a CA is configured).
pub(super) fn peer_cn(certs: &[CertificateDer<'_>]) -> Option<String> {
    let first = certs.first()?;
    X509::from_der(first).ok().and_then(|c| super::common_name(&c))
}

/// A failed rustls handshake in words that name the likely cause, as `super::explain` does for
/// OpenSSL.
pub(super) fn explain(e: &std::io::Error) -> String {
    use rustls::{AlertDescription as A, Error as E};
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<E>()) else {
        return if e.kind() == std::io::ErrorKind::UnexpectedEof {
            format!("{e}{}", super::PEER_CLOSED)
        } else {
            e.to_string()
        };
    };
    let cause = match tls {
        E::NoCertificatesPresented => super::NO_CLIENT_CERTIFICATE,
        E::InvalidCertificate(_) => return format!("the peer's certificate was refused: {tls}"),
        E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. } => {
            "; likely cause: the peer does not speak TLS here (plaintext, HTTP, or another protocol)"
        }
        E::PeerIncompatible(_) => "; likely cause: no TLS version or cipher suite in common with the peer",
        E::AlertReceived(A::BadCertificate | A::UnknownCA | A::CertificateUnknown | A::DecryptError) => {
            "; the peer refused this side's certificate"
        }
        _ => "",
    };
    format!("{tls}{cause}")
}
