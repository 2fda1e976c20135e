//! Synthetic UK Core Patients with distinct, valid NHS numbers.
//!
//! Why it exists: write benchmarks need realistic bodies (about 1.5 KB, the shape a GP system or PDS sends:
//! NHS number with its verification-status extension, official name, birth date, address, telecom, registered
//! GP practice), and search benchmarks need each patient findable by a distinct NHS number.
//!
//! Invariants: every number produced passes the hub's own NHS number check (`fhir::NhsNumber`: modulus 11,
//! so nine-digit stems whose check digit would be 10 are skipped; no number of one repeated digit, so
//! 9999999999 is skipped); numbers are in the 999 test range, so never a real person's; the same index always
//! gives the same patient.

use std::sync::atomic::{AtomicU64, Ordering};

/// Identifier system of NHS numbers.
pub const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";

/// First nine-digit stem of the generated range (NHS numbers starting 999 are reserved for testing).
const STEM_BASE: u64 = 999_000_000;
/// Number of stems in the range.
const STEM_SPAN: u64 = 1_000_000;

/// Whether a ten-digit string is a valid NHS number (the hub's own check, `fhir::NhsNumber`: modulus 11,
/// no number of one repeated digit), written without spaces.
pub fn is_valid_nhs_number(s: &str) -> bool {
    s.len() == 10 && fhir::NhsNumber::parse(s).is_ok()
}

/// A thread-safe source of distinct valid NHS numbers in the 999 test range, starting at a chosen offset.
#[derive(Debug)]
pub struct NhsNumbers {
    next: AtomicU64,
}

impl NhsNumbers {
    /// Numbers from stem offset `start` (taken modulo the range size) upwards.
    pub fn starting_at(start: u64) -> NhsNumbers {
        NhsNumbers {
            next: AtomicU64::new(start % STEM_SPAN),
        }
    }

    /// The next valid number (wraps after about 909,000 numbers).
    pub fn next_number(&self) -> String {
        loop {
            let stem = STEM_BASE + self.next.fetch_add(1, Ordering::Relaxed) % STEM_SPAN;
            // Stems whose check digit would be 10 have no number; 9999999999 passes the check digit, but a
            // number of one repeated digit is not issued.
            if let Some(d) = fhir::NhsNumber::check_digit(&stem.to_string()) {
                let number = format!("{stem}{d}");
                if is_valid_nhs_number(&number) {
                    return number;
                }
            }
        }
    }
}

const FAMILY: [&str; 16] = [
    "SMITH", "JONES", "WILLIAMS", "TAYLOR", "BROWN", "DAVIES", "EVANS", "WILSON", "THOMAS",
    "JOHNSON", "ROBERTS", "ROBINSON", "THOMPSON", "WRIGHT", "WALKER", "O'BRIEN",
];
const GIVEN_F: [&str; 8] = [
    "Olivia", "Amelia", "Isla", "Ava", "Mia", "Priya", "Siobhan", "Zoë",
];
const GIVEN_M: [&str; 8] = [
    "Oliver", "George", "Arthur", "Noah", "Muhammad", "Leo", "Rhys", "Jakub",
];
const MIDDLE: [&str; 6] = ["Jane", "Marie", "James", "Alexander", "Rose", "David"];
const STREETS: [&str; 8] = [
    "Sandmoor Drive",
    "Boar Lane",
    "Station Road",
    "Church Street",
    "Victoria Road",
    "Green Lane",
    "Manor Road",
    "Park Avenue",
];
/// (city, district, postcode outward code)
const TOWNS: [(&str, &str, &str); 6] = [
    ("LEEDS", "West Yorkshire", "LS17"),
    ("BRADFORD", "West Yorkshire", "BD9"),
    ("MANCHESTER", "Greater Manchester", "M14"),
    ("BIRMINGHAM", "West Midlands", "B15"),
    ("BRISTOL", "City of Bristol", "BS8"),
    ("NEWCASTLE UPON TYNE", "Tyne and Wear", "NE2"),
];

