//! Chat codes: a chat id encrypted and authenticated with a key derived
//! from the bot token (ChaCha20-Poly1305), in URL-safe base64. A chat gets
//! its code by sending `/start`; an endpoint's `chat_id` must be one, so
//! nobody can address a chat that did not talk to this bot. The codes the
//! original Roboger 2.x's plugin handed out for the same bot are read too,
//! so the endpoints of a database taken over from it keep their chats.

use aes::cipher::{BlockModeDecrypt, KeyIvInit, block_padding::Pkcs7};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256, Sha512};

/// Nonce and tag: the bytes every code has besides the id's digits.
const OVERHEAD: usize = 12 + 16;

/// The longest code [`ChatCodes::decrypt`] looks at: an `i64` has at most
/// 20 characters, so anything longer is not a code.
const MAX_CODE: usize = (OVERHEAD + 20).div_ceil(3) * 4;

/// The original's codes (pyaltt2's `Rioja`): a 16-byte IV, the id's
/// digits in AES-256-CBC with PKCS#7 padding, then an HMAC-SHA256 of
/// both, in standard base64. The longest: 20 characters pad to 32 bytes.
const ORIGINAL_IV: usize = 16;
const ORIGINAL_TAG: usize = 32;
const MAX_ORIGINAL_CODE: usize = (ORIGINAL_IV + 32 + ORIGINAL_TAG).div_ceil(3) * 4;

/// Why a code could not be made (the cipher refused; not expected).
#[derive(Debug, thiserror::Error)]
#[error("cannot encrypt the chat id")]
pub struct EncryptError;

/// The chat codes of one bot token.
pub struct ChatCodes {
    cipher: ChaCha20Poly1305,
    key: [u8; 32],
    /// The original's key for both AES and the HMAC: the first 32 bytes
    /// of the token's SHA-512 (`Rioja` takes `h[:32]` and `h[:-32]` of
    /// the 64).
    original_key: [u8; 32],
}

impl ChatCodes {
    /// The codes of the bot with `token`.
    pub fn new(token: &str) -> ChatCodes {
        let key: [u8; 32] = Sha256::new()
            .chain_update(b"roboger telegram chat id\0")
            .chain_update(token.as_bytes())
            .finalize()
            .into();
        let sha512 = Sha512::digest(token.as_bytes());
        let mut original_key = [0u8; 32];
        original_key.copy_from_slice(&sha512[..32]);
        ChatCodes {
            cipher: ChaCha20Poly1305::new(&key.into()),
            key,
            original_key,
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

    /// The chat id in a code, if this bot issued it (or the original's
    /// plugin did, for the same token).
    pub fn decrypt(&self, code: &str) -> Option<i64> {
        let code = code.trim();
        self.decrypt_own(code)
            .or_else(|| self.decrypt_original(code))
    }

    /// The chat id in one of this plugin's codes.
    fn decrypt_own(&self, code: &str) -> Option<i64> {
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

    /// The chat id in one of the original's codes; the tag is checked
    /// (in constant time) before anything is decrypted.
    fn decrypt_original(&self, code: &str) -> Option<i64> {
        if code.len() > MAX_ORIGINAL_CODE {
            return None;
        }
        let raw = STANDARD.decode(code).ok()?;
        let (signed, tag) = raw.split_at_checked(raw.len().checked_sub(ORIGINAL_TAG)?)?;
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.original_key).ok()?;
        mac.update(signed);
        mac.verify_slice(tag).ok()?;
        let (iv, sealed) = signed.split_at_checked(ORIGINAL_IV)?;
        if sealed.is_empty() || sealed.len() % 16 != 0 {
            return None;
        }
        let iv: [u8; ORIGINAL_IV] = iv.try_into().ok()?;
        let mut buf = sealed.to_vec();
        let plain = cbc::Decryptor::<aes::Aes256>::new(&self.original_key.into(), &iv.into())
            .decrypt_padded::<Pkcs7>(&mut buf)
            .ok()?;
        std::str::from_utf8(plain).ok()?.parse().ok()
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

    /// Codes made by the original's plugin (pyaltt2 0.0.117's
    /// `Rioja("1:aaa").encrypt("-100123")`, twice: its IV is random).
    const ORIGINAL_CODES: [&str; 2] = [
        "6UaNU/TXgb5w8PpJcRBIfxwvoR2r7ANtOIxENApVjqM5Lu/xYY1Nb/VO52CAsbE4Yxz7V8CyIaHXgixN0z4Waw==",
        "69QqkJRsAEeau5tXfN0Kbdl7n6Dsimaf3kotptbyhJfD6CDNWFrJWPo1h9G/n25yINNoVfFzh0sDkXd64wjUHA==",
    ];

    #[test]
    fn the_originals_codes_are_read_for_the_same_token() {
        let a = ChatCodes::new("1:aaa");
        for code in ORIGINAL_CODES {
            assert_eq!(a.decrypt(code), Some(-100123), "{code}");
            assert_eq!(ChatCodes::new("2:bbb").decrypt(code), None);
            let mut tampered = STANDARD.decode(code).unwrap();
            tampered[20] ^= 1;
            assert_eq!(a.decrypt(&STANDARD.encode(tampered)), None);
        }
        // The longest id, two blocks: its code is the longest there is.
        let min = "oZ/3FG92jODtT029weTOZSlinNW2NtNttIWdXDmLSGruPUlIRwgz+OrcoPeuF54Qhi8HvMwCOVR160aLqn0cS357bxWkxr0kJW4vHDd3KRs=";
        assert_eq!(min.len(), MAX_ORIGINAL_CODE);
        assert_eq!(a.decrypt(min), Some(i64::MIN));
    }
}
