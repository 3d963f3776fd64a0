//! The TLS crypto provider. reqwest (used by the OpenAI client and object_store) is built
//! without a bundled provider; we install ring, as async-nats uses, rather than build aws-lc.

/// Installs ring as the process default; a no-op if a provider is already installed.
pub fn install() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