/// A UK Core Patient (JSON, about 1.5 KB) for index `i` with NHS number `nhs`.
pub fn patient_json(i: u64, nhs: &str) -> String {
    let female = i.is_multiple_of(2);
    let (gender, given, prefix) = if female {
        ("female", GIVEN_F[(i / 2 % 8) as usize], "Ms")
    } else {
        ("male", GIVEN_M[(i / 2 % 8) as usize], "Mr")
    };
    let family = FAMILY[(i / 16 % 16) as usize];
    let middle = MIDDLE[(i % 6) as usize];
    let year = 1930 + i % 90;
    let month = 1 + i % 12;
    let day = 1 + i % 28;
    let house = 1 + i % 180;
    let street = STREETS[(i % 8) as usize];
    let (city, district, outward) = TOWNS[(i % 6) as usize];
    let inward = format!(
        "{}{}{}",
        i % 10,
        (b'A' + (i % 20) as u8) as char,
        (b'A' + (i / 20 % 20) as u8) as char
    );
    let phone = format!("0113 496 {:04}", i % 10_000);
    let mobile = format!("07700 9{:05}", i % 100_000);
    let email = format!(
        "{}.{}{}@example.nhs.net",
        given.to_ascii_lowercase(),
        family.to_ascii_lowercase().replace('\'', ""),
        i
    );
    let practice = format!("B{:05}", 80_000 + i % 1000);
    format!(
        r#"{{"resourceType":"Patient","meta":{{"profile":["https://fhir.hl7.org.uk/StructureDefinition/UKCore-Patient"]}},"extension":[{{"url":"https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-EthnicCategory","valueCodeableConcept":{{"coding":[{{"system":"https://fhir.hl7.org.uk/CodeSystem/UKCore-EthnicCategoryEngland","code":"A","display":"White - British"}}]}}}}],"identifier":[{{"extension":[{{"url":"https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-NHSNumberVerificationStatus","valueCodeableConcept":{{"coding":[{{"system":"https://fhir.hl7.org.uk/CodeSystem/UKCore-NHSNumberVerificationStatusEngland","code":"01","display":"Number present and verified"}}]}}}}],"system":"{NHS_NUMBER_SYSTEM}","value":"{nhs}"}}],"active":true,"name":[{{"use":"official","family":"{family}","given":["{given}","{middle}"],"prefix":["{prefix}"],"period":{{"start":"{year}-{month:02}-{day:02}"}}}}],"telecom":[{{"system":"phone","value":"{phone}","use":"home","rank":1}},{{"system":"phone","value":"{mobile}","use":"mobile","rank":2}},{{"system":"email","value":"{email}","use":"home"}}],"gender":"{gender}","birthDate":"{year}-{month:02}-{day:02}","address":[{{"use":"home","type":"physical","line":["{house} {street}"],"city":"{city}","district":"{district}","postalCode":"{outward} {inward}","country":"GB","period":{{"start":"2015-03-01"}}}}],"generalPractitioner":[{{"type":"Organization","identifier":{{"system":"https://fhir.nhs.uk/Id/ods-organization-code","value":"{practice}"}}}}],"communication":[{{"language":{{"coding":[{{"system":"https://fhir.hl7.org.uk/CodeSystem/UKCore-HumanLanguage","code":"en","display":"English"}}]}},"preferred":true}}]}}"#
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn known_numbers_check() {
        assert!(is_valid_nhs_number("9912003888")); // UK Core example patient
        assert!(is_valid_nhs_number("9000000009"));
        assert!(!is_valid_nhs_number("9912003880"));
        // Passes the check digit, but the hub refuses a number of one repeated digit.
        assert!(!is_valid_nhs_number("9999999999"));
    }

    #[test]
    fn the_end_of_the_range_skips_the_repeated_digit_number() {
        let src = NhsNumbers::starting_at(STEM_SPAN - 3);
        let nums: Vec<String> = (0..6).map(|_| src.next_number()).collect();
        assert!(nums.iter().all(|n| is_valid_nhs_number(n)), "{nums:?}");
        assert!(!nums.iter().any(|n| n == "9999999999"), "{nums:?}");
    }

    #[test]
    fn generated_numbers_are_valid_and_distinct() {
        let src = NhsNumbers::starting_at(0);
        let nums: Vec<String> = (0..2000).map(|_| src.next_number()).collect();
        assert!(nums.iter().all(|n| is_valid_nhs_number(n)));
        let mut sorted = nums.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), nums.len());
    }

    #[test]
    fn patient_is_json_of_realistic_size() {
        let body = patient_json(7, "9990000018");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["identifier"][0]["value"], "9990000018");
        assert!((1200..2000).contains(&body.len()), "{} bytes", body.len());
    }
}
