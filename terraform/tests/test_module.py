"""Static tests of the walship-bucket Terraform module: parse the HCL and check the properties the
archive's safety rests on. No provider, no network, no AWS account.

Run: python3 -m unittest discover -s terraform/tests -v   (needs python-hcl2: pip install python-hcl2)
"""

import fnmatch
import re
import unittest
from pathlib import Path

import hcl2

TERRAFORM = Path(__file__).resolve().parent.parent
MODULE = TERRAFORM / "modules" / "walship-bucket"
EXAMPLES = TERRAFORM / "examples"

# Storage classes whose objects GetObject can read at once; the others need a restore first.
INSTANT_CLASSES = {"STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR"}
ARCHIVE_CLASSES = {"GLACIER", "DEEP_ARCHIVE"}

# Concrete actions that would let a compromised database host destroy or weaken its archive.
DESTRUCTIVE = [
    "s3:DeleteObject",
    "s3:DeleteObjectVersion",
    "s3:DeleteBucket",
    "s3:DeleteBucketPolicy",
    "s3:PutBucketPolicy",
    "s3:PutBucketVersioning",
    "s3:PutLifecycleConfiguration",
    "s3:PutBucketObjectLockConfiguration",
    "s3:PutObjectRetention",
    "s3:PutObjectLegalHold",
    "s3:BypassGovernanceRetention",
    "s3:PutReplicationConfiguration",
    "s3:PutEncryptionConfiguration",
]
# Patterns no action granted to the archiver may match, and wildcards it may not be granted as such.
FORBIDDEN_PATTERNS = ["s3:Delete*", "s3:PutBucket*", "s3:PutLifecycle*", "s3:Bypass*", "s3:PutObjectRetention",
                      "s3:PutObjectLegalHold"]
FORBIDDEN_WILDCARDS = ["*", "s3:*"]


# --------------------------------------------------------------------------------------------------
# Parsing helpers. python-hcl2 keeps the quotes of string literals and block labels ('"this"') and
# adds "__is_block__"/"__comments__" markers; normalise both away so tests read plain values.
# --------------------------------------------------------------------------------------------------


def _unquote(value):
    if isinstance(value, str) and len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return value[1:-1]
    return value


def _clean(node):
    if isinstance(node, dict):
        return {_unquote(k): _clean(v) for k, v in node.items() if not str(k).startswith("__")}
    if isinstance(node, list):
        return [_clean(v) for v in node]
    return _unquote(node)


def load_dir(path):
    """All top-level blocks of the .tf files in `path`, merged: {"resource": [...], ...}."""
    merged = {}
    files = sorted(path.glob("*.tf"))
    assert files, f"no .tf files in {path}"
    for tf in files:
        with tf.open(encoding="utf-8") as f:
            for key, items in _clean(hcl2.load(f)).items():
                merged.setdefault(key, []).extend(items)
    return merged


def labelled(doc, kind, type_):
    """{name: body} of the `kind` ("resource"/"data") blocks of type `type_`."""
    out = {}
    for item in doc.get(kind, []):
        for name, body in item.get(type_, {}).items():
            out[name] = body
    return out


def one(doc, kind, type_, name):
    blocks = labelled(doc, kind, type_)
    assert name in blocks, f"{kind} {type_}.{name} not found"
    return blocks[name]


def variables(doc):
    out = {}
    for item in doc.get("variable", []):
        out.update(item)
    return out


def locals_(doc):
    out = {}
    for item in doc.get("locals", []):
        out.update(item)
    return out


def dynamic_blocks(body, name):
    """[(for_each, content)] of the `dynamic "name"` blocks in a block body."""
    out = []
    for dyn in body.get("dynamic", []):
        if name in dyn:
            spec = dyn[name]
            for content in spec.get("content", []):
                out.append((spec.get("for_each"), content))
    return out


def statements(policy_doc):
    """Every statement of an aws_iam_policy_document, static and dynamic: [(for_each|None, stmt)]."""
    return [(None, s) for s in policy_doc.get("statement", [])] + dynamic_blocks(policy_doc, "statement")


def effect(stmt):
    return stmt.get("effect", "Allow")


def allowed_actions(policy_doc):
    return [a for _, s in statements(policy_doc) if effect(s) == "Allow" for a in s.get("actions", [])]


