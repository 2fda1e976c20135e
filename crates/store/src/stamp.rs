//! The JSON text a backend stores for a new version.

use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use serde_json::{Map, Value};

use crate::{ResourceType, Result, StoreError};

/// `resource` as stored: `resourceType` (set if absent), `id` and `meta` first, with `meta.versionId` and
/// `meta.lastUpdated` set (in place when present, else appended to `meta`); every other member follows in its
/// order. Written straight to text: no intermediate map, so no key is hashed again.
pub fn stamp(
    rtype: ResourceType,
    id: &str,
    version: u64,
    last_updated: &str,
    resource: &Value,
) -> Result<String> {
    // Straight into one buffer: the head, then the members (no `Body` in between, nothing copied twice).
    let (obj, meta) = checked(rtype, id, resource)?;
    let mut out = head(rtype, id, version, last_updated, meta, 1024)?;
    push_members(&mut out, obj).map_err(fail(rtype, id))?;
    out.push(b'}');
    finish(rtype, id, out)
}

/// The part of a resource's stored text that does not depend on its version: its `meta` and, already
/// serialised, every member other than `resourceType`, `id` and `meta`. Built off the writer (see
/// [`crate::Put::body`]) so that the single writer only joins the pieces.
#[derive(Debug, Clone, PartialEq)]
pub struct Body {
    rtype: ResourceType,
    meta: Option<Map<String, Value>>,
    /// `,"key":value` for each member, in order.
    rest: Vec<u8>,
}

impl Body {
    /// The body of `resource`, to be stored as `rtype/id`. Refuses what [`stamp`] refuses: something other than
    /// an object, another `resourceType`, a `meta` that is not an object.
    pub fn new(rtype: ResourceType, id: &str, resource: &Value) -> Result<Body> {
        let (obj, meta) = checked(rtype, id, resource)?;
        let mut rest = Vec::with_capacity(1024);
        push_members(&mut rest, obj).map_err(fail(rtype, id))?;
        Ok(Body {
            rtype,
            meta: meta.cloned(),
            rest,
        })
    }

    /// The type the body was built for.
    pub fn rtype(&self) -> ResourceType {
        self.rtype
    }

    /// The stored text of version `version` of `{type}/{id}`, last updated at `last_updated`.
    pub fn stamp(&self, id: &str, version: u64, last_updated: &str) -> Result<String> {
        let mut out = head(
            self.rtype,
            id,
            version,
            last_updated,
            self.meta.as_ref(),
            self.rest.len(),
        )?;
        out.extend_from_slice(&self.rest);
        out.push(b'}');
        finish(self.rtype, id, out)
    }
}

type Object = Map<String, Value>;

/// The object of `resource` and its `meta`, or why it cannot be stored as `rtype/id`.
fn checked<'a>(
    rtype: ResourceType,
    id: &str,
    resource: &'a Value,
) -> Result<(&'a Object, Option<&'a Object>)> {
    let Value::Object(obj) = resource else {
        return Err(StoreError::Invalid(format!(
            "{rtype}/{id}: a resource must be a JSON object"
        )));
    };
    match obj.get("resourceType") {
        None => {}
        Some(Value::String(s)) if s == rtype.as_str() => {}
        Some(other) => {
            return Err(StoreError::Invalid(format!(
                "{rtype}/{id}: resourceType is {other}, expected \"{rtype}\""
            )));
        }
    }
    let meta = match obj.get("meta") {
        None => None,
        Some(Value::Object(m)) => Some(m),
        Some(_) => {
            return Err(StoreError::Invalid(format!(
                "{rtype}/{id}: meta must be a JSON object"
            )));
        }
    };
    Ok((obj, meta))
}

fn fail(rtype: ResourceType, id: &str) -> impl Fn(serde_json::Error) -> StoreError + '_ {
    move |e| StoreError::Invalid(format!("{rtype}/{id}: {e}"))
}

