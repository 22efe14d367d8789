//! The S3 backend, and the only module that imports aws-sdk-s3 / aws-config.
//!
//! Settings come in resolved (`S3Settings`); nothing here reads the environment except the AWS SDK's
//! own credential chain, used only when the config gives no keys.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::get_bucket_versioning::GetBucketVersioningError;
use aws_sdk_s3::operation::get_object::GetObjectError;
use aws_sdk_s3::operation::list_object_versions::ListObjectVersionsError;
use aws_sdk_s3::operation::list_objects_v2::{ListObjectsV2Error, ListObjectsV2Output};
use aws_sdk_s3::operation::put_object::PutObjectOutput;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::BucketVersioningStatus;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use base64::Engine;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::{ObjectInfo, ObjectKey, PutOutcome, StorageError, Store, StoreInfo};

/// Everything needed to talk to one bucket, already validated.
#[derive(Debug, Clone)]
pub struct S3Settings {
    pub bucket: String,
    /// Key prefix inside the bucket, empty or ending in `/`.
    pub prefix: String,
    pub region: String,
    pub endpoint: Option<String>,
    pub path_style: bool,
    pub ca_bundle: Option<PathBuf>,
    /// Static keys from the config; `None` uses the standard AWS credential chain.
    pub static_credentials: Option<(String, String)>,
    pub max_attempts: u32,
    pub connect_timeout: Duration,
    pub operation_timeout: Duration,
}

pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    /// The per-attempt timeouts, kept for puts, whose attempt time grows with the body.
    timeouts: (Duration, Duration),
    /// Cleared when the server answers a conditional put with 501: later puts in this process
    /// go without the condition at once instead of sending each body twice.
    conditional_puts: AtomicBool,
}

/// The time limit of one attempt to upload `len` bytes: the configured one, raised to 4 s per MiB
/// (256 KiB/s) for bodies too large to send in it over a slow or shared link, so that a large
/// part is not retried forever. The cost: a stalled upload of a large body is given up only then.
/// The SDK's stalled stream protection does not help here: it watches how fast the body is
/// handed over, and a body in memory is handed over at once.
fn put_attempt_timeout(configured: Duration, len: usize) -> Duration {
    configured.max(super::slow_link_time(len as u64))
}

