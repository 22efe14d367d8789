//! A wrapper that retries transient failures (`StorageError::is_transient`) with exponential
//! back-off. Everything else (not found, denied, no bucket) is final and returned at once. An
//! optional deadline bounds the whole: no operation runs or is waited for past it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;

use super::{ObjectInfo, ObjectKey, PutOutcome, StorageError, Store, StoreInfo};

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Total tries, the first included.
    pub attempts: u32,
    pub first_delay: Duration,
    pub max_delay: Duration,
    pub deadline: Option<Deadline>,
}

/// When the caller stops waiting for storage, whatever the attempts left.
#[derive(Debug, Clone)]
pub struct Deadline {
    pub at: Instant,
    /// Why the caller has this limit and what follows, for the error: "within ...".
    pub why: Arc<str>,
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
            let outcome = match &self.policy.deadline {
                None => op().await,
                Some(d) => match tokio::time::timeout_at(d.at.into(), op()).await {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        return Err(StorageError::Transient(format!(
                            "no answer from {} within {}",
                            self.inner.describe(),
                            d.why
                        )))
                    }
                },
            };
            match outcome {
                Err(e) if e.is_transient() && attempt + 1 < self.policy.attempts => {
                    let delay = self.policy.delay(attempt);
                    if let Some(d) = &self.policy.deadline {
                        if Instant::now() + delay >= d.at {
                            return Err(match e {
                                StorageError::Transient(m) => StorageError::Transient(format!(
                                    "{m} (no time left to try again within {})",
                                    d.why
                                )),
                                e => e,
                            });
                        }
                    }
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
    async fn make_durable(&self, key: &ObjectKey) -> Result<(), StorageError> {
        self.run(|| self.inner.make_durable(key)).await
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
            deadline: None,
        }
    }

    fn within(attempts: u32, first_delay: Duration, limit: Duration) -> RetryPolicy {
        RetryPolicy {
            first_delay,
            max_delay: first_delay * 4,
            deadline: Some(Deadline {
                at: Instant::now() + limit,
                why: "the test's limit".into(),
            }),
            ..policy(attempts)
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

    #[tokio::test]
    async fn a_deadline_ends_an_operation_that_never_answers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Retrying::new(
            Faulty::hanging(dir.path(), ".stuck"),
            within(5, Duration::from_millis(1), Duration::from_millis(300)),
        );
        let started = Instant::now();
        let err = store
            .put_if_absent(&ObjectKey::new("a.stuck").unwrap(), Bytes::new())
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("within the test's limit"), "{text}");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert_eq!(store.inner.calls.load(Ordering::SeqCst), 1, "not retried");
    }

    #[tokio::test]
    async fn no_retry_starts_that_its_back_off_would_carry_past_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        // Back-off 200 ms, 400 ms, ...: the second retry would start after the 500 ms limit.
        let store = Retrying::new(
            Faulty::failing(dir.path(), 10, true),
            within(10, Duration::from_millis(200), Duration::from_millis(500)),
        );
        let started = Instant::now();
        let err = store.get(&ObjectKey::new("a").unwrap()).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("connection reset (no time left to try again within the test's limit)"),
            "{err}"
        );
        assert_eq!(store.inner.calls.load(Ordering::SeqCst), 2);
        assert!(started.elapsed() < Duration::from_millis(500));
    }
}
