//! The R4 status codes of Appointment and Slot, and the hub's transition policy.

use std::fmt;

/// `Appointment.status` (`http://hl7.org/fhir/appointmentstatus`, R4 4.0.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AppointmentStatus {
    Proposed,
    Pending,
    Booked,
    Arrived,
    Fulfilled,
    Cancelled,
    Noshow,
    EnteredInError,
    CheckedIn,
    Waitlist,
}

use AppointmentStatus::{
    Arrived, Booked, Cancelled, CheckedIn, EnteredInError, Fulfilled, Noshow, Pending, Proposed,
    Waitlist,
};

impl AppointmentStatus {
    /// All ten codes, in the order of the R4 value set.
    pub const ALL: [AppointmentStatus; 10] = [
        Proposed,
        Pending,
        Booked,
        Arrived,
        Fulfilled,
        Cancelled,
        Noshow,
        EnteredInError,
        CheckedIn,
        Waitlist,
    ];

    /// Parse an R4 code (exact, case-sensitive as FHIR codes are).
    pub fn parse(code: &str) -> Option<Self> {
        Some(match code {
            "proposed" => Proposed,
            "pending" => Pending,
            "booked" => Booked,
            "arrived" => Arrived,
            "fulfilled" => Fulfilled,
            "cancelled" => Cancelled,
            "noshow" => Noshow,
            "entered-in-error" => EnteredInError,
            "checked-in" => CheckedIn,
            "waitlist" => Waitlist,
            _ => return None,
        })
    }

    /// The R4 code.
    pub fn as_str(self) -> &'static str {
        match self {
            Proposed => "proposed",
            Pending => "pending",
            Booked => "booked",
            Arrived => "arrived",
            Fulfilled => "fulfilled",
            Cancelled => "cancelled",
            Noshow => "noshow",
            EnteredInError => "entered-in-error",
            CheckedIn => "checked-in",
            Waitlist => "waitlist",
        }
    }

    /// Terminal statuses: fulfilled, cancelled and noshow (which only accept a correction to entered-in-error)
    /// and entered-in-error (which accepts nothing).
    pub fn is_terminal(self) -> bool {
        matches!(self, Fulfilled | Cancelled | Noshow | EnteredInError)
    }

    /// Whether an appointment in this status holds its slots (the slots are `busy` and owned by it).
    ///
    /// Hub policy: booked, arrived and checked-in hold their slots; so do fulfilled and noshow, because the
    /// time was really given to this patient and history should say so (a noshow slot is in the past anyway,
    /// and "free in the past" would be a lie). Proposed, pending and waitlist hold nothing (they may reference
    /// a slot, but it is only claimed on booking). Cancelled and entered-in-error release their slots.
    pub fn holds_slots(self) -> bool {
        matches!(self, Booked | Arrived | CheckedIn | Fulfilled | Noshow)
    }

    /// Statuses a new appointment may be created with: proposed, pending, booked, waitlist. Everything else
    /// describes something that happened to an existing appointment.
    pub fn is_initial(self) -> bool {
        matches!(self, Proposed | Pending | Booked | Waitlist)
    }

    /// R4 invariant app-3: start and end may be missing only for proposed, cancelled and waitlist.
    pub fn requires_times(self) -> bool {
        !matches!(self, Proposed | Cancelled | Waitlist)
    }

    /// The statuses an appointment in `self` may move to (hub policy, nhs-standards §2), including `self` when
    /// an edit that keeps the status is allowed.
    ///
    /// Same-status edits are allowed for every non-terminal status (booked -> booked is a reschedule or a
    /// modification; proposed/pending/waitlist edits negotiate the time; arrived/checked-in edits may not move
    /// the appointment, see [`crate::decide`]). Terminal statuses have no self-edit.
    pub fn allowed_targets(self) -> &'static [AppointmentStatus] {
        match self {
            Proposed => &[Proposed, Pending, Booked, Cancelled, EnteredInError],
            Waitlist => &[Waitlist, Pending, Booked, Cancelled, EnteredInError],
            Pending => &[Pending, Booked, Cancelled, EnteredInError],
            Booked => &[
                Booked,
                Arrived,
                CheckedIn,
                Fulfilled,
                Cancelled,
                Noshow,
                EnteredInError,
            ],
            Arrived => &[Arrived, CheckedIn, Fulfilled, EnteredInError],
            CheckedIn => &[CheckedIn, Fulfilled, EnteredInError],
            Fulfilled | Cancelled | Noshow => &[EnteredInError],
            EnteredInError => &[],
        }
    }

    /// Whether `self -> to` is allowed by the policy (see [`Self::allowed_targets`]).
    pub fn can_transition_to(self, to: AppointmentStatus) -> bool {
        self.allowed_targets().contains(&to)
    }
}

