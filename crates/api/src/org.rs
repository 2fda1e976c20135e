//! Organisation separation over the store: a client without the `cross-org` scope sees and changes only the
//! Schedules, Slots and Appointments of its organisation and the Patients linked to them (rules in
//! `auth::org`, which reads ownership from one resource; this module follows the references).
//!
//! - Reads of another organisation's resource (read, vread, history, update, delete, operations) answer 404, as
//!   for a resource that does not exist, so existence does not leak.
//! - Searches and type histories are filtered before paging and counting (`total`, `_summary=count` count only
//!   what the client may see); a search that would need more than [`MAX_SCAN`] matches scanned is refused with
//!   400. `_include`d resources are filtered too.
//! - A write whose result would not belong to the client's organisation is refused with 403.
//!
//! No filter at all when authentication is off, for `cross-org` clients and for adapters (MESH, HL7): they pay
//! nothing. Ownership found during one request is cached for that request ([`OrgFilter`]), so the Slots of one
//! Schedule cost one Schedule read. The same async code runs on the read path (over `Store`) and inside write
//! transactions (over `Tx`, whose lookups complete at once: see [`now`]).

use crate::ApiError;
use crate::auth::Caller;
use ::auth::org::{self as rules, Kind, OrgRef};
use axum::Extension;
use axum::http::StatusCode;
use fhir::{IssueType, ResourceType};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use store::{HistoryQuery, Predicate, SearchQuery, Store, StoreError, Stored, Tx};

/// Most matches a filtered search (or type history) scans; beyond it the client is asked to narrow it.
pub(crate) const MAX_SCAN: usize = 10_000;

/// Most appointments of one patient looked at to find one of the client's organisation.
const MAX_PATIENT_APPOINTMENTS: usize = 1_000;

/// Where the store is read from: the read path or a write transaction.
pub(crate) trait Lookup {
    fn read(
        &mut self,
        rtype: ResourceType,
        id: &str,
    ) -> impl Future<Output = store::Result<Option<Stored>>> + Send;
    fn search(
        &mut self,
        q: &SearchQuery,
    ) -> impl Future<Output = store::Result<Vec<Stored>>> + Send;
}

/// Lookups on the read path.
pub(crate) struct StoreLookup<'a, S: Store>(pub &'a S);

impl<S: Store> Lookup for StoreLookup<'_, S> {
    fn read(
        &mut self,
        rtype: ResourceType,
        id: &str,
    ) -> impl Future<Output = store::Result<Option<Stored>>> + Send {
        self.0.read(rtype, id)
    }

    fn search(
        &mut self,
        q: &SearchQuery,
    ) -> impl Future<Output = store::Result<Vec<Stored>>> + Send {
        let fut = self.0.search(q);
        async move { Ok(fut.await?.resources) }
    }
}

/// Lookups inside a write transaction: each completes at once.
pub(crate) struct TxLookup<'a>(pub &'a mut dyn Tx);

impl Lookup for TxLookup<'_> {
    fn read(
        &mut self,
        rtype: ResourceType,
        id: &str,
    ) -> impl Future<Output = store::Result<Option<Stored>>> + Send {
        std::future::ready(self.0.read(rtype, id))
    }

    fn search(
        &mut self,
        q: &SearchQuery,
    ) -> impl Future<Output = store::Result<Vec<Stored>>> + Send {
        std::future::ready(self.0.search(q))
    }
}

/// Run a future whose lookups are all [`TxLookup`]s (they never wait) to completion on this thread.
pub(crate) fn now<F: Future>(fut: F) -> store::Result<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Ok(v),
        std::task::Poll::Pending => Err(StoreError::Backend(
            "an ownership lookup inside a transaction did not complete".into(),
        )),
    }
}

/// The filter of a request: `None` when the caller sees everything (no authentication, `cross-org`).
pub(crate) fn filter_of(caller: &Option<Extension<Caller>>) -> Option<OrgFilter> {
    match caller {
        Some(Extension(c)) if !c.cross_org => Some(OrgFilter::new(c.org.clone())),
        _ => None,
    }
}

