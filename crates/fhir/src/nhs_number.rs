use std::fmt;
use std::str::FromStr;

pub const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";

/// A 10-digit NHS number that passed the modulus 11 check and is not a repeated-digit number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NhsNumber(String);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NhsNumberError {
    /// Not exactly 10 digits after removing spaces and hyphens.
    Format,
    /// Check digit 10, i.e. never issued.
    CheckDigitTen,
    /// The check digit does not match.
    CheckDigit,
    /// All ten digits the same (passes the arithmetic but is never issued).
    RepeatedDigits,
}

impl fmt::Display for NhsNumberError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NhsNumberError::Format => "an NHS number must be exactly 10 digits",
            NhsNumberError::CheckDigitTen => {
                "NHS number fails the modulus 11 check (check digit would be 10)"
            }
            NhsNumberError::CheckDigit => "NHS number fails the modulus 11 check digit",
            NhsNumberError::RepeatedDigits => "NHS number made of one repeated digit is not valid",
        })
    }
}

impl std::error::Error for NhsNumberError {}

impl NhsNumber {
    /// Parse and check an NHS number. Spaces and hyphens are ignored (`943 476 5919`, `943-476-5919`); what
    /// remains must be exactly 10 ASCII digits whose last digit is the modulus 11 check digit of the first
    /// nine. Repeated-digit numbers (`0000000000`, `1111111111`, ...) are refused before the arithmetic.
    /// Which ranges are acceptable (e.g. the 9xx test range) is policy and not decided here.
    pub fn parse(s: &str) -> Result<NhsNumber, NhsNumberError> {
        let digits = Self::digits(s)?;
        Ok(NhsNumber(
            digits.iter().map(|&d| char::from(b'0' + d)).collect(),
        ))
    }

    /// Whether `s` is a valid NHS number, as [`NhsNumber::parse`] decides, without building the number.
    pub(crate) fn check(s: &str) -> Result<(), NhsNumberError> {
        Self::digits(s).map(|_| ())
    }

    /// The ten digits of a valid NHS number (the checks of [`NhsNumber::parse`]).
    fn digits(s: &str) -> Result<[u8; 10], NhsNumberError> {
        let mut digits = [0u8; 10];
        let mut n = 0usize;
        for c in s.chars() {
            match c {
                ' ' | '-' => {}
                '0'..='9' => {
                    let slot = digits.get_mut(n).ok_or(NhsNumberError::Format)?;
                    *slot = c as u8 - b'0';
                    n += 1;
                }
                _ => return Err(NhsNumberError::Format),
            }
        }
        if n != 10 {
            return Err(NhsNumberError::Format);
        }
        if digits.iter().all(|&d| d == digits[0]) {
            return Err(NhsNumberError::RepeatedDigits);
        }
        let mut first_nine = [0u8; 9];
        first_nine.copy_from_slice(&digits[..9]);
        match check_digit_of(&first_nine) {
            None => Err(NhsNumberError::CheckDigitTen),
            Some(c) if c != digits[9] => Err(NhsNumberError::CheckDigit),
            Some(_) => Ok(digits),
        }
    }

    /// The modulus 11 check digit for the first nine digits of an NHS number (spaces and hyphens ignored),
    /// or None when they are not nine ASCII digits or the check digit would be 10 (such numbers are never
    /// issued). Handy for generating synthetic test numbers.
    pub fn check_digit(first_nine: &str) -> Option<u8> {
        let mut digits = [0u8; 9];
        let mut n = 0usize;
        for c in first_nine.chars() {
            match c {
                ' ' | '-' => {}
                '0'..='9' => {
                    *digits.get_mut(n)? = c as u8 - b'0';
                    n += 1;
                }
                _ => return None,
            }
        }
        if n != 9 {
            return None;
        }
        check_digit_of(&digits)
    }

    /// The canonical 10-digit form, e.g. `9434765919`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 3-3-4 display form, e.g. `943 476 5919`.
    pub fn formatted(&self) -> String {
        let s = self.0.as_str();
        match (s.get(..3), s.get(3..6), s.get(6..)) {
            (Some(a), Some(b), Some(c)) => format!("{a} {b} {c}"),
            _ => s.to_string(),
        }
    }
}

impl fmt::Display for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for NhsNumber {
    type Err = NhsNumberError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NhsNumber::parse(s)
    }
}