impl fmt::Display for AppointmentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `Slot.status` (`http://hl7.org/fhir/slotstatus`, R4 4.0.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SlotStatus {
    Busy,
    Free,
    BusyUnavailable,
    BusyTentative,
    EnteredInError,
}

impl SlotStatus {
    /// All five codes.
    pub const ALL: [SlotStatus; 5] = [
        SlotStatus::Busy,
        SlotStatus::Free,
        SlotStatus::BusyUnavailable,
        SlotStatus::BusyTentative,
        SlotStatus::EnteredInError,
    ];

    /// Parse an R4 code.
    pub fn parse(code: &str) -> Option<Self> {
        Some(match code {
            "busy" => SlotStatus::Busy,
            "free" => SlotStatus::Free,
            "busy-unavailable" => SlotStatus::BusyUnavailable,
            "busy-tentative" => SlotStatus::BusyTentative,
            "entered-in-error" => SlotStatus::EnteredInError,
            _ => return None,
        })
    }

    /// The R4 code.
    pub fn as_str(self) -> &'static str {
        match self {
            SlotStatus::Busy => "busy",
            SlotStatus::Free => "free",
            SlotStatus::BusyUnavailable => "busy-unavailable",
            SlotStatus::BusyTentative => "busy-tentative",
            SlotStatus::EnteredInError => "entered-in-error",
        }
    }

    /// Whether an appointment may claim a slot in this status (only `free` ones; claiming makes it `busy`).
    pub fn is_claimable(self) -> bool {
        self == SlotStatus::Free
    }
}

impl fmt::Display for SlotStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for s in AppointmentStatus::ALL {
            assert_eq!(AppointmentStatus::parse(s.as_str()), Some(s));
            assert_eq!(s.to_string(), s.as_str());
        }
        for s in SlotStatus::ALL {
            assert_eq!(SlotStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(AppointmentStatus::parse("no-show"), None);
        assert_eq!(AppointmentStatus::parse("Booked"), None);
        assert_eq!(AppointmentStatus::parse("checked_in"), None);
        assert_eq!(SlotStatus::parse("busy_tentative"), None);
    }

    /// The full 10 x 10 table, written out so a policy change is a visible diff.
    #[test]
    fn transition_table() {
        // Rows: from; columns in ALL order: proposed pending booked arrived fulfilled cancelled noshow eie checked-in waitlist
        let table: [(AppointmentStatus, [u8; 10]); 10] = [
            (Proposed, [1, 1, 1, 0, 0, 1, 0, 1, 0, 0]),
            (Pending, [0, 1, 1, 0, 0, 1, 0, 1, 0, 0]),
            (Booked, [0, 0, 1, 1, 1, 1, 1, 1, 1, 0]),
            (Arrived, [0, 0, 0, 1, 1, 0, 0, 1, 1, 0]),
            (Fulfilled, [0, 0, 0, 0, 0, 0, 0, 1, 0, 0]),
            (Cancelled, [0, 0, 0, 0, 0, 0, 0, 1, 0, 0]),
            (Noshow, [0, 0, 0, 0, 0, 0, 0, 1, 0, 0]),
            (EnteredInError, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            (CheckedIn, [0, 0, 0, 0, 1, 0, 0, 1, 1, 0]),
            (Waitlist, [0, 1, 1, 0, 0, 1, 0, 1, 0, 1]),
        ];
        for (from, row) in table {
            for (to, allowed) in AppointmentStatus::ALL.into_iter().zip(row) {
                assert_eq!(from.can_transition_to(to), allowed == 1, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn holding_and_terminal_sets() {
        let holds: Vec<_> = AppointmentStatus::ALL
            .into_iter()
            .filter(|s| s.holds_slots())
            .collect();
        assert_eq!(holds, [Booked, Arrived, Fulfilled, Noshow, CheckedIn]);
        let terminal: Vec<_> = AppointmentStatus::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(terminal, [Fulfilled, Cancelled, Noshow, EnteredInError]);
        let initial: Vec<_> = AppointmentStatus::ALL
            .into_iter()
            .filter(|s| s.is_initial())
            .collect();
        assert_eq!(initial, [Proposed, Pending, Booked, Waitlist]);
        // A terminal status never leads anywhere but entered-in-error.
        for s in terminal {
            assert!(s.allowed_targets().iter().all(|t| *t == EnteredInError));
        }
    }
}
