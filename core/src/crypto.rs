//! age encryption, both directions (the agents' encryption stage, the coordinator's
//! self-backups): age v1 (<https://age-encryption.org/v1>), X25519
//! recipients, 64 KiB ChaCha20-Poly1305 chunks. Production agents hold only the
//! recipients ([`Encryption`]); staging agents hold the identity ([`Decryption`]). Stock
//! `age -d -i KEY` decrypts what this writes.

use std::io::{self, Read, Write};
use std::path::Path;
use std::str::FromStr;

use age::secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use crate::manifest::RecipientInfo;

/// Bad key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// No recipients configured.
    #[error("no recipients: give at least one age recipient (age1...) of the staging identity")]
    NoRecipients,
    /// A recipient string that is not an age X25519 recipient.
    #[error("recipient {index} ({value:?}) is not an age X25519 recipient (age1...): {message}")]
    Recipient {
        /// Position in the list, from 0.
        index: usize,
        /// The value (a public key; safe to print).
        value: String,
        /// age's message.
        message: String,
    },
    /// The identity file is unreadable or too open.
    #[error(transparent)]
    IdentityFile(#[from] crate::secrets::SecretError),
    /// The identity file holds no X25519 identity.
    #[error("{0}")]
    Identity(String),
}

/// The recipients a production agent encrypts to.
pub struct Encryption {
    recipients: Vec<age::x25519::Recipient>,
}

impl Encryption {
    /// Parses `age1...` recipients.
    ///
    /// # Errors
    /// [`KeyError`] naming the bad entry.
    pub fn from_recipients(values: &[String]) -> Result<Self, KeyError> {
        if values.is_empty() {
            return Err(KeyError::NoRecipients);
        }
        let recipients = values
            .iter()
            .enumerate()
            .map(|(index, v)| {
                age::x25519::Recipient::from_str(v.trim()).map_err(|message| KeyError::Recipient {
                    index,
                    value: v.clone(),
                    message: message.to_string(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { recipients })
    }

    /// The recipients and their fingerprints, for the manifest.
    pub fn describe(&self) -> Vec<RecipientInfo> {
        self.recipients
            .iter()
            .map(|r| {
                let recipient = r.to_string();
                RecipientInfo {
                    fingerprint: fingerprint(&recipient),
                    recipient,
                }
            })
            .collect()
    }

    /// Wraps `inner`: what is written is encrypted to every recipient. Call
    /// `finish()` on the result, or the file is truncated and will not decrypt.
    ///
    /// # Errors
    /// From `inner` while writing the header.
    pub fn wrap<W: Write>(&self, inner: W) -> io::Result<age::stream::StreamWriter<W>> {
        let encryptor = age::Encryptor::with_recipients(
            self.recipients.iter().map(|r| r as &dyn age::Recipient),
        )
        .map_err(io::Error::other)?;
        encryptor.wrap_output(inner)
    }
}

/// A recipient's fingerprint: `sha256:` + the first 16 hex digits of the SHA-256 of the
/// recipient string (`age1...`), as manifests give it.
pub fn fingerprint(recipient: &str) -> String {
    let digest = Sha256::digest(recipient.as_bytes());
    format!("sha256:{}", &hex::encode(digest)[..16])
}

/// The identity a staging agent decrypts with.
pub struct Decryption {
    identities: Vec<age::x25519::Identity>,
}

impl Decryption {
    /// Reads an age identity file: lines of `AGE-SECRET-KEY-1...`, `#` comments ignored.
    /// The file must have mode 0600 or 0400.
    ///
    /// # Errors
    /// [`KeyError::IdentityFile`] (unreadable, too open) or [`KeyError::Identity`] naming
    /// the file; the key itself is never printed.
    pub fn from_identity_file(path: &Path) -> Result<Self, KeyError> {
        let text = crate::secrets::read_secret_file(path)?;
        let identities: Vec<_> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(age::x25519::Identity::from_str)
            .collect::<Result<_, _>>()
            .map_err(|_| {
                KeyError::Identity(format!(
                    "{} holds a line that is not an age X25519 identity (AGE-SECRET-KEY-1...)",
                    path.display()
                ))
            })?;
        if identities.is_empty() {
            return Err(KeyError::Identity(format!(
                "{} holds no age identity",
                path.display()
            )));
        }
        Ok(Self { identities })
    }

    /// The fingerprints ([`fingerprint`]) of the recipients of the identities held, in
    /// the file's order: which backups they can open. Never the identities.
    pub fn fingerprints(&self) -> Vec<String> {
        self.identities
            .iter()
            .map(|i| fingerprint(&i.to_public().to_string()))
            .collect()
    }

    /// Wraps `inner`: reads decrypt and authenticate each 64 KiB chunk; a tampered or
    /// truncated file fails with an error, never with wrong plaintext.
    ///
    /// # Errors
    /// The header is malformed or no identity matches a recipient stanza.
    pub fn wrap<R: Read>(&self, inner: R) -> io::Result<impl Read> {
        let decryptor = age::Decryptor::new(inner).map_err(io::Error::other)?;
        decryptor
            .decrypt(self.identities.iter().map(|i| i as &dyn age::Identity))
            .map_err(io::Error::other)
    }
}

/// A fresh X25519 identity: (identity `AGE-SECRET-KEY-1...`, recipient `age1...`).
pub fn generate_identity() -> (String, String) {
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    (identity.to_string().expose_secret().to_owned(), recipient)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_identity_decrypts() {
        let (secret, public) = generate_identity();
        let (other_secret, _) = generate_identity();
        let enc = Encryption::from_recipients(&[public]).unwrap();
        let mut w = enc.wrap(Vec::new()).unwrap();
        w.write_all(b"rows and rows").unwrap();
        let sealed = w.finish().unwrap();

        let dir = tempfile::tempdir().unwrap();
        let write_key = |name: &str, key: &str| {
            use std::os::unix::fs::PermissionsExt;
            let p = dir.path().join(name);
            std::fs::write(&p, key).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            p
        };
        let good = Decryption::from_identity_file(&write_key("good", &secret)).unwrap();
        let mut out = Vec::new();
        good.wrap(&sealed[..])
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"rows and rows");

        let bad = Decryption::from_identity_file(&write_key("bad", &other_secret)).unwrap();
        assert!(bad.wrap(&sealed[..]).is_err());

        let mut altered = sealed.clone();
        let n = altered.len();
        altered[n - 5] ^= 1;
        let mut out = Vec::new();
        assert!(
            good.wrap(&altered[..])
                .and_then(|mut r| r.read_to_end(&mut out))
                .is_err()
        );
    }

    #[test]
    fn identity_file_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let (secret, _) = generate_identity();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        std::fs::write(&p, secret).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Decryption::from_identity_file(&p)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("0644"), "{err}");
    }

    #[test]
    fn bad_recipient_is_named() {
        let err = Encryption::from_recipients(&["age1qqq".into()])
            .err()
            .unwrap();
        assert!(err.to_string().contains("recipient 0"), "{err}");
    }
}
