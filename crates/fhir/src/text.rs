//! Text normalisation for FHIR string search.

/// Normalise a string for FHIR string search: lower case, common Latin accents removed, runs of whitespace
/// collapsed to one space, trimmed. Used both when indexing and when querying.
///
/// Details: lower-casing is Unicode (per character); precomposed Latin letters with diacritics are mapped
/// through a small table (`é`→`e`, `ß`→`ss`, `ø`→`o`, `æ`→`ae`, `ł`→`l`, Welsh `ŵ`/`ŷ`, ...); combining
/// diacritical marks (U+0300..=U+036F, as left by decomposed input such as `e\u{301}`) are dropped; Greek
/// final sigma is folded to `σ` so that prefixes match; every Unicode whitespace run becomes one ASCII space.
pub fn normalize_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    // A space is only written when a non-space character follows it, which also trims both ends.
    let mut pending_space = false;
    for c in s.chars() {
        if c.is_whitespace() {
            pending_space = !out.is_empty();
            continue;
        }
        for lc in c.to_lowercase() {
            if is_combining_mark(lc) {
                continue;
            }
            if pending_space {
                out.push(' ');
                pending_space = false;
            }
            match fold_latin(lc) {
                Some(folded) => out.push_str(folded),
                None => out.push(lc),
            }
        }
    }
    out
}

/// The smallest string greater than every string that starts with `prefix`, in code point order (which is
/// also UTF-8 byte order, i.e. SQLite `BINARY` / PostgreSQL `"C"` collation). With it a prefix search becomes
/// the range scan `value >= prefix AND value < bound`. `None` when there is no such bound: an empty prefix or
/// one made only of U+10FFFF (then scan `value >= prefix` alone).
pub fn string_prefix_upper_bound(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        if let Some(next) = next_char(last) {
            let mut bound: String = chars.into_iter().collect();
            bound.push(next);
            return Some(bound);
        }
        // `last` is char::MAX: no successor, carry into the previous character.
    }
    None
}

/// The next Unicode scalar value, skipping the surrogate gap.
fn next_char(c: char) -> Option<char> {
    let n = u32::from(c);
    let next = if n == 0xD7FF {
        0xE000
    } else {
        n.checked_add(1)?
    };
    char::from_u32(next)
}

fn is_combining_mark(c: char) -> bool {
    ('\u{0300}'..='\u{036F}').contains(&c)
}