impl S3Store {
    pub async fn connect(s: &S3Settings) -> Result<Self, StorageError> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(s.region.clone()))
            .retry_config(RetryConfig::standard().with_max_attempts(s.max_attempts.max(1)))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(s.connect_timeout)
                    .operation_attempt_timeout(s.operation_timeout)
                    .build(),
            );
        if let Some((id, secret)) = &s.static_credentials {
            // Given keys: no credential-chain probing (IMDS, profiles) on a hot path.
            loader = loader.credentials_provider(Credentials::new(
                id,
                secret,
                None,
                None,
                "walship-config",
            ));
        }
        if let Some(ca) = &s.ca_bundle {
            use aws_smithy_http_client::tls;
            let pem = std::fs::read(ca).map_err(|e| {
                StorageError::Io(format!("cannot read CA bundle {}: {e}", ca.display()))
            })?;
            let ctx = tls::TlsContext::builder()
                .with_trust_store(tls::TrustStore::default().with_pem_certificate(pem))
                .build()
                .map_err(|e| StorageError::Io(format!("bad CA bundle {}: {e}", ca.display())))?;
            let http = aws_smithy_http_client::Builder::new()
                .tls_provider(tls::Provider::Rustls(
                    tls::rustls_provider::CryptoMode::AwsLc,
                ))
                .tls_context(ctx)
                .build_https();
            loader = loader.http_client(http);
        }
        let shared = loader.load().await;
        let mut conf = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(s.path_style)
            // S3-compatible servers reject the SDK's default streaming checksums; we send our own
            // x-amz-checksum-sha256 on every put instead.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(ep) = &s.endpoint {
            conf = conf.endpoint_url(ep);
        }
        Ok(Self {
            client: aws_sdk_s3::Client::from_conf(conf.build()),
            bucket: s.bucket.clone(),
            prefix: s.prefix.clone(),
            timeouts: (s.connect_timeout, s.operation_timeout),
            conditional_puts: AtomicBool::new(true),
        })
    }

    fn full(&self, key: &ObjectKey) -> String {
        format!("{}{}", self.prefix, key.as_str())
    }

    fn map<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
        &self,
        key: &str,
        err: SdkError<E, HttpResponse>,
    ) -> StorageError {
        let status = http_status(&err);
        let code = err.code().unwrap_or("").to_string();
        let msg = err.message().unwrap_or("").to_string();
        let what = format!("s3://{}/{key}", self.bucket);
        let bucket_region = err
            .raw_response()
            .and_then(|r| r.headers().get("x-amz-bucket-region"))
            .map(str::to_string);
        if let Some(problem) = credentials_problem(&err) {
            let chain = describe_chain(&err);
            let role = instance_role_hint(&chain);
            return match problem {
                // Nothing in the chain had credentials, or its configuration is wrong: no retry
                // changes that, and "check the network" would send people the wrong way.
                CredentialsError::CredentialsNotLoaded(_)
                | CredentialsError::InvalidConfiguration(_) => StorageError::Denied(format!(
                    "no usable S3 credentials for {what}: {chain}; give keys (access_key_id and \
                     secret_access_key_file in the config's s3 section, or AWS_ACCESS_KEY_ID and \
                     AWS_SECRET_ACCESS_KEY), a profile (AWS_PROFILE), or an instance or pod role, \
                     to the user walship runs as{role}"
                )),
                // A provider that timed out or failed (STS, the instance metadata service) may
                // answer on the next try; on a host without a role the chain ends there too, so
                // the message also says where keys go.
                _ => StorageError::Credentials(format!(
                    "cannot get S3 credentials for {what}: {chain}; if this host has no instance \
                     or pod role, give keys (access_key_id and secret_access_key_file in the \
                     config's s3 section, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY) or a \
                     profile (AWS_PROFILE){role}"
                )),
            };
        }
        match (&err, code.as_str(), status) {
            (_, "NoSuchBucket", _) => StorageError::NoBucket(format!(
                "bucket '{}' does not exist; create it (see minio-test/ or terraform/) or fix the repository URL",
                self.bucket
            )),
            // A GET's 404 without NoSuchKey is transient (`map_get`); a 404 that gets here is a
            // HEAD's (no body: a bare 404), a DELETE's or a listing's.
            (_, "NoSuchKey" | "NotFound", _) | (_, _, Some(404)) => StorageError::NotFound(what),
            // AWS answers requests signed for another region than the bucket's with a redirect
            // (HEAD: a bare 301) or a malformed-authorization error, naming the right region.
            (_, "PermanentRedirect", _) | (_, _, Some(301)) => {
                self.wrong_region(bucket_region.as_deref(), &code, &msg)
            }
            (_, "AuthorizationHeaderMalformed", _) if msg.contains("region") => {
                self.wrong_region(bucket_region.as_deref(), &code, &msg)
            }
            (_, "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "InvalidToken" | "ExpiredToken", _)
            | (_, _, Some(401 | 403)) => StorageError::Denied(format!(
                "{}; check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the config's s3 section) and the bucket policy",
                format!("{what}: {code} {msg}").trim()
            )),
            (SdkError::TimeoutError(_) | SdkError::DispatchFailure(_), _, _) => StorageError::Transient(format!(
                "cannot reach the S3 endpoint for {what}: {}",
                describe_chain(&err)
            )),
            (_, _, Some(s)) if s >= 500 || s == 408 || s == 429 => {
                StorageError::Transient(format!("{what}: HTTP {s} {code} {msg}"))
            }
            (_, "BadDigest" | "XAmzContentSHA256Mismatch" | "RequestTimeout", _) => {
                StorageError::Transient(format!("{what}: {code} (corrupted in transfer) {msg}"))
            }
            (SdkError::ResponseError(_), _, _) => StorageError::Transient(format!("{what}: {}", describe_chain(&err))),
            _ => StorageError::Other(format!("{what}: {}", describe_chain(&err))),
        }
    }

    /// A page of a listing of `prefix`, or why the listing cannot be trusted (see `check_page`).
    fn checked_page(
        &self,
        prefix: &str,
        page: Result<ListObjectsV2Output, SdkError<ListObjectsV2Error, HttpResponse>>,
        token: &mut Option<String>,
    ) -> Result<ListObjectsV2Output, StorageError> {
        let page = page.map_err(|e| self.map_list(prefix, e))?;
        check_page(
            prefix,
            page.is_truncated(),
            page.next_continuation_token(),
            token,
        )?;
        Ok(page)
    }

    /// `map` for a listing: its 404 means a missing bucket only with `NoSuchBucket`; a bare one
    /// comes from something answering for the server (see `map_get`), and is retried.
    fn map_list<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
        &self,
        prefix: &str,
        err: SdkError<E, HttpResponse>,
    ) -> StorageError {
        let status = http_status(&err);
        if status == Some(404) && err.code() != Some("NoSuchBucket") {
            return StorageError::Transient(format!(
                "listing s3://{}/{prefix}: the server answered HTTP 404 without S3's NoSuchBucket \
                 error; a proxy or ingress in front of the storage may have answered for a server \
                 that is down",
                self.bucket
            ));
        }
        self.map(prefix, err)
    }

    /// `map` for a GET, where only S3's `NoSuchKey` means the key does not exist. A GET's error
    /// has a body, and S3 and the S3-compatible servers (MinIO, SeaweedFS) name the error in it;
    /// a 404 without that name comes from something else answering for the server, such as an
    /// ingress's default backend while the storage pod restarts. Taken for a missing object, it
    /// would end recovery early (wal-fetch's exit 1); as a transient error it is retried.
    fn map_get(&self, key: &str, err: SdkError<GetObjectError, HttpResponse>) -> StorageError {
        let no_such_key = matches!(err.as_service_error(), Some(GetObjectError::NoSuchKey(_)))
            || err.code() == Some("NoSuchKey");
        let status = http_status(&err);
        match get_miss(no_such_key, status, err.code().unwrap_or("")) {
            GetMiss::NoSuchKey => StorageError::NotFound(format!("s3://{}/{key}", self.bucket)),
            GetMiss::Bare404 => StorageError::Transient(format!(
                "s3://{}/{key}: the server answered HTTP 404 without S3's NoSuchKey error{}, which \
                 walship does not take for a missing object: a proxy or ingress in front of the \
                 storage may have answered for a server that is down",
                self.bucket,
                err.code()
                    .map(|c| format!(" (error code {c})"))
                    .unwrap_or_default()
            )),
            GetMiss::Other => self.map(key, err),
        }
    }
}