def denied_actions(policy_doc, local_values):
    """Actions of the Deny statements; `actions = local.NAME` is looked up in `local_values`."""
    out = []
    for _, s in statements(policy_doc):
        if effect(s) != "Deny":
            continue
        acts = s.get("actions", [])
        if isinstance(acts, str):
            m = re.fullmatch(r"\$\{local\.(\w+)\}", acts)
            acts = local_values[m.group(1)] if m else []
        out.extend(acts)
    return out


def matches(pattern, action):
    """IAM action matching: case-insensitive, '*' and '?' wildcards."""
    return fnmatch.fnmatchcase(action.lower(), pattern.lower())


def conditions(stmt):
    """Static and dynamic condition blocks of a statement."""
    return list(stmt.get("condition", [])) + [c for _, c in dynamic_blocks(stmt, "condition")]


class ModuleTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.doc = load_dir(MODULE)
        cls.vars = variables(cls.doc)
        cls.locals = locals_(cls.doc)

    def policy(self, name):
        return one(self.doc, "data", "aws_iam_policy_document", name)

    # ----------------------------------------------------------------------------- the bucket

    def test_versioning_enabled(self):
        v = one(self.doc, "resource", "aws_s3_bucket_versioning", "this")
        self.assertEqual(v["bucket"], "${aws_s3_bucket.this.id}")
        self.assertEqual(v["versioning_configuration"][0]["status"], "Enabled")

    def test_public_access_fully_blocked(self):
        pab = one(self.doc, "resource", "aws_s3_bucket_public_access_block", "this")
        self.assertEqual(pab["bucket"], "${aws_s3_bucket.this.id}")
        for flag in ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets"):
            self.assertIs(pab.get(flag), True, flag)

    def test_acls_disabled(self):
        oc = one(self.doc, "resource", "aws_s3_bucket_ownership_controls", "this")
        self.assertEqual(oc["rule"][0]["object_ownership"], "BucketOwnerEnforced")

    def test_bucket_never_force_destroyed(self):
        bucket = one(self.doc, "resource", "aws_s3_bucket", "this")
        self.assertIs(bucket.get("force_destroy"), False)

    def test_encryption_sse_s3_by_default_kms_optional(self):
        sse = one(self.doc, "resource", "aws_s3_bucket_server_side_encryption_configuration", "this")
        default = sse["rule"][0]["apply_server_side_encryption_by_default"][0]
        self.assertIn('var.kms_key_arn == null ? "AES256" : "aws:kms"', default["sse_algorithm"])
        self.assertEqual(default["kms_master_key_id"], "${var.kms_key_arn}")
        self.assertIsNone(self.vars["kms_key_arn"]["default"])

    def test_object_lock_optional_with_default_retention(self):
        bucket = one(self.doc, "resource", "aws_s3_bucket", "this")
        self.assertEqual(bucket["object_lock_enabled"], "${var.object_lock_enabled}")
        self.assertIs(self.vars["object_lock_enabled"]["default"], False)
        lock = one(self.doc, "resource", "aws_s3_bucket_object_lock_configuration", "this")
        self.assertIn("var.object_lock_enabled", lock["count"])
        retention = lock["rule"][0]["default_retention"][0]
        self.assertEqual(retention["mode"], "${var.object_lock_mode}")
        self.assertEqual(retention["days"], "${var.object_lock_days}")
        self.assertIn("${aws_s3_bucket_versioning.this}", lock.get("depends_on", []))

    def test_noncurrent_expiry_not_shorter_than_retention(self):
        bucket = one(self.doc, "resource", "aws_s3_bucket", "this")
        conds = [p["condition"] for p in bucket["lifecycle"][0]["precondition"]]
        self.assertTrue(
            any("var.noncurrent_version_expiration_days >= var.object_lock_days" in c for c in conds),
            conds,
        )

    # ----------------------------------------------------------------------------- bucket policy

    def test_bucket_policy_is_applied(self):
        bp = one(self.doc, "resource", "aws_s3_bucket_policy", "this")
        self.assertEqual(bp["policy"], "${data.aws_iam_policy_document.bucket.json}")

    def test_bucket_policy_denies_non_tls(self):
        found = False
        for for_each, s in statements(self.policy("bucket")):
            if for_each is not None or effect(s) != "Deny":
                continue
            tls = [
                c for c in conditions(s)
                if c["test"] == "Bool" and c["variable"] == "aws:SecureTransport" and c["values"] == ["false"]
            ]
            if not tls:
                continue
            self.assertIn("s3:*", s["actions"])
            principals = s["principals"][0]
            self.assertEqual((principals["type"], principals["identifiers"]), ("*", ["*"]))
            self.assertIn("${aws_s3_bucket.this.arn}", s["resources"])
            self.assertIn("${aws_s3_bucket.this.arn}/*", s["resources"])
            found = True
        self.assertTrue(found, "no unconditional Deny statement on aws:SecureTransport = false")

    def test_bucket_policy_enforces_if_none_match_by_default(self):
        self.assertIs(self.vars["enforce_conditional_writes"]["default"], True)
        found = False
        for for_each, s in statements(self.policy("bucket")):
            if effect(s) != "Deny" or s.get("actions") != ["s3:PutObject"]:
                continue
            for c in conditions(s):
                if c["test"] == "Null" and c["variable"] == "s3:if-none-match" and c["values"] == ["true"]:
                    self.assertIn("var.enforce_conditional_writes", for_each or "")
                    self.assertIn("local.objects_arn", for_each or "")
                    # PutObject is authorised on objects: on any other resource the Deny is void.
                    self.assertEqual(s["resources"], ["${statement.value}"])
                    principals = s["principals"][0]
                    self.assertEqual((principals["type"], principals["identifiers"]), ("*", ["*"]))
                    found = True
        self.assertTrue(found, "no Deny of PutObject without If-None-Match")

    # ----------------------------------------------------------------------------- IAM

    def test_objects_arn_is_scoped_to_the_prefix(self):
        self.assertEqual(self.locals["objects_arn"], "${aws_s3_bucket.this.arn}/${local.prefix}*")

    def test_archiver_cannot_destroy(self):
        actions = allowed_actions(self.policy("archiver"))
        self.assertTrue(actions)
        for a in actions:
            self.assertNotIn(a.lower(), FORBIDDEN_WILDCARDS, f"archiver is allowed {a}")
            for pattern in FORBIDDEN_PATTERNS:
                self.assertFalse(matches(pattern, a), f"archiver is allowed {a} (matches {pattern})")
            for d in DESTRUCTIVE:
                self.assertFalse(matches(a, d), f"archiver action {a} grants {d}")
            self.assertNotIn("*", a, f"archiver action {a} has a wildcard")

    def test_archiver_can_archive(self):
        actions = set(allowed_actions(self.policy("archiver")))
        for needed in ("s3:PutObject", "s3:GetObject", "s3:ListBucket", "s3:GetBucketVersioning",
                       "s3:GetBucketObjectLockConfiguration"):
            self.assertIn(needed, actions)

    def test_archiver_objects_and_listing_scoped_to_prefix(self):
        for name in ("archiver", "restorer", "maintainer"):
            for for_each, s in statements(self.policy(name)):
                if effect(s) != "Allow":
                    continue
                acts = s.get("actions", [])
                if any(a in ("s3:PutObject", "s3:GetObject", "s3:DeleteObject") for a in acts):
                    self.assertEqual(s["resources"], ["${local.objects_arn}"], f"{name}: {s.get('sid')}")
                if "s3:ListBucket" in acts:
                    prefix_conds = [(fe, c) for fe, c in dynamic_blocks(s, "condition")
                                    if c.get("variable") == "s3:prefix"]
                    self.assertEqual(len(prefix_conds), 1, f"{name}: ListBucket without an s3:prefix condition")
                    cond_for_each, cond = prefix_conds[0]
                    self.assertEqual(cond["test"], "StringLike")
                    # The values are the prefix patterns (test_list_prefix_pattern), nothing wider.
                    self.assertIn("local.list_prefix_patterns", cond_for_each)
                    self.assertEqual(cond["values"], "${condition.value}")

    def test_kms_key_usable_only_through_s3(self):
        found = 0
        for name in ("archiver", "restorer", "maintainer"):
            for for_each, s in statements(self.policy(name)):
                if not any(a.startswith("kms:") for a in s.get("actions", [])):
                    continue
                self.assertIn("local.kms_key_arns", for_each or "", name)
                self.assertEqual(s["resources"], ["${statement.value}"], name)
                via = [c for c in conditions(s) if c.get("variable") == "kms:ViaService"]
                self.assertEqual(len(via), 1, f"{name}: KMS without a kms:ViaService condition")
                self.assertEqual(via[0]["values"], ["s3.*.amazonaws.com"])
                found += 1
        self.assertEqual(found, 3)

    def test_role_names_fit_iam(self):
        role = one(self.doc, "resource", "aws_iam_role", "this")
        conds = [p["condition"] for p in role["lifecycle"][0]["precondition"]]
        self.assertTrue(any("length(local.iam_name_prefix) <= 53" in c for c in conds), conds)

    def test_lifecycle_rules_scoped_to_the_repository(self):
        lc = one(self.doc, "resource", "aws_s3_bucket_lifecycle_configuration", "this")
        prefixes = {rule["id"]: rule["filter"][0].get("prefix") for rule in lc["rule"]}
        self.assertEqual(prefixes, {
            "expire-noncurrent-versions": "${local.prefix}",
            "abort-incomplete-multipart-uploads": "",
        })

    def test_list_prefix_pattern(self):
        self.assertIn('["${local.prefix}*"]', self.locals["list_prefix_patterns"])
        self.assertIs(self.vars["allow_bucket_wide_list"]["default"], False)

    def test_archiver_and_restorer_explicitly_deny_destruction(self):
        for name in ("archiver", "restorer"):
            denied = denied_actions(self.policy(name), self.locals)
            for d in DESTRUCTIVE:
                self.assertTrue(any(matches(p, d) for p in denied), f"{name} does not deny {d}")
            self.assertFalse(any(matches(p, "s3:PutObject") for p in denied), f"{name} denies PutObject")
            self.assertFalse(any(matches(p, "s3:GetObject") for p in denied), f"{name} denies GetObject")

    def test_restorer_is_read_only(self):
        actions = allowed_actions(self.policy("restorer"))
        for a in actions:
            self.assertNotIn("*", a)
            for verb in ("s3:Put", "s3:Delete", "s3:Bypass", "s3:Restore", "s3:Replicate"):
                self.assertFalse(a.lower().startswith(verb.lower()), f"restorer is allowed {a}")
        for needed in ("s3:GetObject", "s3:GetObjectVersion", "s3:ListBucket", "s3:ListBucketVersions"):
            self.assertIn(needed, actions)

    def test_maintainer_has_the_deletes_and_no_writes(self):
        doc = self.policy("maintainer")
        actions = allowed_actions(doc)
        self.assertIn("s3:DeleteObject", actions)
        self.assertIn("s3:DeleteObjectVersion", actions)
        for a in actions:
            self.assertNotIn("*", a)
            self.assertFalse(a.lower().startswith("s3:put"), f"maintainer is allowed {a}")
        # Bypassing governance retention only when asked for.
        for for_each, s in statements(doc):
            if "s3:BypassGovernanceRetention" in s.get("actions", []) and effect(s) == "Allow":
                self.assertIn("var.maintainer_can_bypass_governance", for_each or "")
        self.assertIs(self.vars["maintainer_can_bypass_governance"]["default"], False)

    def test_roles_optional(self):
        self.assertIs(self.vars["create_roles"]["default"], False)
        role = one(self.doc, "resource", "aws_iam_role", "this")
        self.assertEqual(role["for_each"], "${local.roles}")
        self.assertIn("var.create_roles", self.locals["roles"])

    # ----------------------------------------------------------------------------- lifecycle

    def lifecycle(self):
        return one(self.doc, "resource", "aws_s3_bucket_lifecycle_configuration", "this")

    def test_lifecycle_expires_noncurrent_versions_and_aborts_multipart(self):
        rules = self.lifecycle()["rule"]
        for r in rules:
            self.assertEqual(r["status"], "Enabled")
        nc = [r for r in rules if "noncurrent_version_expiration" in r]
        self.assertTrue(nc, "no noncurrent_version_expiration rule")
        self.assertEqual(
            nc[0]["noncurrent_version_expiration"][0]["noncurrent_days"],
            "${var.noncurrent_version_expiration_days}",
        )
        ab = [r for r in rules if "abort_incomplete_multipart_upload" in r]
        self.assertTrue(ab, "no abort_incomplete_multipart_upload rule")
        self.assertEqual(
            ab[0]["abort_incomplete_multipart_upload"][0]["days_after_initiation"],
            "${var.abort_incomplete_multipart_upload_days}",
        )

    def test_transitions_off_by_default(self):
        lc = self.lifecycle()
        for r in lc["rule"]:
            self.assertNotIn("transition", r, f"static rule {r.get('id')} has a transition")
        dyn = dynamic_blocks(lc, "rule")
        self.assertEqual(len(dyn), 1)
        for_each, content = dyn[0]
        self.assertEqual(for_each, "${var.transitions}")
        self.assertIn("transition", content)
        self.assertEqual(content["filter"][0]["prefix"], "${local.prefix}${rule.key}/")
        self.assertEqual(self.vars["transitions"]["default"], {})

    def test_transitions_only_for_the_repository_subtrees(self):
        keys = [x for x in self.vars["transitions"]["validation"] if "keys(var.transitions)" in x["condition"]]
        self.assertTrue(keys, "no validation of the transitions' keys")
        self.assertEqual(set(re.findall(r'"([a-z]+)"', keys[0]["condition"])), {"wal", "backups"})

    def test_transition_classes_are_instant_retrieval_only(self):
        validations = self.vars["transitions"]["validation"]
        class_rules = [x for x in validations if "storage_class" in x["condition"] and "contains([" in x["condition"]
                       and "30" not in x["condition"]]
        self.assertTrue(class_rules)
        listed = set(re.findall(r'"([A-Z_]+)"', class_rules[0]["condition"]))
        self.assertEqual(listed, INSTANT_CLASSES)
        self.assertFalse(listed & ARCHIVE_CLASSES)
        self.assertIn("GLACIER", class_rules[0]["error_message"])

    # ----------------------------------------------------------------------------- providers, outputs

    def test_provider_version_pinned(self):
        tf = self.doc["terraform"][0]
        aws = tf["required_providers"][0]["aws"]
        self.assertEqual(aws["source"], "hashicorp/aws")
        self.assertRegex(aws["version"], r">=\s*5")
        self.assertIn("required_version", tf)

    def test_outputs(self):
        outputs = {}
        for item in self.doc.get("output", []):
            outputs.update(item)
        for name in ("bucket_name", "bucket_arn", "archiver_policy_json", "restorer_policy_json",
                     "maintainer_policy_json", "walship_config"):
            self.assertIn(name, outputs)
            self.assertTrue(outputs[name].get("description"), f"output {name} has no description")
        config = outputs["walship_config"]["value"]
        for piece in ("repo = ", "recipients = ", "[s3]", "region = "):
            self.assertIn(piece, config)

    def test_every_variable_documented_and_typed(self):
        for name, body in self.vars.items():
            self.assertTrue(body.get("description"), f"variable {name} has no description")
            self.assertIn("type", body, f"variable {name} has no type")