/// Accent folding for lower-case Latin letters (Latin-1 Supplement, Latin Extended-A, a few of Extended
/// Additional). Returns None for characters that stay as they are.
fn fold_latin(c: char) -> Option<&'static str> {
    Some(match c {
        'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'ā' | 'ă' | 'ą' | 'ǎ' | 'ǻ' | 'ạ' | 'ả' | 'ấ' | 'ầ'
        | 'ẩ' | 'ẫ' | 'ậ' | 'ắ' | 'ằ' | 'ẳ' | 'ẵ' | 'ặ' => "a",
        'æ' | 'ǽ' => "ae",
        'ç' | 'ć' | 'ĉ' | 'ċ' | 'č' => "c",
        'ď' | 'đ' | 'ð' => "d",
        'è' | 'é' | 'ê' | 'ë' | 'ē' | 'ĕ' | 'ė' | 'ę' | 'ě' | 'ẹ' | 'ẻ' | 'ẽ' | 'ế' | 'ề' | 'ể'
        | 'ễ' | 'ệ' => "e",
        'ĝ' | 'ğ' | 'ġ' | 'ģ' => "g",
        'ĥ' | 'ħ' => "h",
        'ì' | 'í' | 'î' | 'ï' | 'ĩ' | 'ī' | 'ĭ' | 'į' | 'ı' | 'ǐ' | 'ỉ' | 'ị' => "i",
        'ĳ' => "ij",
        'ĵ' => "j",
        'ķ' => "k",
        'ĺ' | 'ļ' | 'ľ' | 'ŀ' | 'ł' => "l",
        'ñ' | 'ń' | 'ņ' | 'ň' | 'ŉ' => "n",
        'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'ō' | 'ŏ' | 'ő' | 'ǒ' | 'ǿ' | 'ọ' | 'ỏ' | 'ố' | 'ồ'
        | 'ổ' | 'ỗ' | 'ộ' | 'ớ' | 'ờ' | 'ở' | 'ỡ' | 'ợ' | 'ơ' => "o",
        'œ' => "oe",
        'ŕ' | 'ŗ' | 'ř' => "r",
        'ś' | 'ŝ' | 'ş' | 'š' | 'ș' | 'ſ' => "s",
        'ß' => "ss",
        'ţ' | 'ť' | 'ŧ' | 'ț' => "t",
        'þ' => "th",
        'ù' | 'ú' | 'û' | 'ü' | 'ũ' | 'ū' | 'ŭ' | 'ů' | 'ű' | 'ų' | 'ǔ' | 'ǖ' | 'ǘ' | 'ǚ' | 'ǜ'
        | 'ư' | 'ụ' | 'ủ' | 'ứ' | 'ừ' | 'ử' | 'ữ' | 'ự' => "u",
        'ŵ' | 'ẁ' | 'ẃ' | 'ẅ' => "w",
        'ý' | 'ÿ' | 'ŷ' | 'ỳ' | 'ỵ' | 'ỷ' | 'ỹ' => "y",
        'ź' | 'ż' | 'ž' => "z",
        'ς' => "σ",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowercases_and_strips_accents() {
        assert_eq!(normalize_string("Smith"), "smith");
        assert_eq!(normalize_string("Zoë Brontë"), "zoe bronte");
        assert_eq!(normalize_string("JOSÉ Muñoz"), "jose munoz");
        assert_eq!(
            normalize_string("Müller-Lüdenscheidt"),
            "muller-ludenscheidt"
        );
        assert_eq!(normalize_string("Straße"), "strasse");
        assert_eq!(normalize_string("STRASSE"), "strasse");
        assert_eq!(normalize_string("Søren Kierkegård"), "soren kierkegard");
        assert_eq!(normalize_string("François"), "francois");
        assert_eq!(normalize_string("Ærøskøbing"), "aeroskobing");
        assert_eq!(normalize_string("Łódź"), "lodz");
        assert_eq!(normalize_string("Dvořák"), "dvorak");
        assert_eq!(normalize_string("Siân Ŵyn"), "sian wyn");
        assert_eq!(normalize_string("Ó Súilleabháin"), "o suilleabhain");
        assert_eq!(normalize_string("Œuvre"), "oeuvre");
        assert_eq!(normalize_string("İstanbul"), "istanbul");
    }

    #[test]
    fn decomposed_input_matches_precomposed() {
        assert_eq!(normalize_string("Jose\u{301}"), normalize_string("José"));
        assert_eq!(normalize_string("Zoe\u{308}"), "zoe");
    }

    #[test]
    fn collapses_and_trims_whitespace() {
        assert_eq!(normalize_string("  Mary \t\n  Jane  "), "mary jane");
        assert_eq!(normalize_string("a\u{a0}\u{2003}b"), "a b");
        assert_eq!(normalize_string("   "), "");
        assert_eq!(normalize_string(""), "");
        assert_eq!(normalize_string("\u{301} x"), "x");
    }

    #[test]
    fn other_scripts_are_lowercased_only() {
        assert_eq!(normalize_string("ΟΔΥΣΣΕΥΣ"), "οδυσσευσ");
        assert_eq!(normalize_string("Οδυσσεύς"), normalize_string("οδυσσεύσ"));
        assert_eq!(normalize_string("Иван"), "иван");
        assert_eq!(normalize_string("李"), "李");
    }

    #[test]
    fn idempotent() {
        for s in ["Zoë  Brontë", "Straße", "ÆØÅ æøå", " a  b ", "Łódź", "ΣΑΣ"] {
            let once = normalize_string(s);
            assert_eq!(normalize_string(&once), once);
        }
    }

    #[test]
    fn prefix_upper_bound() {
        assert_eq!(string_prefix_upper_bound("smi").as_deref(), Some("smj"));
        assert_eq!(string_prefix_upper_bound("az").as_deref(), Some("a{"));
        assert_eq!(
            string_prefix_upper_bound("a\u{7f}").as_deref(),
            Some("a\u{80}")
        );
        assert_eq!(
            string_prefix_upper_bound("a\u{d7ff}").as_deref(),
            Some("a\u{e000}")
        );
        assert_eq!(
            string_prefix_upper_bound("ab\u{10ffff}").as_deref(),
            Some("ac")
        );
        assert_eq!(string_prefix_upper_bound("\u{10ffff}\u{10ffff}"), None);
        assert_eq!(string_prefix_upper_bound(""), None);
    }

    #[test]
    fn prefix_upper_bound_orders_bytewise() {
        for prefix in [
            "smi",
            "jos",
            "zo\u{7f}",
            "a\u{d7ff}",
            "\u{ffff}",
            "x\u{10ffff}",
        ] {
            let Some(bound) = string_prefix_upper_bound(prefix) else {
                unreachable!()
            };
            for suffix in [
                "",
                "a",
                "zzzz",
                "\u{7f}",
                "\u{10ffff}\u{10ffff}",
                "\u{e000}",
            ] {
                let s = format!("{prefix}{suffix}");
                assert!(s.as_bytes() < bound.as_bytes(), "{s:?} < {bound:?}");
                assert!(s.as_str() < bound.as_str());
            }
            assert!(prefix < bound.as_str());
        }
    }
}
