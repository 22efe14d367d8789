//! The storage contract, run against the real S3 server from minio-test/ and a local directory.
//! There is no skip: if the S3 server cannot start, this test fails.

mod common;

use std::time::{Duration, Instant};

use walship::storage::fs::FsStore;
use walship::storage::{conformance, ObjectKey, StorageError, Store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_and_directory_backends_keep_the_contract() {
    let server = common::S3Server::start();
    let s3 = server.store("conformance").await;
    conformance::run(&s3).await;

    let info = s3.probe().await.unwrap();
    assert_eq!(
        info.versioning,
        Some(Ok(true)),
        "minio-test creates the bucket with versioning on"
    );

    // An object deleted from the versioned bucket is a delete marker over its old version: `get`
    // says so, never "not found", which wal-fetch would report as the end of the archive.
    // SeaweedFS tells by its listing of versions (AWS on the GET itself: see storage::s3's tests).
    let gone = ObjectKey::new("wal/0000000100000000000000AA").unwrap();
    s3.put_if_absent(&gone, vec![1u8; 100].into())
        .await
        .unwrap();
    s3.delete(&gone).await.unwrap();
    let err = s3.get(&gone).await.unwrap_err();
    assert!(matches!(err, StorageError::Deleted(_)), "{err:?}");
    let never = ObjectKey::new("wal/0000000100000000000000AB").unwrap();
    let err = s3.get(&never).await.unwrap_err();
    assert!(matches!(err, StorageError::NotFound(_)), "{err:?}");

    let dir = tempfile::tempdir().unwrap();
    conformance::run(&FsStore::new(dir.path())).await;

    // A missing bucket and bad credentials are told apart from a missing object.
    let key = ObjectKey::new("wal/x").unwrap();
    // One attempt per request, with the server's keys unless told otherwise.
    let connect = |bucket: &str, secret: Option<&str>, timeout: u64| {
        let mut settings = server.settings("");
        settings.bucket = bucket.into();
        if let Some(secret) = secret {
            settings.static_credentials.as_mut().unwrap().1 = secret.into();
        }
        settings.max_attempts = 1;
        settings.operation_timeout = Duration::from_secs(timeout);
        async move { walship::storage::s3::S3Store::connect(&settings).await }
    };
    let missing = connect("no-such-bucket", None, 10).await.unwrap();
    assert!(
        matches!(missing.get(&key).await, Err(StorageError::NoBucket(_))),
        "missing bucket on get"
    );
    assert!(
        matches!(missing.probe().await, Err(StorageError::NoBucket(_))),
        "missing bucket on probe"
    );

    let denied = connect(server.bucket(), Some("wrong-secret"), 10)
        .await
        .unwrap();
    assert!(
        matches!(denied.get(&key).await, Err(StorageError::Denied(_))),
        "wrong secret on get"
    );

    // A server that takes a put and never answers (stopped with SIGSTOP): the put ends after
    // the configured time per attempt, which a small body does not raise.
    let hasty = connect(server.bucket(), None, 1).await.unwrap();
    let stalled_put = async |len: usize| {
        server.pause();
        let started = Instant::now();
        let put = tokio::time::timeout(
            Duration::from_secs(60),
            hasty.put_if_absent(&ObjectKey::new("hang").unwrap(), vec![7u8; len].into()),
        )
        .await;
        server.resume();
        let err = put.expect("the put ends").unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        started.elapsed()
    };
    let took = stalled_put(1000).await;
    assert!(took < Duration::from_secs(10), "{took:?}");
    // A 3 MiB body gets 12 s (4 s per MiB), not the configured 1 s.
    let took = stalled_put(3 << 20).await;
    assert!(
        took >= Duration::from_secs(11) && took < Duration::from_secs(30),
        "{took:?}"
    );

    // The server gone: transient, not "not found".
    server.kill();
    let err = s3.get(&key).await.unwrap_err();
    assert!(
        err.is_transient(),
        "server down must be transient, got {err:?}"
    );
}
