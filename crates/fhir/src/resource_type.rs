use std::fmt;

/// The resource types the hub serves over `/fhir`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    Patient,
    Practitioner,
    PractitionerRole,
    Organization,
    Location,
    HealthcareService,
    Schedule,
    Slot,
    Appointment,
    /// Not a UK Core type: how consumers register for event delivery.
    Subscription,
}

impl ResourceType {
    pub const ALL: [ResourceType; 10] = [
        ResourceType::Patient,
        ResourceType::Practitioner,
        ResourceType::PractitionerRole,
        ResourceType::Organization,
        ResourceType::Location,
        ResourceType::HealthcareService,
        ResourceType::Schedule,
        ResourceType::Slot,
        ResourceType::Appointment,
        ResourceType::Subscription,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ResourceType::Patient => "Patient",
            ResourceType::Practitioner => "Practitioner",
            ResourceType::PractitionerRole => "PractitionerRole",
            ResourceType::Organization => "Organization",
            ResourceType::Location => "Location",
            ResourceType::HealthcareService => "HealthcareService",
            ResourceType::Schedule => "Schedule",
            ResourceType::Slot => "Slot",
            ResourceType::Appointment => "Appointment",
            ResourceType::Subscription => "Subscription",
        }
    }

    /// Exact, case-sensitive match of a FHIR type name.
    pub fn parse(s: &str) -> Option<ResourceType> {
        ResourceType::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// The UK Core profile this type is aligned with.
    pub fn uk_core_profile(self) -> String {
        match self {
            // UK Core does not profile Subscription: the base R4 profile.
            ResourceType::Subscription => {
                "http://hl7.org/fhir/StructureDefinition/Subscription".to_string()
            }
            _ => format!(
                "https://fhir.hl7.org.uk/StructureDefinition/UKCore-{}",
                self.as_str()
            ),
        }
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