/// `{"resourceType":…,"id":…,"meta":{…}` with the version members set in `meta`; room for `more` bytes.
fn head(
    rtype: ResourceType,
    id: &str,
    version: u64,
    last_updated: &str,
    meta: Option<&Map<String, Value>>,
    more: usize,
) -> Result<Vec<u8>> {
    let version = version.to_string();
    let mut out = Vec::with_capacity(more + 160);
    out.extend_from_slice(b"{\"resourceType\":\"");
    out.extend_from_slice(rtype.as_str().as_bytes());
    out.extend_from_slice(b"\",\"id\":");
    serde_json::to_writer(&mut out, id).map_err(fail(rtype, id))?;
    out.extend_from_slice(b",\"meta\":");
    serde_json::to_writer(
        &mut out,
        &Meta {
            meta,
            version: &version,
            last_updated,
        },
    )
    .map_err(fail(rtype, id))?;
    Ok(out)
}

/// `,"key":value` for every member but `resourceType`, `id` and `meta`, in order.
fn push_members(out: &mut Vec<u8>, obj: &Map<String, Value>) -> serde_json::Result<()> {
    for (k, v) in obj {
        if !matches!(k.as_str(), "resourceType" | "id" | "meta") {
            out.push(b',');
            serde_json::to_writer(&mut *out, k)?;
            out.push(b':');
            serde_json::to_writer(&mut *out, v)?;
        }
    }
    Ok(())
}

fn finish(rtype: ResourceType, id: &str, out: Vec<u8>) -> Result<String> {
    String::from_utf8(out).map_err(|e| StoreError::Invalid(format!("{rtype}/{id}: {e}")))
}

/// `meta` with the version members set.
struct Meta<'a> {
    meta: Option<&'a serde_json::Map<String, Value>>,
    version: &'a str,
    last_updated: &'a str,
}

impl Serialize for Meta<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        let (mut version, mut updated) = (false, false);
        for (k, v) in self.meta.into_iter().flatten() {
            match k.as_str() {
                "versionId" => {
                    version = true;
                    map.serialize_entry(k, self.version)?;
                }
                "lastUpdated" => {
                    updated = true;
                    map.serialize_entry(k, self.last_updated)?;
                }
                _ => map.serialize_entry(k, v)?,
            }
        }
        if !version {
            map.serialize_entry("versionId", self.version)?;
        }
        if !updated {
            map.serialize_entry("lastUpdated", self.last_updated)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use serde_json::json;

    #[test]
    fn ids_and_versions_go_first_and_the_rest_keeps_its_order() {
        let r = json!({"name": [{"family": "Ng"}], "id": "old", "resourceType": "Patient",
            "meta": {"profile": ["p"], "lastUpdated": "x"}, "active": true});
        let text = stamp(
            ResourceType::Patient,
            "p1",
            3,
            "2026-01-02T03:04:05.678Z",
            &r,
        )
        .unwrap();
        assert_eq!(
            text,
            r#"{"resourceType":"Patient","id":"p1","meta":{"profile":["p"],"lastUpdated":"2026-01-02T03:04:05.678Z","versionId":"3"},"name":[{"family":"Ng"}],"active":true}"#
        );
        let bare = stamp(ResourceType::Slot, "s", 1, "t", &json!({})).unwrap();
        assert_eq!(
            bare,
            r#"{"resourceType":"Slot","id":"s","meta":{"versionId":"1","lastUpdated":"t"}}"#
        );
    }

    #[test]
    fn a_body_built_ahead_stamps_the_same_text() {
        let r = json!({"name": [{"family": "Ng"}], "id": "old", "resourceType": "Patient",
            "meta": {"profile": ["p"], "versionId": "9"}, "active": true, "_birthDate": {"extension": []}});
        for (id, version) in [("p1", 1), ("p\"2", 12)] {
            let body = Body::new(ResourceType::Patient, id, &r).unwrap();
            assert_eq!(
                body.stamp(id, version, "2026-01-02T03:04:05.678Z").unwrap(),
                stamp(
                    ResourceType::Patient,
                    id,
                    version,
                    "2026-01-02T03:04:05.678Z",
                    &r
                )
                .unwrap()
            );
        }
        assert!(Body::new(ResourceType::Slot, "s", &r).is_err());
    }

    #[test]
    fn a_wrong_type_or_shape_is_refused() {
        let wrong = json!({"resourceType": "Slot"});
        assert!(stamp(ResourceType::Patient, "p", 1, "t", &wrong).is_err());
        assert!(stamp(ResourceType::Patient, "p", 1, "t", &json!([])).is_err());
        assert!(stamp(ResourceType::Patient, "p", 1, "t", &json!({"meta": 1})).is_err());
    }
}
