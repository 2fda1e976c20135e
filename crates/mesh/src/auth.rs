//! The `NHSMESH` Authorization header. Pure: the nonce, the count and the time are passed in.
//!
//! ```text
//! NHSMESH <MAILBOX>:<nonce>:<count>:<yyyyMMddHHmm>:<hex HMAC-SHA256(shared_key, "<MAILBOX>:<nonce>:<count>:<password>:<yyyyMMddHHmm>")>
//! ```
//! The password only ever appears inside the HMAC input. Real MESH refuses a reused token and a timestamp more
//! than two hours off, so the shell makes a new nonce for every request and reads the clock per request.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The inputs of one token; everything is explicit so the header is reproducible in tests.
#[derive(Debug, Clone, Copy)]
pub struct TokenInput<'a> {
    /// Mailbox id (upper-cased by the header builder).
    pub mailbox: &'a str,
    /// Mailbox password.
    pub password: &'a str,
    /// Environment shared secret (the HMAC key).
    pub shared_key: &'a [u8],
    /// Single-use nonce, a UUID in practice.
    pub nonce: &'a str,
    /// Nonce count.
    pub count: u64,
    /// UTC time as `yyyyMMddHHmm` (see [`timestamp`]).
    pub timestamp: &'a str,
}

/// The hex HMAC-SHA256 part of the token.
pub fn token_hash(t: &TokenInput<'_>) -> String {
    let mailbox = t.mailbox.to_ascii_uppercase();
    // new_from_slice accepts keys of any length for HMAC; the error arm cannot happen but must not panic.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(t.shared_key) else {
        return String::new();
    };
    mac.update(
        format!(
            "{mailbox}:{}:{}:{}:{}",
            t.nonce, t.count, t.password, t.timestamp
        )
        .as_bytes(),
    );
    hex::encode(mac.finalize().into_bytes())
}

/// The full `Authorization` header value: `NHSMESH MAILBOX:nonce:count:timestamp:hash`.
pub fn authorization(t: &TokenInput<'_>) -> String {
    format!(
        "NHSMESH {}:{}:{}:{}:{}",
        t.mailbox.to_ascii_uppercase(),
        t.nonce,
        t.count,
        t.timestamp,
        token_hash(t)
    )
}

/// `yyyyMMddHHmm` in UTC for seconds since the Unix epoch (negative values clamp to 1970).
pub fn timestamp(unix_seconds: i64) -> String {
    let secs = unix_seconds.max(0);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    // Known-answer vectors, computed independently with Python's standard library:
    //   hmac.new(key.encode(), f"{mb}:{nonce}:{count}:{pw}:{ts}".encode(), hashlib.sha256).hexdigest()
    // (the first one also appears in the MESH notes this project keeps, for the sandbox's test mailbox).

    #[test]
    fn kat_sandbox_mailbox() {
        let t = TokenInput {
            mailbox: "X26ABC1",
            password: "password",
            shared_key: b"TestKey",
            nonce: "2c001608-5f09-4840-9611-bea43e666a30",
            count: 1,
            timestamp: "202401011200",
        };
        assert_eq!(
            token_hash(&t),
            "e72e9aa6b31085021ebb2de9ae7e5bf7197e3c3477b18f6a3833e6754b9f63fe"
        );
        assert_eq!(
            authorization(&t),
            "NHSMESH X26ABC1:2c001608-5f09-4840-9611-bea43e666a30:1:202401011200:\
             e72e9aa6b31085021ebb2de9ae7e5bf7197e3c3477b18f6a3833e6754b9f63fe"
        );
    }

    #[test]
    fn kat_password_with_colons_and_lowercase_mailbox() {
        // Python: key "BackBone", message "X26ABC2:0f5a5c1e-3b7d-4b8e-9c2a-6d1e2f3a4b5c:7:s3cret:with:colons:203012312359"
        let t = TokenInput {
            mailbox: "x26abc2",
            password: "s3cret:with:colons",
            shared_key: b"BackBone",
            nonce: "0f5a5c1e-3b7d-4b8e-9c2a-6d1e2f3a4b5c",
            count: 7,
            timestamp: "203012312359",
        };
        assert_eq!(
            token_hash(&t),
            "e98a0b95b4cd1716919c754a874bbd0b06532fbc3d0ece68afa11e5ab67c2e46"
        );
        assert!(authorization(&t).starts_with("NHSMESH X26ABC2:0f5a5c1e-"));
    }

    #[test]
    fn kat_count_zero() {
        // Python: key "Banana", message "MAILBOX01:a6b272c0-0000-4000-8000-000000000001:0:password:202611240017"
        let t = TokenInput {
            mailbox: "MAILBOX01",
            password: "password",
            shared_key: b"Banana",
            nonce: "a6b272c0-0000-4000-8000-000000000001",
            count: 0,
            timestamp: &timestamp(1_795_479_450), // 2026-11-24T00:17:30Z
        };
        assert_eq!(t.timestamp, "202611240017");
        assert_eq!(
            token_hash(&t),
            "80cc08ad90cbeb8ac4476b3cdb85e4026d362f0f89c1736db92d75a44612bf2d"
        );
    }

    #[test]
    fn different_inputs_change_the_hash() {
        let base = TokenInput {
            mailbox: "X26ABC1",
            password: "password",
            shared_key: b"TestKey",
            nonce: "n",
            count: 1,
            timestamp: "202401011200",
        };
        let h = token_hash(&base);
        assert_ne!(h, token_hash(&TokenInput { count: 2, ..base }));
        assert_ne!(
            h,
            token_hash(&TokenInput {
                password: "other",
                ..base
            })
        );
        assert_ne!(
            h,
            token_hash(&TokenInput {
                shared_key: b"Other",
                ..base
            })
        );
    }

    #[test]
    fn timestamps_in_utc() {
        assert_eq!(timestamp(0), "197001010000");
        assert_eq!(timestamp(1_704_110_400), "202401011200");
        assert_eq!(timestamp(1_924_991_999), "203012312359");
        assert_eq!(timestamp(951_782_400), "200002290000"); // leap day of a century leap year
        assert_eq!(timestamp(-5), "197001010000");
    }
}