/// The answer for another organisation's resource: exactly the answer for one that does not exist.
pub(crate) fn not_known(rtype: ResourceType, id: &str) -> ApiError {
    ApiError::not_found(format!("{rtype}/{id} is not known"))
}

/// A refused write (403).
pub(crate) fn forbidden(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, IssueType::Forbidden, message)
}

/// A filtered search that would scan too much (400).
pub(crate) fn too_costly(rtype: ResourceType) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        IssueType::TooCostly,
        format!(
            "this {rtype} search matches more than {MAX_SCAN} resources across organisations; narrow it \
             (for example by date, status, schedule or patient)"
        ),
    )
}

/// One request's view of organisation ownership, with what it has found so far.
#[derive(Debug, Clone)]
pub(crate) struct OrgFilter {
    org: Arc<str>,
    /// `Type/id` -> belongs to the organisation (for a Patient: visible to it).
    owned: HashMap<String, bool>,
    /// Organization id -> one of its ODS codes is the organisation's.
    orgs: HashMap<String, bool>,
}

impl OrgFilter {
    pub(crate) fn new(org: Arc<str>) -> OrgFilter {
        OrgFilter {
            org,
            owned: HashMap::new(),
            orgs: HashMap::new(),
        }
    }

    async fn is_mine<L: Lookup>(&mut self, l: &mut L, refs: &[OrgRef]) -> store::Result<bool> {
        for r in refs {
            match r {
                OrgRef::Ods(code) => {
                    if rules::same_org(code, &self.org) {
                        return Ok(true);
                    }
                }
                OrgRef::Organization(id) => {
                    let mine = match self.orgs.get(id) {
                        Some(m) => *m,
                        None => {
                            let m = match l.read(ResourceType::Organization, id).await? {
                                Some(s) if !s.deleted => parse(&s)
                                    .map(|v| {
                                        rules::ods_codes(&v)
                                            .iter()
                                            .any(|c| rules::same_org(c, &self.org))
                                    })
                                    .unwrap_or(false),
                                _ => false,
                            };
                            self.orgs.insert(id.clone(), m);
                            m
                        }
                    };
                    if mine {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }

    async fn schedule_id<L: Lookup>(&mut self, l: &mut L, id: &str) -> store::Result<bool> {
        let key = format!("Schedule/{id}");
        if let Some(m) = self.owned.get(&key) {
            return Ok(*m);
        }
        let m = match l.read(ResourceType::Schedule, id).await? {
            Some(s) if !s.deleted => match parse(&s) {
                Some(v) => self.is_mine(l, &rules::schedule_organizations(&v)).await?,
                None => false,
            },
            _ => false,
        };
        self.owned.insert(key, m);
        Ok(m)
    }

    async fn slot_id<L: Lookup>(&mut self, l: &mut L, id: &str) -> store::Result<bool> {
        let key = format!("Slot/{id}");
        if let Some(m) = self.owned.get(&key) {
            return Ok(*m);
        }
        let m = match l.read(ResourceType::Slot, id).await? {
            Some(s) if !s.deleted => match parse(&s).as_ref().and_then(rules::slot_schedule) {
                Some(schedule) => self.schedule_id(l, &schedule).await?,
                None => false,
            },
            _ => false,
        };
        self.owned.insert(key, m);
        Ok(m)
    }

    async fn appointment<L: Lookup>(&mut self, l: &mut L, v: &Value) -> store::Result<bool> {
        if self.is_mine(l, &rules::booking_organizations(v)).await? {
            return Ok(true);
        }
        for slot in rules::appointment_slots(v) {
            if self.slot_id(l, &slot).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn patient<L: Lookup>(&mut self, l: &mut L, id: &str, v: &Value) -> store::Result<bool> {
        if self.is_mine(l, &rules::managing_organization(v)).await? {
            return Ok(true);
        }
        let mut q = SearchQuery::new(ResourceType::Appointment)
            .with("patient", Predicate::Reference(format!("Patient/{id}")));
        q.count = MAX_PATIENT_APPOINTMENTS;
        for a in l.search(&q).await? {
            let key = format!("Appointment/{}", a.id);
            let mine = match self.owned.get(&key) {
                Some(m) => *m,
                None => {
                    let m = match parse(&a) {
                        Some(v) => self.appointment(l, &v).await?,
                        None => false,
                    };
                    self.owned.insert(key, m);
                    m
                }
            };
            if mine {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Does this version of `rtype/id` belong to the organisation (a Patient: is it visible to it)?
    pub(crate) async fn owns<L: Lookup>(
        &mut self,
        l: &mut L,
        rtype: ResourceType,
        id: &str,
        v: &Value,
    ) -> store::Result<bool> {
        match rules::kind(rtype.as_str()) {
            Kind::Shared => Ok(true),
            Kind::CrossOrgOnly => Ok(false),
            Kind::Schedule => self.is_mine(l, &rules::schedule_organizations(v)).await,
            Kind::Slot => match rules::slot_schedule(v) {
                Some(s) => self.schedule_id(l, &s).await,
                None => Ok(false),
            },
            Kind::Appointment => self.appointment(l, v).await,
            Kind::Patient => self.patient(l, id, v).await,
        }
    }

    /// [`OrgFilter::owns`] for a live stored version (a search match, an included resource), cached by
    /// `Type/id`.
    pub(crate) async fn owns_stored<L: Lookup>(
        &mut self,
        l: &mut L,
        s: &Stored,
    ) -> store::Result<bool> {
        let kind = rules::kind(s.rtype.as_str());
        if kind == Kind::Shared {
            return Ok(true);
        }
        let key = format!("{}/{}", s.rtype, s.id);
        if let Some(m) = self.owned.get(&key) {
            return Ok(*m);
        }
        let m = match parse(s) {
            Some(v) if !s.deleted => self.owns(l, s.rtype, &s.id, &v).await?,
            _ => false,
        };
        self.owned.insert(key, m);
        Ok(m)
    }

    /// May the caller see the resource whose current version is `current`? A deletion is judged by the last
    /// version before it.
    pub(crate) async fn visible<S: Store>(
        &mut self,
        store: &S,
        current: &Stored,
    ) -> store::Result<bool> {
        if rules::kind(current.rtype.as_str()) == Kind::Shared {
            return Ok(true);
        }
        if !current.deleted {
            return self.owns_stored(&mut StoreLookup(store), current).await;
        }
        let q = HistoryQuery {
            rtype: current.rtype,
            id: Some(current.id.clone()),
            since_ms: None,
            count: 20,
            offset: 0,
        };
        let live = store
            .history(&q)
            .await?
            .resources
            .into_iter()
            .find(|s| !s.deleted);
        match live {
            Some(s) => {
                let key = format!("{}/{}", s.rtype, s.id);
                let m = match parse(&s) {
                    Some(v) => {
                        self.owns(&mut StoreLookup(store), s.rtype, &s.id, &v)
                            .await?
                    }
                    None => false,
                };
                self.owned.insert(key, m);
                Ok(m)
            }
            None => Ok(false),
        }
    }

    /// 404 when `rtype/id` exists but belongs to another organisation (nothing when it does not exist: the
    /// handler answers that as usual).
    pub(crate) async fn check_instance<S: Store>(
        &mut self,
        store: &S,
        rtype: ResourceType,
        id: &str,
    ) -> Result<(), ApiError> {
        if rules::kind(rtype.as_str()) == Kind::Shared {
            return Ok(());
        }
        let Some(current) = store.read(rtype, id).await? else {
            return Ok(());
        };
        if self.visible(store, &current).await? {
            Ok(())
        } else {
            Err(not_known(rtype, id))
        }
    }

    /// Inside a write: 404 when the live current version of `rtype/id` belongs to another organisation.
    pub(crate) fn tx_check_current(
        &mut self,
        tx: &mut dyn Tx,
        rtype: ResourceType,
        id: &str,
    ) -> store::Result<Result<(), ApiError>> {
        if rules::kind(rtype.as_str()) == Kind::Shared {
            return Ok(Ok(()));
        }
        let Some(current) = tx.read(rtype, id)? else {
            return Ok(Ok(()));
        };
        if current.deleted {
            // Judged before the write from its history (`check_instance`).
            return Ok(Ok(()));
        }
        let mine = now(self.owns_stored(&mut TxLookup(tx), &current))??;
        Ok(if mine {
            Ok(())
        } else {
            Err(not_known(rtype, id))
        })
    }

    /// Inside a write: keep only the matches the caller may see (conditional create and update, searches of
    /// a transaction).
    pub(crate) fn tx_visible(
        &mut self,
        tx: &mut dyn Tx,
        found: Vec<Stored>,
    ) -> store::Result<Vec<Stored>> {
        let mut out = Vec::with_capacity(found.len());
        for s in found {
            if now(self.owns_stored(&mut TxLookup(tx), &s))?? {
                out.push(s);
            }
        }
        Ok(out)
    }

    /// Inside a write: may the caller store `v` as `rtype/id`? 403 with the reason when the result would not
    /// be its organisation's (a Schedule, Slot or Appointment of another organisation or of none, an
    /// Appointment on another organisation's slot or for a patient it cannot see, a Patient managed by another
    /// organisation).
    pub(crate) fn tx_check_write(
        &mut self,
        tx: &mut dyn Tx,
        rtype: ResourceType,
        id: &str,
        v: &Value,
    ) -> store::Result<Result<(), ApiError>> {
        now(self.check_write(&mut TxLookup(tx), rtype, id, v))?
    }

    async fn check_write<L: Lookup>(
        &mut self,
        l: &mut L,
        rtype: ResourceType,
        id: &str,
        v: &Value,
    ) -> store::Result<Result<(), ApiError>> {
        let org = self.org.clone();
        let refuse = |m: String| Ok(Err(forbidden(m)));
        match rules::kind(rtype.as_str()) {
            Kind::Shared => Ok(Ok(())),
            Kind::CrossOrgOnly => refuse(format!("only cross-org clients may write {rtype}")),
            Kind::Schedule => {
                if self.is_mine(l, &rules::schedule_organizations(v)).await? {
                    Ok(Ok(()))
                } else {
                    refuse(format!(
                        "this client may write only Schedules of its organisation {org}: name it in Schedule.actor \
                         (an Organization with ODS code {org}) or in the BookingOrganization extension"
                    ))
                }
            }
            Kind::Slot => {
                let ok = match rules::slot_schedule(v) {
                    Some(s) => self.schedule_id(l, &s).await?,
                    None => false,
                };
                if ok {
                    Ok(Ok(()))
                } else {
                    refuse(format!(
                        "Slot.schedule must be a Schedule of this client's organisation {org}"
                    ))
                }
            }
            Kind::Appointment => {
                for slot in rules::appointment_slots(v) {
                    if !self.slot_id(l, &slot).await? {
                        return refuse(format!(
                            "Slot/{slot} is not a slot of this client's organisation {org}"
                        ));
                    }
                }
                if !self.appointment(l, v).await? {
                    return refuse(format!(
                        "this client may write only Appointments of its organisation {org}: book one of its \
                         slots or name it in the BookingOrganization extension"
                    ));
                }
                for patient in rules::appointment_patients(v) {
                    let visible = match l.read(ResourceType::Patient, &patient).await? {
                        Some(s) if !s.deleted => match parse(&s) {
                            Some(pv) => self.patient(l, &patient, &pv).await?,
                            None => false,
                        },
                        _ => false,
                    };
                    if !visible {
                        return refuse(format!(
                            "Patient/{patient} is not a patient this client's organisation {org} can see \
                             (its managingOrganization, or an appointment of {org})"
                        ));
                    }
                }
                Ok(Ok(()))
            }
            Kind::Patient => {
                // No managing organisation, this one, or a patient this organisation's appointments name.
                let managing = rules::managing_organization(v);
                if managing.is_empty() || self.patient(l, id, v).await? {
                    Ok(Ok(()))
                } else {
                    refuse(format!(
                        "Patient.managingOrganization names another organisation than this client's ({org})"
                    ))
                }
            }
        }
    }
}

fn parse(s: &Stored) -> Option<Value> {
    if s.deleted {
        return None;
    }
    fhir::parse_json(&s.json).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn ready_futures_complete_at_once_and_pending_ones_are_an_error() {
        assert_eq!(now(async { 7 }).unwrap(), 7);
        assert!(now(std::future::pending::<()>()).is_err());
    }
}