/// A listing page that says more follows but gives no way to it (no continuation token, or the
/// one before again): the SDK's paginator stops there, and a listing taken for complete would
/// make WAL or backups look missing. `seen` carries the previous page's token.
fn check_page(
    prefix: &str,
    truncated: Option<bool>,
    next: Option<&str>,
    seen: &mut Option<String>,
) -> Result<(), StorageError> {
    if truncated != Some(true) {
        return Ok(());
    }
    match next {
        Some(t) if seen.as_deref() != Some(t) => {
            *seen = Some(t.to_string());
            Ok(())
        }
        _ => Err(StorageError::Transient(format!(
            "listing {prefix}: the server said the listing goes on but gave no new continuation \
             token; walship does not take a cut listing for the whole"
        ))),
    }
}

/// What a failed GET says about its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GetMiss {
    /// S3's `NoSuchKey`: the key does not exist.
    NoSuchKey,
    /// A 404 without `NoSuchKey` (or `NoSuchBucket`): not an answer about the key.
    Bare404,
    /// Anything else: `S3Store::map` decides.
    Other,
}

fn get_miss(no_such_key: bool, status: Option<u16>, code: &str) -> GetMiss {
    match (no_such_key, status, code) {
        (true, _, _) => GetMiss::NoSuchKey,
        (_, _, "NoSuchBucket") => GetMiss::Other,
        // The SDK names an error without a body "NotFound" after its 404 (meant for HEAD).
        (_, Some(404), _) | (_, _, "NotFound") => GetMiss::Bare404,
        _ => GetMiss::Other,
    }
}

/// The HTTP status of an SDK error's response, when there was one.
fn http_status<E>(err: &SdkError<E, HttpResponse>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}

/// Whether the server said it does not implement the call (501, or S3's NotImplemented code).
fn not_implemented<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    http_status(err) == Some(501) || err.code() == Some("NotImplemented")
}

/// The credentials failure behind an SDK error, if that is what it is: the SDK reports a request
/// that could not get credentials as a dispatch failure, as it does a network error.
fn credentials_problem<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a CredentialsError> {
    let mut cur = err.source();
    while let Some(e) = cur {
        if let Some(c) = e.downcast_ref::<CredentialsError>() {
            return Some(c);
        }
        cur = e.source();
    }
    None
}

/// What to check about an instance role, when the credential chain's story (`describe_chain`)
/// says the instance metadata service was asked and gave nothing: it did not answer (a container
/// on EC2 behind the default hop limit of 1 cannot get the token, the commonest case), or the
/// instance has no role. Empty otherwise, also when IMDS was turned off on purpose.
fn instance_role_hint(chain: &str) -> &'static str {
    if chain.contains("404 from IMDS") {
        "; the instance metadata service says this instance has no role: attach one (an \
         instance profile) if walship should use it"
    } else if chain.contains("IMDS session token") || chain.contains("communicate with IMDS") {
        "; if this host is a cloud instance with a role, its metadata service gave none: check \
         that it is enabled and reachable, and in a container on EC2 raise the instance's \
         metadata hop limit (HttpPutResponseHopLimit) to 2"
    } else {
        ""
    }
}

/// The innermost causes of an SDK error, which hold the useful part ("connection refused").
fn describe_chain(err: &dyn std::error::Error) -> String {
    let mut parts = vec![err.to_string()];
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = e.source();
    }
    // One line: some causes (the credential chain's) list their attempts on lines of their own.
    let joined = parts.join(": ");
    let lines: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    // Callers go on after a `;`: no sentence's full stop before it.
    let one = lines.join("; ").replace(":; ", ": ").replace(".; ", "; ");
    one.trim_end_matches('.').to_string()
}

impl S3Store {
    /// A request AWS refused because it was signed for another region than the bucket's: a
    /// redirect (HEAD: a bare 301) or a malformed-authorization error, naming the right region.
    fn wrong_region(&self, region: Option<&str>, code: &str, msg: &str) -> StorageError {
        let region = region.map(|r| format!(" ({r})")).unwrap_or_default();
        StorageError::NoBucket(format!(
            "bucket '{}' is in another region{region} than the one configured: set s3.region \
             (or WALSHIP_S3_REGION) to the bucket's region ({})",
            self.bucket,
            format!("{code} {msg}").trim()
        ))
    }

