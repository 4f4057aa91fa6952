//! Chat codes: a chat id encrypted and authenticated with a key derived
//! from the bot token (ChaCha20-Poly1305), in URL-safe base64. A chat gets
//! its code by sending `/start`; an endpoint's `chat_id` must be one, so
//! nobody can address a chat that did not talk to this bot.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use sha2::{Digest, Sha256};

/// Nonce and tag: the bytes every code has besides the id's digits.
const OVERHEAD: usize = 12 + 16;

/// The longest code [`ChatCodes::decrypt`] looks at: an `i64` has at most
/// 20 characters, so anything longer is not a code.
const MAX_CODE: usize = (OVERHEAD + 20).div_ceil(3) * 4;

/// Why a code could not be made (the cipher refused; not expected).
#[derive(Debug, thiserror::Error)]
#[error("cannot encrypt the chat id")]
pub struct EncryptError;

/// The chat codes of one bot token.
pub struct ChatCodes {
    cipher: ChaCha20Poly1305,
    key: [u8; 32],
}

impl ChatCodes {
    /// The codes of the bot with `token`.
    pub fn new(token: &str) -> ChatCodes {
        let key: [u8; 32] = Sha256::new()
            .chain_update(b"roboger telegram chat id\0")
            .chain_update(token.as_bytes())
            .finalize()
            .into();
        ChatCodes {
            cipher: ChaCha20Poly1305::new(&key.into()),
            key,
        }
    }

    /// The code a chat gets for its id. The nonce is derived from the key
    /// and the id (a synthetic IV), so a chat always gets the same code.
    pub fn encrypt(&self, chat: i64) -> Result<String, EncryptError> {
        let plain = chat.to_string();
        let iv = Sha256::new()
            .chain_update(self.key)
            .chain_update(plain.as_bytes())
            .finalize();
        let nonce = Nonce::try_from(&iv[..12]).map_err(|_| EncryptError)?;
        let mut out = nonce.to_vec();
        out.extend(
            self.cipher
                .encrypt(&nonce, plain.as_bytes())
                .map_err(|_| EncryptError)?,
        );
        Ok(URL_SAFE_NO_PAD.encode(out))
    }

    /// The chat id in a code, if this bot issued it.
    pub fn decrypt(&self, code: &str) -> Option<i64> {
        let code = code.trim();
        if code.len() > MAX_CODE {
            return None;
        }
        let raw = URL_SAFE_NO_PAD.decode(code).ok()?;
        if raw.len() < OVERHEAD {
            return None;
        }
        let nonce = Nonce::try_from(&raw[..12]).ok()?;
        let plain = self.cipher.decrypt(&nonce, &raw[12..]).ok()?;
        String::from_utf8(plain).ok()?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_bound_to_the_token() {
        let a = ChatCodes::new("1:aaa");
        let b = ChatCodes::new("2:bbb");
        let code = a.encrypt(-100123).unwrap();
        assert_eq!(code, a.encrypt(-100123).unwrap());
        assert_eq!(a.decrypt(&code), Some(-100123));
        assert_eq!(b.decrypt(&code), None);
        assert_eq!(a.decrypt("-100123"), None);
        let mut tampered = URL_SAFE_NO_PAD.decode(&code).unwrap();
        tampered[13] ^= 1;
        assert_eq!(a.decrypt(&URL_SAFE_NO_PAD.encode(tampered)), None);
        for id in [i64::MIN, i64::MAX, 0] {
            let code = a.encrypt(id).unwrap();
            assert!(code.len() <= MAX_CODE, "{code}");
            assert_eq!(a.decrypt(&code), Some(id));
        }
    }
}
