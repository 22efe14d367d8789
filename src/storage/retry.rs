//! A wrapper that retries transient failures (`StorageError::is_transient`) with exponential
//! back-off. Everything else (not found, denied, no bucket) is final and returned at once.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{ObjectInfo, ObjectKey, PutOutcome, StorageError, Store, StoreInfo};

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Total tries, the first included.
    pub attempts: u32,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl RetryPolicy {
    pub fn delay(&self, attempt: u32) -> Duration {
        let d = self.first_delay.saturating_mul(1u32 << attempt.min(16));
        d.min(self.max_delay)
    }
}

pub struct Retrying<S> {
    inner: S,
    policy: RetryPolicy,
}

impl<S: Store> Retrying<S> {
    pub fn new(inner: S, policy: RetryPolicy) -> Self {
        Self { inner, policy }
    }

    async fn run<T, F, Fut>(&self, mut op: F) -> Result<T, StorageError>
    where
        F: FnMut() -> Fut + Send,
        Fut: std::future::Future<Output = Result<T, StorageError>> + Send,
        T: Send,
    {
        let mut attempt = 0;
        loop {
            match op().await {
                Err(e) if e.is_transient() && attempt + 1 < self.policy.attempts => {
                    let delay = self.policy.delay(attempt);
                    // info, not warn: a failure that lasts ends in one error line that says
                    // so; each attempt's line is there for WALSHIP_LOG=walship=info.
                    tracing::info!(
                        "{e}; retrying in {delay:?} (attempt {} of {})",
                        attempt + 2,
                        self.policy.attempts
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

#[async_trait]
impl<S: Store> Store for Retrying<S> {
    async fn put_if_absent(
        &self,
        key: &ObjectKey,
        body: Bytes,
    ) -> Result<PutOutcome, StorageError> {
        // A put that timed out may have landed; the retry then sees AlreadyExists, and the caller
        // (which compares checksums) tells "our own earlier attempt" from "someone else's object".
        self.run(|| self.inner.put_if_absent(key, body.clone()))
            .await
    }
    async fn get(&self, key: &ObjectKey) -> Result<Bytes, StorageError> {
        self.run(|| self.inner.get(key)).await
    }
    async fn get_prefix(&self, key: &ObjectKey, len: u64) -> Result<Bytes, StorageError> {
        self.run(|| self.inner.get_prefix(key, len)).await
    }
    async fn list_after(&self, prefix: &str, after: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        self.run(|| self.inner.list_after(prefix, after)).await
    }
    async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        self.run(|| self.inner.list_dirs(prefix)).await
    }
    async fn delete(&self, key: &ObjectKey) -> Result<(), StorageError> {
        self.run(|| self.inner.delete(key)).await
    }
    async fn probe(&self) -> Result<StoreInfo, StorageError> {
        self.run(|| self.inner.probe()).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::testing::Faulty;
    use std::sync::atomic::Ordering;

    fn policy(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts,
            first_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
        }
    }

    #[tokio::test]
    async fn transient_errors_are_retried_until_success() {
        let dir = tempfile::tempdir().unwrap();
        let flaky = Faulty::failing(dir.path(), 2, true);
        let store = Retrying::new(flaky, policy(3));
        let key = ObjectKey::new("a").unwrap();
        store
            .put_if_absent(&key, Bytes::from_static(b"x"))
            .await
            .unwrap();
        assert_eq!(store.inner.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn gives_up_after_the_budget_and_never_retries_final_errors() {
        let dir = tempfile::tempdir().unwrap();
        let flaky = Faulty::failing(dir.path(), 5, true);
        let store = Retrying::new(flaky, policy(3));
        let key = ObjectKey::new("a").unwrap();
        assert!(store.get(&key).await.unwrap_err().is_transient());
        assert_eq!(store.inner.calls.load(Ordering::SeqCst), 3);

        let flaky = Faulty::failing(dir.path(), 5, false);
        let store = Retrying::new(flaky, policy(3));
        assert!(matches!(
            store.get(&key).await,
            Err(StorageError::Denied(_))
        ));
        assert_eq!(store.inner.calls.load(Ordering::SeqCst), 1);
    }
}
