use std::fmt;

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
            NhsNumberError::CheckDigitTen => "NHS number fails the modulus 11 check (check digit would be 10)",
            NhsNumberError::CheckDigit => "NHS number fails the modulus 11 check digit",
            NhsNumberError::RepeatedDigits => "NHS number made of one repeated digit is not valid",
        })
    }
}

impl NhsNumber {
    pub fn parse(s: &str) -> Result<NhsNumber, NhsNumberError> {
        let _ = s;
        Err(NhsNumberError::Format) // TODO(helper): implement
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}
