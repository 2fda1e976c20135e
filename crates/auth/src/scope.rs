//! SMART on FHIR v2 system scopes (`system/Appointment.cruds`, `system/*.rs`), the v1 forms (`system/*.read`
//! = `rs`, `.write` = `cud`, `.*` = `cruds`), the hub's own `admin` scope (`/admin/*`, `/metrics`,
//! `$replay`, AuditEvent) and `cross-org` (the client sees and changes every organisation's data, and may use
//! the event feed and Subscriptions; without it a client is confined to its own organisation). Patient and user
//! scopes are not accepted: every client is a system.

/// The five SMART v2 permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interaction {
    /// `c`: create (POST, `$generate-slots` for the Slots it creates).
    Create,
    /// `r`: read, vread, history.
    Read,
    /// `u`: update, patch, `$transition`, `$merge`.
    Update,
    /// `d`: delete.
    Delete,
    /// `s`: search.
    Search,
}

impl Interaction {
    fn bit(self) -> u8 {
        match self {
            Interaction::Create => 1,
            Interaction::Read => 2,
            Interaction::Update => 4,
            Interaction::Delete => 8,
            Interaction::Search => 16,
        }
    }

    /// The SMART v2 letter.
    pub fn letter(self) -> char {
        match self {
            Interaction::Create => 'c',
            Interaction::Read => 'r',
            Interaction::Update => 'u',
            Interaction::Delete => 'd',
            Interaction::Search => 's',
        }
    }
}

/// The scope that lifts organisation separation.
pub const CROSS_ORG: &str = "cross-org";

const LETTERS: [(char, u8); 5] = [('c', 1), ('r', 2), ('u', 4), ('d', 8), ('s', 16)];

/// A set of granted (or requested) scopes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes {
    /// (resource type or `*`, permission bits).
    entries: Vec<(String, u8)>,
    /// The `admin` scope.
    admin: bool,
    /// The `cross-org` scope.
    cross_org: bool,
}

impl Scopes {
    /// Parse a space-separated scope string. Unknown or malformed scopes are an error naming them.
    pub fn parse(text: &str) -> Result<Scopes, String> {
        let mut out = Scopes::default();
        for s in text.split_ascii_whitespace() {
            if s == "admin" {
                out.admin = true;
                continue;
            }
            if s == CROSS_ORG {
                out.cross_org = true;
                continue;
            }
            let Some(rest) = s.strip_prefix("system/") else {
                return Err(format!(
                    "'{s}' is not a system scope (system/<Type>.<cruds>), 'admin' or 'cross-org'"
                ));
            };
            let Some((rtype, perm)) = rest.split_once('.') else {
                return Err(format!("'{s}' has no '.<permissions>'"));
            };
            let valid_type = rtype == "*"
                || (rtype.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                    && rtype.chars().all(|c| c.is_ascii_alphanumeric()));
            if !valid_type {
                return Err(format!("'{s}': '{rtype}' is not a resource type or '*'"));
            }
            let bits = perm_bits(perm).ok_or_else(|| {
                format!("'{s}': permissions must be c, r, u, d, s in that order, or read, write, *")
            })?;
            out.entries.push((rtype.to_string(), bits));
        }
        Ok(out)
    }

    /// True when `interaction` on `rtype` is granted (by a scope on that type or on `*`).
    pub fn allows(&self, rtype: &str, interaction: Interaction) -> bool {
        self.bits(rtype) & interaction.bit() != 0
    }

    /// True when the `admin` scope is granted.
    pub fn is_admin(&self) -> bool {
        self.admin
    }

    /// True when the `cross-org` scope is granted.
    pub fn is_cross_org(&self) -> bool {
        self.cross_org
    }

    fn bits(&self, rtype: &str) -> u8 {
        self.entries
            .iter()
            .filter(|(t, _)| t == rtype || t == "*")
            .fold(0, |acc, (_, b)| acc | b)
    }

    /// True when every scope of `self` is covered by `granted` (a `*` request needs a `*` grant).
    pub fn is_within(&self, granted: &Scopes) -> bool {
        (!self.admin || granted.admin)
            && (!self.cross_org || granted.cross_org)
            && self.entries.iter().all(|(t, b)| {
                let have = if t == "*" {
                    granted
                        .entries
                        .iter()
                        .filter(|(g, _)| g == "*")
                        .fold(0, |acc, (_, gb)| acc | gb)
                } else {
                    granted.bits(t)
                };
                have & b == *b
            })
    }

    /// The scope named in a refusal, e.g. `system/Patient.r`.
    pub fn needed(rtype: &str, interaction: Interaction) -> String {
        format!("system/{rtype}.{}", interaction.letter())
    }
}

impl std::fmt::Display for Scopes {
    /// Canonical form: v2 letters, in grant order, then `admin`, then `cross-org`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for (t, b) in &self.entries {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            write!(f, "system/{t}.")?;
            for (c, bit) in LETTERS {
                if b & bit != 0 {
                    write!(f, "{c}")?;
                }
            }
        }
        if self.admin {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            f.write_str("admin")?;
        }
        if self.cross_org {
            if !first {
                f.write_str(" ")?;
            }
            f.write_str(CROSS_ORG)?;
        }
        Ok(())
    }
}

fn perm_bits(perm: &str) -> Option<u8> {
    match perm {
        "read" => return Some(2 | 16),
        "write" => return Some(1 | 4 | 8),
        "*" => return Some(31),
        _ => {}
    }
    let mut bits = 0u8;
    let mut next = 0usize;
    for ch in perm.chars() {
        let pos = LETTERS[next..].iter().position(|(c, _)| *c == ch)? + next;
        bits |= LETTERS[pos].1;
        next = pos + 1;
    }
    (bits != 0).then_some(bits)
}