    /// Whether the current version of `full` is a delete marker: deleted from a versioned bucket,
    /// not never written. Asked only when a GET found nothing, so that a WAL segment someone
    /// deleted never reads as the end of the archive (recovery would promote there). A server
    /// that cannot say answers no: a role without s3:ListBucketVersions (access denied), a server
    /// without versions (501 NotImplemented, or an answer the SDK cannot read). A failure that may
    /// pass (timeout, connection, 5xx, throttling) is a transient error, retried like the GET:
    /// answered no, it would turn a deleted segment into the end of the archive.
    async fn deleted(&self, full: &str) -> Result<bool, StorageError> {
        let listed = self
            .client
            .list_object_versions()
            .bucket(&self.bucket)
            .prefix(full)
            .max_keys(16)
            .send()
            .await;
        match listed {
            Ok(out) => Ok(out
                .delete_markers()
                .iter()
                .any(|m| m.key() == Some(full) && m.is_latest() == Some(true))),
            Err(e) => self.versions_unknown(full, e),
        }
    }

    /// A failed listing of `full`'s versions: `Ok(false)` when the server cannot tell (see
    /// `deleted`), the error when asking again may answer.
    fn versions_unknown(
        &self,
        full: &str,
        err: SdkError<ListObjectVersionsError, HttpResponse>,
    ) -> Result<bool, StorageError> {
        let unsupported = not_implemented(&err);
        match self.map_list(full, err) {
            _ if unsupported => Ok(false),
            StorageError::Transient(why) => Err(StorageError::Transient(format!(
                "{why} (listing the key's versions, to tell a deleted object from one never written)"
            ))),
            StorageError::NoBucket(why) => Err(StorageError::NoBucket(why)),
            _ => Ok(false),
        }
    }

    /// A failed GetBucketVersioning: why the storage would not say, or the error when asking
    /// again may answer. Pushes and fetches do not need to know, so a role without
    /// s3:GetBucketVersioning, or a server without the call (501), leaves it unknown rather than
    /// failing the probe.
    fn versioning_unknown(
        &self,
        err: SdkError<GetBucketVersioningError, HttpResponse>,
    ) -> Result<String, StorageError> {
        let unsupported = not_implemented(&err);
        match self.map("?versioning", err) {
            e if unsupported => Ok(e.to_string()),
            e @ (StorageError::Transient(_) | StorageError::NoBucket(_)) => Err(e),
            e => Ok(e.to_string()),
        }
    }

    /// S3 answers a GET of a missing key with 403, not 404, unless the caller may list the bucket
    /// without a prefix condition, which least-privilege roles (terraform/'s) may not. A 403 would
    /// make the end of the archive look like an access problem to wal-fetch, and the wait for a
    /// backup's WAL fail; so on 403 a listing of the key itself decides: absent is NotFound. A
    /// listing that fails for a reason that may pass is a transient error (retried), not the 403.
    async fn missing_or_denied(&self, full: &str, err: StorageError) -> StorageError {
        if !matches!(err, StorageError::Denied(_)) {
            return err;
        }
        let listed = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(full)
            .max_keys(1)
            .send()
            .await;
        match listed {
            Ok(out) if !out.contents().iter().any(|o| o.key() == Some(full)) => {
                StorageError::NotFound(format!("s3://{}/{full}", self.bucket))
            }
            Ok(_) => err,
            Err(e) => self.listing_after_denied_failed(full, err, e),
        }
    }

    fn listing_after_denied_failed(
        &self,
        full: &str,
        denied: StorageError,
        err: SdkError<ListObjectsV2Error, HttpResponse>,
    ) -> StorageError {
        match self.map_list(full, err) {
            StorageError::Transient(why) => StorageError::Transient(format!(
                "{why} (listing the key after its GET was refused, to tell a missing key from a denied one)"
            )),
            _ => denied,
        }
    }
}

