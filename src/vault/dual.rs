//! Dual control (issue 16, PCI DSS 3.6.1.2 / 3.7.6): a dangerous admin operation is first
//! recorded as a request, and runs only when a second, different admin principal approves it
//! within a time window. Requests are persisted (`admin_requests`), so a restart loses none
//! and every process sees them; request and approval are both in the audit trail.

use std::time::Duration;

use super::{Caller, Vault};
use crate::audit::AuditEntry;
use crate::error::Result;
use crate::store::AdminRequestRow;

impl Vault {
    /// Records a request for `operation` with `params` (JSON, never a secret), approvable
    /// for `window`.
    pub async fn request_admin_op(
        &self,
        caller: &Caller,
        operation: &str,
        params: &serde_json::Value,
        window: Duration,
    ) -> Result<AdminRequestRow> {
        let now = self.now();
        let window = i64::try_from(window.as_micros()).unwrap_or(i64::MAX);
        let row = AdminRequestRow {
            id: format!("req_{:024x}", rand::random::<u128>() >> 32),
            operation: operation.to_owned(),
            params: params.to_string(),
            requester: caller.principal.clone(),
            created_at: now,
            expires_at: now.saturating_add(window),
            approver: None,
            approved_at: None,
        };
        self.inner
            .store
            .add_admin_request(row.clone(), caller.clone())
            .await?;
        Ok(row)
    }

    /// One audit record of a remote admin call: who, what on which subject, and how it ended.
    pub async fn audit_admin_call(
        &self,
        caller: &Caller,
        action: &str,
        subject: &str,
        outcome: &str,
        detail: &str,
    ) -> Result<()> {
        self.inner
            .store
            .append_audit(vec![AuditEntry::new(
                caller, action, subject, outcome, detail,
            )])
            .await
    }

    /// Every dual-control request, newest first.
    pub async fn admin_requests(&self) -> Result<Vec<AdminRequestRow>> {
        self.inner.store.admin_requests().await
    }

    /// Approves request `id` as `approver`: refused for the requester itself, an unknown,
    /// expired or already approved request. The caller then runs the operation.
    pub async fn approve_admin_request(
        &self,
        approver: &Caller,
        id: &str,
    ) -> Result<AdminRequestRow> {
        self.inner
            .store
            .approve_admin_request(id.to_owned(), approver.clone(), self.now())
            .await
    }
}