/// Weights 10..=2 over the first nine digits; `c = 11 - (sum mod 11)`, 11 → 0, 10 → None.
fn check_digit_of(first_nine: &[u8; 9]) -> Option<u8> {
    let sum: u32 = first_nine
        .iter()
        .zip((2..=10u32).rev())
        .map(|(&d, w)| u32::from(d) * w)
        .sum();
    match 11 - (sum % 11) {
        11 => Some(0),
        10 => None,
        c => u8::try_from(c).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brief_test_vectors() {
        for valid in [
            "9000000009",
            "9000000025",
            "9000000033",
            "9111231130",
            "9990548609",
        ] {
            let n = NhsNumber::parse(valid);
            assert_eq!(n.as_ref().map(NhsNumber::as_str), Ok(valid), "{valid}");
        }
        assert_eq!(
            NhsNumber::parse("9000000000"),
            Err(NhsNumberError::CheckDigit)
        );
        for rep in ["0000000000", "1111111111", "9999999999"] {
            assert_eq!(
                NhsNumber::parse(rep),
                Err(NhsNumberError::RepeatedDigits),
                "{rep}"
            );
        }
        for d in 0..=9u8 {
            let rep: String = std::iter::repeat_n(char::from(b'0' + d), 10).collect();
            assert_eq!(
                NhsNumber::parse(&rep),
                Err(NhsNumberError::RepeatedDigits),
                "{rep}"
            );
        }
    }

    #[test]
    fn separators_and_canonical_form() {
        let Ok(n) = NhsNumber::parse("943 476 5919") else {
            unreachable!()
        };
        assert_eq!(n.as_str(), "9434765919");
        assert_eq!(n.formatted(), "943 476 5919");
        assert_eq!(n.to_string(), "9434765919");
        assert_eq!(NhsNumber::parse("943-476-5919"), Ok(n.clone()));
        assert_eq!(NhsNumber::parse(" 943 - 476 - 5919 "), Ok(n.clone()));
        assert_eq!("9434765919".parse::<NhsNumber>(), Ok(n));
    }

    #[test]
    fn format_errors() {
        for bad in [
            "",
            "   ",
            "943476591",
            "94347659190",
            "9434765919 1",
            "943476591X",
            "943.476.5919",
            "943\t476\t5919",
            "９４３４７６５９１９",
            "943476591９",
            "+9434765919",
        ] {
            assert_eq!(
                NhsNumber::parse(bad),
                Err(NhsNumberError::Format),
                "{bad:?}"
            );
        }
        // A very long input is refused without reading it all into a buffer.
        assert_eq!(
            NhsNumber::parse(&"1".repeat(100_000)),
            Err(NhsNumberError::Format)
        );
    }

    #[test]
    fn check_digit_ten_and_mismatch() {
        // 943476591: sum = 90+36+24+28+42+30+20+27+2 = 299; 299 % 11 = 2; c = 9.
        assert_eq!(NhsNumber::check_digit("943476591"), Some(9));
        assert_eq!(NhsNumber::check_digit("943 476 591"), Some(9));
        assert!(NhsNumber::parse("9434765919").is_ok());
        assert_eq!(
            NhsNumber::parse("9434765918"),
            Err(NhsNumberError::CheckDigit)
        );
        // 123456789: sum = 10+18+24+28+30+30+28+24+18 = 210; 210 % 11 = 1; c = 10.
        assert_eq!(NhsNumber::check_digit("123456789"), None);
        assert_eq!(
            NhsNumber::parse("1234567890"),
            Err(NhsNumberError::CheckDigitTen)
        );
        assert_eq!(NhsNumber::check_digit("12345678"), None);
        assert_eq!(NhsNumber::check_digit("12345678x"), None);
        // 100000001: sum = 1*10 + 1*2 = 12; 12 % 11 = 1; c = 10, never issued.
        assert_eq!(NhsNumber::check_digit("100000001"), None);
        for last in 0..=9u8 {
            let s = format!("100000001{last}");
            assert_eq!(
                NhsNumber::parse(&s),
                Err(NhsNumberError::CheckDigitTen),
                "{s}"
            );
        }
        // 200000001: sum = 2*10 + 1*2 = 22; 22 % 11 = 0; c = 11, which becomes 0.
        assert_eq!(NhsNumber::check_digit("200000001"), Some(0));
        assert!(NhsNumber::parse("2000000010").is_ok());
    }

    #[test]
    fn error_messages() {
        assert!(NhsNumberError::CheckDigitTen.to_string().contains("10"));
        assert!(!NhsNumberError::Format.to_string().is_empty());
    }

    /// Property: for pseudo-random 9-digit prefixes the computed check digit round-trips through `parse`, and
    /// every other final digit is refused.
    #[test]
    fn check_digit_round_trips_for_random_prefixes() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let (mut valid, mut ten) = (0, 0);
        for _ in 0..20_000 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let prefix = format!("{:09}", (x >> 20) % 1_000_000_000);
            let repeated = prefix.bytes().all(|b| Some(b) == prefix.bytes().next());
            match NhsNumber::check_digit(&prefix) {
                Some(c) => {
                    valid += 1;
                    let full = format!("{prefix}{c}");
                    if full.bytes().all(|b| Some(b) == full.bytes().next()) {
                        assert_eq!(NhsNumber::parse(&full), Err(NhsNumberError::RepeatedDigits));
                        continue;
                    }
                    assert_eq!(
                        NhsNumber::parse(&full).as_ref().map(NhsNumber::as_str),
                        Ok(full.as_str())
                    );
                    let spaced = format!("{} {} {}", &prefix[..3], &prefix[3..6], &full[6..]);
                    assert_eq!(
                        NhsNumber::parse(&spaced).map(|n| n.formatted()),
                        Ok(spaced.clone())
                    );
                    for other in (0..=9u8).filter(|&d| d != c) {
                        let wrong = format!("{prefix}{other}");
                        let expected = if repeated && other == prefix.as_bytes()[0] - b'0' {
                            NhsNumberError::RepeatedDigits
                        } else {
                            NhsNumberError::CheckDigit
                        };
                        assert_eq!(NhsNumber::parse(&wrong), Err(expected), "{wrong}");
                    }
                }
                None => {
                    ten += 1;
                    for last in 0..=9u8 {
                        let s = format!("{prefix}{last}");
                        let r = NhsNumber::parse(&s);
                        assert!(
                            r == Err(NhsNumberError::CheckDigitTen)
                                || r == Err(NhsNumberError::RepeatedDigits),
                            "{s}: {r:?}"
                        );
                    }
                }
            }
        }
        // Roughly 1 prefix in 11 has check digit 10.
        assert!(ten > 1_000 && valid > 15_000, "valid {valid}, ten {ten}");
    }
}
