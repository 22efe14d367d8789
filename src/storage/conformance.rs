//! The storage contract as executable checks. Every backend runs this suite: the directory backend
//! in unit tests, S3 against a real server in `tests/storage_conformance.rs`.

use bytes::Bytes;

use super::{ObjectKey, PutOutcome, StorageError, Store};

fn key(prefix: &str, rest: &str) -> ObjectKey {
    ObjectKey::new(format!("{prefix}{rest}")).expect("valid key")
}

/// Run every check under a fresh prefix. Panics with a message on the first broken promise.
pub async fn run(store: &dyn Store) {
    let prefix = format!("conformance-{}-{}/", std::process::id(), nanos());
    let a = key(&prefix, "wal/0000000100000000/000000010000000000000001");
    let b = key(&prefix, "wal/0000000100000000/000000010000000000000002");
    let h = key(&prefix, "wal/history/00000002.history");

    store
        .probe()
        .await
        .expect("probe of a usable store succeeds");

    // Missing objects are NotFound, for whole and partial reads.
    assert!(
        matches!(store.get(&a).await, Err(StorageError::NotFound(_))),
        "get of a missing key"
    );
    assert!(
        matches!(
            store.get_prefix(&a, 48).await,
            Err(StorageError::NotFound(_))
        ),
        "ranged get of a missing key"
    );

    // Put, then read back whole and in part.
    let body = Bytes::from(
        (0..200_000u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let out = store
        .put_if_absent(&a, body.clone())
        .await
        .expect("first put");
    assert!(
        matches!(out, PutOutcome::Created { .. }),
        "first put creates: {out:?}"
    );
    assert_eq!(
        store.get(&a).await.expect("get"),
        body,
        "get returns what was put"
    );
    assert_eq!(
        store.get_prefix(&a, 48).await.expect("prefix"),
        body.slice(..48),
        "ranged get"
    );
    assert_eq!(
        store.get_prefix(&a, 1 << 30).await.expect("long prefix"),
        body,
        "ranged get past the end"
    );

    // Never overwrite: a second put with other content leaves the first in place.
    let out = store
        .put_if_absent(&a, Bytes::from_static(b"other"))
        .await
        .expect("second put");
    assert_eq!(
        out,
        PutOutcome::AlreadyExists,
        "second put must not overwrite"
    );
    assert_eq!(
        store.get(&a).await.expect("get after refused put"),
        body,
        "content unchanged"
    );

    // Empty objects are objects.
    store
        .put_if_absent(&h, Bytes::new())
        .await
        .expect("empty put");
    assert_eq!(store.get(&h).await.expect("get empty"), Bytes::new());

    // Listing is complete and sorted, and respects the prefix.
    store
        .put_if_absent(&b, Bytes::from_static(b"b"))
        .await
        .expect("put b");
    let listed: Vec<String> = store
        .list(&format!("{prefix}wal/0000000100000000/"))
        .await
        .expect("list")
        .into_iter()
        .map(|o| o.key.as_str().to_string())
        .collect();
    assert_eq!(
        listed,
        vec![a.to_string(), b.to_string()],
        "list under a prefix"
    );
    let all = store.list(&prefix).await.expect("list all");
    assert_eq!(all.len(), 3, "list of the whole prefix: {all:?}");
    assert_eq!(
        all.iter().find(|o| o.key == a).map(|o| o.size),
        Some(body.len() as u64),
        "sizes in listing"
    );
    // Listing after a key skips what sorts before it, whole directories included.
    let after = |prefix_: String, after: String| async move {
        let listed = store
            .list_after(&prefix_, &after)
            .await
            .expect("list_after");
        listed.into_iter().map(|o| o.key).collect::<Vec<_>>()
    };
    assert_eq!(
        after(prefix.clone(), a.to_string()).await,
        vec![b.clone(), h.clone()],
        "list after a key"
    );
    let wal = format!("{prefix}wal/");
    // After a directory's prefix, `/` included: SeaweedFS skips the whole directory when it is
    // given the name without the `/`.
    assert_eq!(
        after(wal.clone(), format!("{prefix}wal/0000000100000000/")).await,
        vec![a.clone(), b.clone(), h.clone()],
        "list after a directory's prefix keeps the directory"
    );
    assert_eq!(
        after(wal.clone(), format!("{prefix}wal/0000000100000001/")).await,
        vec![h.clone()],
        "list after a later directory's name"
    );
    assert_eq!(
        after(wal.clone(), String::new()).await.len(),
        3,
        "empty after lists all"
    );
    // Directories: one entry each, at the level asked for.
    assert_eq!(
        store.list_dirs(&wal).await.expect("list_dirs"),
        vec![
            format!("{prefix}wal/0000000100000000/"),
            format!("{prefix}wal/history/")
        ],
        "directories under a prefix"
    );
    assert_eq!(
        store.list_dirs(&prefix).await.expect("list_dirs"),
        vec![wal.clone()],
        "directories one level down only"
    );
    assert!(
        store
            .list_dirs(&format!("{prefix}nothing/"))
            .await
            .expect("list_dirs of nothing")
            .is_empty(),
        "no directories under a missing prefix"
    );

    // Listings say when each object was stored (restore checks a target time against it), by a
    // clock close to ours.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64;
    for o in &all {
        let at = o
            .stored_at
            .unwrap_or_else(|| panic!("{} has no time in listing", o.key));
        assert!(
            (at - now).abs() < 300,
            "{} stored at {at}, now is {now}",
            o.key
        );
    }

    // Delete removes, and deleting a missing object is fine.
    for k in [&a, &b, &h] {
        store.delete(k).await.expect("delete");
    }
    store.delete(&a).await.expect("delete of a missing object");
    assert!(
        store
            .list(&prefix)
            .await
            .expect("list after delete")
            .is_empty(),
        "nothing left"
    );
    assert!(
        store
            .list_dirs(&prefix)
            .await
            .expect("list_dirs after delete")
            .is_empty(),
        "a directory whose objects are all deleted is not listed"
    );
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