#[async_trait]
impl Store for S3Store {
    async fn put_if_absent(
        &self,
        key: &ObjectKey,
        body: Bytes,
    ) -> Result<PutOutcome, StorageError> {
        let full = self.full(key);
        let checksum = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&body));
        // Only a body too large for the configured limit gets a request-level override.
        let (connect, configured) = self.timeouts;
        let longer = Some(put_attempt_timeout(configured, body.len()))
            .filter(|&t| t > configured)
            .map(|t| {
                TimeoutConfig::builder()
                    .connect_timeout(connect)
                    .operation_attempt_timeout(t)
                    .build()
            });
        let put = |condition: Option<&str>| {
            let op = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(&full)
                .set_if_none_match(condition.map(str::to_string))
                .checksum_sha256(&checksum)
                .content_type("application/octet-stream")
                .body(ByteStream::from(body.clone()))
                .customize();
            match &longer {
                Some(t) => {
                    op.config_override(aws_sdk_s3::config::Builder::new().timeout_config(t.clone()))
                }
                None => op,
            }
            .send()
        };
        let created = |out: PutObjectOutput| PutOutcome::Created {
            version_id: out.version_id().map(str::to_string),
        };
        if !self.conditional_puts.load(Ordering::Relaxed) {
            return put(None).await.map(created).map_err(|e| self.map(&full, e));
        }
        match put(Some("*")).await {
            Ok(out) => Ok(created(out)),
            Err(e) if http_status(&e) == Some(412) => Ok(PutOutcome::AlreadyExists),
            // A server that does not implement conditional writes: put without the condition,
            // as on servers that ignore it. wal-push reads an archived name's header before each
            // upload, so only two uploads of one name at the same moment can meet; `walship
            // check` warns about such storage.
            Err(e) if not_implemented(&e) => {
                tracing::info!(
                    "s3://{}: no conditional writes here; puts go without",
                    self.bucket
                );
                self.conditional_puts.store(false, Ordering::Relaxed);
                put(None).await.map(created).map_err(|e| self.map(&full, e))
            }
            // 409 ConditionalRequestConflict: a concurrent conditional put is in flight; retrying
            // resolves it into Created or AlreadyExists.
            Err(e) if http_status(&e) == Some(409) => Err(StorageError::Transient(format!(
                "s3://{}/{full}: concurrent put in progress",
                self.bucket
            ))),
            Err(e) => Err(self.map(&full, e)),
        }
    }

    async fn get(&self, key: &ObjectKey) -> Result<Bytes, StorageError> {
        let full = self.full(key);
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await;
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                // S3 says so on the GET itself when the current version is a delete marker, with
                // no listing permission needed; the listing below is for servers that do not.
                let marker = e
                    .raw_response()
                    .and_then(|r| r.headers().get("x-amz-delete-marker"))
                    == Some("true");
                let err = self.missing_or_denied(&full, self.map_get(&full, e)).await;
                if matches!(err, StorageError::NotFound(_))
                    && (marker || self.deleted(&full).await?)
                {
                    return Err(StorageError::Deleted(format!(
                        "s3://{}/{full}",
                        self.bucket
                    )));
                }
                return Err(err);
            }
        };
        let data = out.body.collect().await.map_err(|e| {
            StorageError::Transient(format!(
                "s3://{}/{full}: download interrupted: {}",
                self.bucket,
                describe_chain(&e)
            ))
        })?;
        Ok(data.into_bytes())
    }

    /// An object S3 shows was acknowledged to its writer as stored.
    async fn make_durable(&self, _: &ObjectKey) -> Result<(), StorageError> {
        Ok(())
    }

    async fn get_prefix(&self, key: &ObjectKey, len: u64) -> Result<Bytes, StorageError> {
        let full = self.full(key);
        if len == 0 {
            return Ok(Bytes::new());
        }
        let res = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .range(format!("bytes=0-{}", len - 1))
            .send()
            .await;
        let out = match res {
            Ok(out) => out,
            // An empty object cannot satisfy any range.
            Err(e) if http_status(&e) == Some(416) => return Ok(Bytes::new()),
            Err(e) => return Err(self.missing_or_denied(&full, self.map_get(&full, e)).await),
        };
        let data = out.body.collect().await.map_err(|e| {
            StorageError::Transient(format!(
                "s3://{}/{full}: download interrupted: {}",
                self.bucket,
                describe_chain(&e)
            ))
        })?;
        let mut b = data.into_bytes();
        b.truncate(len.min(usize::MAX as u64) as usize);
        Ok(b)
    }

    async fn list_after(&self, prefix: &str, after: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        let full_prefix = format!("{}{prefix}", self.prefix);
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full_prefix)
            .set_start_after((!after.is_empty()).then(|| format!("{}{after}", self.prefix)))
            .into_paginator()
            .send();
        let mut token = None;
        while let Some(page) = pages.next().await {
            let page = self.checked_page(&full_prefix, page, &mut token)?;
            for obj in page.contents() {
                let Some(k) = obj.key().and_then(|k| k.strip_prefix(&self.prefix)) else {
                    continue;
                };
                if let Ok(key) = ObjectKey::new(k) {
                    out.push(ObjectInfo {
                        key,
                        size: obj.size().unwrap_or(0).max(0) as u64,
                        stored_at: obj.last_modified().map(|t| t.secs()),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let full_prefix = format!("{}{prefix}", self.prefix);
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full_prefix)
            .delimiter("/")
            .into_paginator()
            .send();
        let mut token = None;
        while let Some(page) = pages.next().await {
            let page = self.checked_page(&full_prefix, page, &mut token)?;
            out.extend(
                page.common_prefixes()
                    .iter()
                    .filter_map(|p| p.prefix()?.strip_prefix(&self.prefix))
                    .map(str::to_string),
            );
        }
        out.sort();
        Ok(out)
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), StorageError> {
        let full = self.full(key);
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match self.map(&full, e) {
                StorageError::NotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn probe(&self) -> Result<StoreInfo, StorageError> {
        let bucket = self.bucket.clone();
        if let Err(e) = self.client.head_bucket().bucket(&bucket).send().await {
            // HEAD has no body, so a missing bucket is a bare 404.
            match self.map("", e) {
                StorageError::NotFound(_) => return Err(StorageError::NoBucket(format!(
                    "bucket '{bucket}' does not exist; create it (see minio-test/ or terraform/) or fix the repository URL"
                ))),
                // S3 authorises HeadBucket as a ListBucket without a prefix, which a role limited
                // to the repository's prefix (terraform/'s policies) does not have: the listing
                // below decides.
                StorageError::Denied(_) if !self.prefix.is_empty() => {}
                other => return Err(other),
            }
        }
        let versioning = match self
            .client
            .get_bucket_versioning()
            .bucket(&bucket)
            .send()
            .await
        {
            Ok(v) => Ok(v.status() == Some(&BucketVersioningStatus::Enabled)),
            Err(e) => Err(self.versioning_unknown(e)?),
        };
        let object_lock = match self
            .client
            .get_object_lock_configuration()
            .bucket(&bucket)
            .send()
            .await
        {
            Ok(c) => Some(Ok(c
                .object_lock_configuration()
                .and_then(|c| c.object_lock_enabled())
                .is_some())),
            // A bucket without object lock answers 404 ObjectLockConfigurationNotFoundError.
            Err(e)
                if e.code() == Some("ObjectLockConfigurationNotFoundError")
                    || http_status(&e) == Some(404) =>
            {
                Some(Ok(false))
            }
            Err(e) => Some(Err(self.map("?object-lock", e).to_string())),
        };
        // Listing proves read permission on the prefix, which wal-fetch needs.
        self.client
            .list_objects_v2()
            .bucket(&bucket)
            .prefix(&self.prefix)
            .max_keys(1)
            .send()
            .await
            .map_err(|e| self.map(&self.prefix, e))?;
        Ok(StoreInfo {
            versioning: Some(versioning),
            object_lock,
        })
    }

    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_s3::types::error::NoSuchKey;
    use aws_smithy_types::body::SdkBody;
    use aws_smithy_types::error::ErrorMetadata;

    /// A store whose client is never used: for the mapping of errors built here.
    fn store() -> S3Store {
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .build();
        S3Store {
            client: aws_sdk_s3::Client::from_conf(conf),
            bucket: "b".into(),
            prefix: String::new(),
            timeouts: (Duration::from_secs(5), Duration::from_secs(120)),
            conditional_puts: AtomicBool::new(true),
        }
    }

    fn response(status: u16, body: &'static str) -> HttpResponse {
        HttpResponse::new(status.try_into().unwrap(), SdkBody::from(body))
    }

    fn code(code: &str) -> ErrorMetadata {
        ErrorMetadata::builder().code(code).build()
    }

    /// The SDK's error for a request the server answered with `status` and no body.
    fn refused<E>(status: u16, err: E) -> SdkError<E, HttpResponse> {
        SdkError::service_error(err, response(status, ""))
    }

    #[test]
    fn only_no_such_key_makes_a_get_a_missing_object() {
        let s = store();
        let modeled = GetObjectError::NoSuchKey(NoSuchKey::builder().build());
        assert!(matches!(
            s.map_get("k", refused(404, modeled)),
            StorageError::NotFound(_)
        ));
        let coded = GetObjectError::generic(code("NoSuchKey"));
        assert!(matches!(
            s.map_get("k", refused(404, coded)),
            StorageError::NotFound(_)
        ));
        // An ingress's default backend while the storage pod restarts: a page, no S3 error.
        let html = SdkError::service_error(
            GetObjectError::unhandled("not an S3 error document"),
            response(404, "<html><body>default backend - 404</body></html>"),
        );
        let err = s.map_get("wal/x", html);
        assert!(err.is_transient(), "{err:?}");
        assert!(
            err.to_string().contains("HTTP 404 without S3's NoSuchKey"),
            "{err}"
        );
        // No body at all: the SDK calls that NotFound, as it does for a HEAD.
        let bare = GetObjectError::generic(code("NotFound"));
        assert!(s.map_get("k", refused(404, bare)).is_transient());
        // The rest maps as before.
        let no_bucket = GetObjectError::generic(code("NoSuchBucket"));
        assert!(matches!(
            s.map_get("k", refused(404, no_bucket)),
            StorageError::NoBucket(_)
        ));
        let denied = GetObjectError::generic(code("AccessDenied"));
        assert!(matches!(
            s.map_get("k", refused(403, denied)),
            StorageError::Denied(_)
        ));
        let slow = GetObjectError::generic(code("SlowDown"));
        assert!(s.map_get("k", refused(503, slow)).is_transient());
        // HEAD has no body: a bare 404 there stays "not found" (`map`, used for HEAD).
        assert!(matches!(
            s.map("k", refused(404, GetObjectError::generic(code("NotFound")))),
            StorageError::NotFound(_)
        ));
    }

    #[test]
    fn a_delete_marker_check_that_may_pass_is_retried_not_answered_no() {
        let s = store();
        let list =
            |status: u16, c: &str| refused(status, ListObjectVersionsError::generic(code(c)));
        // No s3:ListBucketVersions, or a server without versions: not known to be deleted.
        assert!(matches!(
            s.versions_unknown("k", list(403, "AccessDenied")),
            Ok(false)
        ));
        assert!(matches!(
            s.versions_unknown("k", list(501, "NotImplemented")),
            Ok(false)
        ));
        // Answered "not deleted", these would make a deleted segment the end of the archive.
        for (status, c) in [
            (503, "SlowDown"),
            (500, "InternalError"),
            (429, "TooManyRequests"),
        ] {
            let err = s.versions_unknown("k", list(status, c)).unwrap_err();
            assert!(err.is_transient(), "{status} {c}: {err:?}");
        }
        let timeout = SdkError::<ListObjectVersionsError, HttpResponse>::timeout_error("timed out");
        assert!(s.versions_unknown("k", timeout).unwrap_err().is_transient());
    }

    #[test]
    fn a_large_upload_gets_time_by_its_size_a_small_one_the_configured_limit() {
        let configured = Duration::from_secs(120);
        let mib = 1 << 20;
        assert_eq!(put_attempt_timeout(configured, 0), configured);
        assert_eq!(put_attempt_timeout(configured, 16 * mib), configured);
        assert_eq!(put_attempt_timeout(configured, 30 * mib), configured);
        assert_eq!(
            put_attempt_timeout(configured, 30 * mib + 1),
            Duration::from_secs(124)
        );
        assert_eq!(
            put_attempt_timeout(configured, 1024 * mib),
            Duration::from_secs(4096),
            "a 1 GiB part over a link that gives it 256 KiB/s"
        );
    }

    #[test]
    fn versioning_the_storage_will_not_report_is_unknown_not_a_failed_probe() {
        let s = store();
        let err =
            |status: u16, c: &str| refused(status, GetBucketVersioningError::generic(code(c)));
        // A role without s3:GetBucketVersioning, a server without the call.
        let why = s.versioning_unknown(err(403, "AccessDenied")).unwrap();
        assert!(why.contains("access denied"), "{why}");
        assert!(s.versioning_unknown(err(501, "NotImplemented")).is_ok());
        // What may pass, or a missing bucket, still fails the probe.
        let slow = s.versioning_unknown(err(503, "SlowDown")).unwrap_err();
        assert!(slow.is_transient(), "{slow:?}");
        assert!(matches!(
            s.versioning_unknown(err(404, "NoSuchBucket")),
            Err(StorageError::NoBucket(_))
        ));
    }

    #[test]
    fn a_listing_after_a_refused_get_that_may_pass_is_retried() {
        let s = store();
        let list = |status: u16, c: &str| refused(status, ListObjectsV2Error::generic(code(c)));
        let denied = || StorageError::Denied("s3://b/k: AccessDenied".into());
        let err = s.listing_after_denied_failed("k", denied(), list(503, "SlowDown"));
        assert!(err.is_transient(), "{err:?}");
        let err = s.listing_after_denied_failed("k", denied(), list(403, "AccessDenied"));
        assert!(matches!(err, StorageError::Denied(_)), "{err:?}");
    }

    #[test]
    fn a_listing_is_never_taken_for_missing_or_complete_on_a_doubtful_answer() {
        let s = store();
        let list = |status: u16, c: &str| refused(status, ListObjectsV2Error::generic(code(c)));
        // A bare 404: something answered for the server.
        let err = s.map_list("wal/", list(404, "NotFound"));
        assert!(err.is_transient(), "{err:?}");
        assert!(matches!(
            s.map_list("wal/", list(404, "NoSuchBucket")),
            StorageError::NoBucket(_)
        ));
        // Nor is a version listing's bare 404 an answer "not deleted".
        let versions = refused(404, ListObjectVersionsError::generic(code("NotFound")));
        assert!(s
            .versions_unknown("k", versions)
            .unwrap_err()
            .is_transient());

        // Pages: complete, then ones that say more follows.
        let mut seen = None;
        assert!(check_page("p", Some(false), None, &mut seen).is_ok());
        assert!(check_page("p", None, None, &mut seen).is_ok());
        assert!(check_page("p", Some(true), Some("t1"), &mut seen).is_ok());
        assert!(check_page("p", Some(true), Some("t2"), &mut seen).is_ok());
        // ... with the same token again, or none: the SDK would stop there, cut.
        assert!(check_page("p", Some(true), Some("t2"), &mut seen)
            .unwrap_err()
            .is_transient());
        assert!(check_page("p", Some(true), None, &mut seen)
            .unwrap_err()
            .is_transient());
    }

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn an_error_chain_reads_as_one_line_without_repeats_or_full_stops() {
        let cause = Layer(
            "the chain tried:\n  environment: not set.\n  IMDS: request forbidden.",
            None,
        );
        let err = Layer(
            "dispatch failure",
            Some(Box::new(Layer("dispatch failure", Some(Box::new(cause))))),
        );
        assert_eq!(
            describe_chain(&err),
            "dispatch failure: the chain tried: environment: not set; IMDS: request forbidden"
        );
    }

    /// An S3 stand-in at the HTTP level on loopback: `answer(method, path, conditional)` gives the
    /// whole response to each request, by its method, its path without the query, and whether it
    /// carried `If-None-Match`. Records each request's path and condition.
    fn serve(
        answer: fn(&str, &str, bool) -> String,
    ) -> (String, std::sync::mpsc::Receiver<(String, bool)>) {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut conn = conn;
                    loop {
                        let mut request = String::new();
                        if reader.read_line(&mut request).unwrap_or(0) == 0 {
                            return;
                        }
                        let (mut len, mut conditional) = (0usize, false);
                        loop {
                            let mut line = String::new();
                            reader.read_line(&mut line).unwrap();
                            let line = line.trim_end().to_ascii_lowercase();
                            if line.is_empty() {
                                break;
                            }
                            if let Some(v) = line.strip_prefix("content-length:") {
                                len = v.trim().parse().unwrap();
                            }
                            conditional |= line.starts_with("if-none-match:");
                        }
                        let mut body = vec![0; len];
                        reader.read_exact(&mut body).unwrap();
                        let mut words = request.split(' ');
                        let method = words.next().unwrap_or("");
                        let target = words.next().unwrap_or("");
                        let path = target.split('?').next().unwrap_or("").to_string();
                        let reply = answer(method, &path, conditional);
                        tx.send((path, conditional)).unwrap();
                        conn.write_all(reply.as_bytes()).unwrap();
                    }
                });
            }
        });
        (endpoint, rx)
    }

    /// An S3 error response: `status`, S3's XML error `code`, and extra header lines.
    fn s3_error(status: &str, code: &str, headers: &str) -> String {
        let xml = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>\
             <Message>{code}</Message></Error>"
        );
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\n{headers}\
             Content-Length: {}\r\n\r\n{xml}",
            xml.len()
        )
    }

    /// A store of bucket `b` at the stand-in `endpoint`.
    async fn loopback(endpoint: String, max_attempts: u32) -> S3Store {
        S3Store::connect(&S3Settings {
            bucket: "b".into(),
            prefix: String::new(),
            region: "us-east-1".into(),
            endpoint: Some(endpoint),
            path_style: true,
            ca_bundle: None,
            static_credentials: Some(("id".into(), "secret".into())),
            max_attempts,
            connect_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(30),
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_server_without_conditional_writes_gets_each_later_put_once() {
        // A put with `If-None-Match` gets 501 NotImplemented; one without is stored.
        let (endpoint, requests) = serve(|_, _, conditional| {
            if conditional {
                s3_error("501 Not Implemented", "NotImplemented", "")
            } else {
                "HTTP/1.1 200 OK\r\nETag: \"e\"\r\nContent-Length: 0\r\n\r\n".into()
            }
        });
        let s = loopback(endpoint, 3).await;
        for key in ["wal/a", "wal/b"] {
            let key = ObjectKey::new(key).unwrap();
            let out = s.put_if_absent(&key, Bytes::from_static(b"x")).await;
            assert!(matches!(out, Ok(PutOutcome::Created { .. })), "{out:?}");
        }
        let seen: Vec<_> = requests.try_iter().collect();
        let seen: Vec<_> = seen.iter().map(|(p, c)| (p.as_str(), *c)).collect();
        assert_eq!(
            seen,
            [("/b/wal/a", true), ("/b/wal/a", false), ("/b/wal/b", false)]
        );
    }

    /// AWS marks the GET of a deleted object (its current version a delete marker) with
    /// `x-amz-delete-marker: true`, which SeaweedFS, the test server, does not. The header alone
    /// decides: no listing of versions, which a least-privilege role may not do (here refused).
    #[tokio::test]
    async fn a_delete_marker_named_on_the_get_is_deleted_without_a_listing() {
        let (endpoint, requests) = serve(|_, path, _| match path.trim_end_matches('/') {
            "/b" => s3_error("403 Forbidden", "AccessDenied", ""),
            _ => s3_error(
                "404 Not Found",
                "NoSuchKey",
                "x-amz-delete-marker: true\r\n",
            ),
        });
        let s = loopback(endpoint, 1).await;
        let key = ObjectKey::new("wal/000000010000000000000001").unwrap();
        let err = s.get(&key).await.unwrap_err();
        assert!(matches!(err, StorageError::Deleted(_)), "{err:?}");
        let seen: Vec<_> = requests.try_iter().map(|(p, _)| p).collect();
        assert_eq!(seen, ["/b/wal/000000010000000000000001"]);

        // Without the header, and with the versions not to be listed: never written, as far as
        // anyone can tell.
        let (endpoint, requests) = serve(|_, path, _| match path.trim_end_matches('/') {
            "/b" => s3_error("403 Forbidden", "AccessDenied", ""),
            _ => s3_error("404 Not Found", "NoSuchKey", ""),
        });
        let s = loopback(endpoint, 1).await;
        let err = s.get(&key).await.unwrap_err();
        assert!(matches!(err, StorageError::NotFound(_)), "{err:?}");
        let seen: Vec<_> = requests.try_iter().map(|(p, _)| p).collect();
        assert_eq!(seen, ["/b/wal/000000010000000000000001", "/b/"]);
    }
}
