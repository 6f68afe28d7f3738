//! Identity from the request headers (spec §3, compat): bearer token → customer, and the
//! X-Tenant-ID rules.

use http::HeaderMap;

use crate::service::{Caller, Error};

/// The tenant refused to every customer but the admin.
const RESTRICTED_TENANT: &str = "restricted-tenant";
const ADMIN_CUSTOMER: &str = "admin-user";

/// Establishes the caller, or says why not.
pub fn caller(headers: &HeaderMap) -> Result<Caller, Error> {
    let auth = headers
        .get(http::header::AUTHORIZATION)
        .ok_or_else(|| Error::Unauthenticated("missing Authorization header".into()))?
        .to_str()
        .map_err(|_| Error::Unauthenticated("Authorization header is not text".into()))?
        .trim();
    let token = match auth.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
        _ => {
            return Err(Error::Unauthenticated(
                "Authorization must be \"Bearer <token>\"".into(),
            ))
        }
    };
    let customer = token
        .strip_prefix("dev_user_")
        .or_else(|| token.strip_prefix("dev_customer_"))
        .ok_or_else(|| Error::Unauthenticated("invalid token".into()))?;
    if customer.is_empty() {
        return Err(Error::Unauthenticated(
            "invalid token: no customer id".into(),
        ));
    }
    let tenant = headers
        .get("x-tenant-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .unwrap_or_default();
    if tenant.is_empty() {
        return Err(Error::Unauthenticated("missing X-Tenant-ID header".into()));
    }
    if tenant == RESTRICTED_TENANT && customer != ADMIN_CUSTOMER {
        return Err(Error::PermissionDenied(format!(
            "tenant {RESTRICTED_TENANT} is restricted"
        )));
    }
    Ok(Caller {
        customer_id: customer.to_owned(),
        tenant_id: tenant.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: Option<&str>, tenant: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert("authorization", a.parse().unwrap());
        }
        if let Some(t) = tenant {
            h.insert("x-tenant-id", t.parse().unwrap());
        }
        h
    }

    #[test]
    fn tokens_map_to_customers() {
        let c = caller(&headers(Some("Bearer dev_user_ctrl"), Some("ctrl-tenant"))).unwrap();
        assert_eq!(
            c,
            Caller {
                customer_id: "ctrl".into(),
                tenant_id: "ctrl-tenant".into()
            }
        );
        let c = caller(&headers(Some("bearer dev_customer_acme"), Some("t"))).unwrap();
        assert_eq!(c.customer_id, "acme");
    }

    #[test]
    fn refusals() {
        let unauth = |h| matches!(caller(&h), Err(Error::Unauthenticated(_)));
        assert!(unauth(headers(None, Some("t"))));
        assert!(unauth(headers(Some("Bearer dev_user_"), Some("t"))));
        assert!(unauth(headers(Some("Bearer something"), Some("t"))));
        assert!(unauth(headers(Some("Basic dev_user_x"), Some("t"))));
        assert!(unauth(headers(Some("Bearer dev_user_x"), None)));
        assert!(unauth(headers(Some("Bearer dev_user_x"), Some(""))));
        assert!(matches!(
            caller(&headers(
                Some("Bearer dev_user_x"),
                Some("restricted-tenant")
            )),
            Err(Error::PermissionDenied(_))
        ));
        assert!(caller(&headers(
            Some("Bearer dev_user_admin-user"),
            Some("restricted-tenant")
        ))
        .is_ok());
    }
}