class ExamplesTest(unittest.TestCase):
    def test_aws_example_uses_the_module(self):
        doc = load_dir(EXAMPLES / "aws")
        modules = {}
        for item in doc.get("module", []):
            modules.update(item)
        self.assertTrue(modules)
        for body in modules.values():
            self.assertEqual(body["source"], "../../modules/walship-bucket")
        self.assertTrue((EXAMPLES / "aws" / "README.md").is_file())

    def test_minio_example(self):
        doc = load_dir(EXAMPLES / "minio")
        tf = doc["terraform"][0]
        self.assertEqual(tf["required_providers"][0]["minio"]["source"], "aminueza/minio")
        versioning = one(doc, "resource", "minio_s3_bucket_versioning", "archive")
        self.assertEqual(versioning["versioning_configuration"][0]["status"], "Enabled")
        ilm = one(doc, "resource", "minio_ilm_policy", "archive")
        self.assertTrue(any("noncurrent_expiration" in r for r in ilm["rule"]))
        self.assertTrue((EXAMPLES / "minio" / "README.md").is_file())

    def test_minio_archiver_matches_module_archiver(self):
        module_allowed = set(allowed_actions(one(load_dir(MODULE), "data", "aws_iam_policy_document", "archiver")))
        module_allowed = {a for a in module_allowed if a.startswith("s3:")}
        minio = locals_(load_dir(EXAMPLES / "minio"))["archiver_actions"]
        minio_actions = {a for group in minio.values() for a in group}
        # s3:HeadBucket is a MinIO-only action (AWS authorizes HEAD bucket as s3:ListBucket).
        self.assertEqual(minio_actions - {"s3:HeadBucket"}, module_allowed)
        for a in minio_actions:
            for d in DESTRUCTIVE:
                self.assertFalse(matches(a, d), f"MinIO archiver action {a} grants {d}")


if __name__ == "__main__":
    unittest.main(verbosity=2)
