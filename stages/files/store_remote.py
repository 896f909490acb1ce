"""The remote store: the store's items in S3-compatible object storage (`store_remote:
s3://bucket/prefix`), so that a team on several clusters makes each item once.

An item is named by its first file's path under the store, `<kind>/<folder>/<file>` (e.g.
`trajectories/<key>/shard-000001.tar`, stages/files/store.py). In the remote it lies at

    <prefix>/<kind>/<folder>/<file>.record.json         its record, as in the local store
    <prefix>/<kind>/<folder>/.objects/<name>.<sha256>   each of its files, named by its content

Every object is written with a conditional write (If-None-Match: "*": the write fails if the object
exists), the record last. So

- a half-pushed item has no record: it is not complete, and nothing pulls it;
- the first record written wins. A second site that made the same item with other last bits (another
  GPU model) finds the record there and leaves it; its objects, named by their content, never mix
  into the winner's item, and its next pull takes the remote's bytes in place of its own;
- an object named by its content is the same whoever writes it: two pushers of the same bytes share it.

`pull` reads the record, downloads each file it names under a temporary name, checks its size and
sha256 against the record, renames it into place, and writes the local record last; an object that
does not match stops the pull naming it. `Remote.complete` answers for many items with one LIST per
folder (a page holds 1000 records; a folder's objects fold into one common prefix), so planning a
row of hundreds of shards costs a handful of requests, not one per object.

The remote must honour conditional writes (AWS S3 does; so do current MinIO, Ceph RGW and R2).
Credentials and the endpoint come from boto3's standard places: the environment (AWS_PROFILE,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3 for a service other than AWS),
~/.aws/config and ~/.aws/credentials, an instance role; never from the workflow's config.
"""

import hashlib
import json
import os
import posixpath
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import boto3
import botocore.exceptions

from stages.files import atomic, store

RECORD_SUFFIX = ".record.json"
OBJECTS = ".objects"
PART_BYTES = 64 << 20  # multipart upload above this size, in parts of this size
PARTS_IN_FLIGHT = 4
LIST_PAGE = 1000  # names per LIST request (S3's most)


class RemoteError(Exception):
    """What a remote operation could not do, with what to do about it."""


class DamagedObject(RemoteError):
    """An object whose bytes do not match the record that names it."""


def item_name(files):
    """The item's name in any store: its first file's `<kind>/<folder>/<file>`."""
    return "/".join(Path(files[0]).parts[-3:])


def plain_name(part):
    """A name that stays in its folder (no separator, not . or ..)."""
    return bool(part) and part not in (".", "..") and "/" not in part and "\\" not in part


def parse(url):
    """s3://bucket/prefix -> (bucket, prefix without slashes at its ends)."""
    u = urlparse(url)
    if u.scheme != "s3" or not u.netloc:
        raise RemoteError(f"store_remote: {url!r} is not s3://bucket/prefix")
    return u.netloc, u.path.strip("/")


def precondition_failed(err):
    return err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412")


def conflicting_write(err):
    """AWS answers 409 to a conditional write that races another one on the same key: try again."""
    return err.response.get("Error", {}).get("Code") == "ConditionalRequestConflict"


class Remote:
    def __init__(self, url, client=None):
        self.url = url.rstrip("/")
        self.bucket, self.prefix = parse(url)
        self.s3 = client or boto3.session.Session().client("s3")

    def key(self, name):
        return f"{self.prefix}/{name}" if self.prefix else name

    def where(self, name):
        return f"s3://{self.bucket}/{self.key(name)}"

    @staticmethod
    def object_name(item, file_name, sha256):
        return f"{posixpath.dirname(item)}/{OBJECTS}/{file_name}.{sha256}"

    # ---- reading ---------------------------------------------------------------------------

    def list_names(self, folder, delimiter=True):
        """The names under `folder/` (one LIST request per 1000): objects, and with the delimiter
        the sub-folders as names ending in '/'."""
        kwargs = {"Bucket": self.bucket, "Prefix": self.key(folder).rstrip("/") + "/" if folder else
                  (self.prefix + "/" if self.prefix else "")}
        if delimiter:
            kwargs["Delimiter"] = "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in self.s3.get_paginator("list_objects_v2").paginate(**kwargs,
                                                                      PaginationConfig={"PageSize": LIST_PAGE}):
            for obj in page.get("Contents", []):
                yield obj["Key"][strip:]
            for sub in page.get("CommonPrefixes", []):
                yield sub["Prefix"][strip:]

    def complete(self, names):
        """The items among `names` whose record is in the remote: one LIST per folder."""
        folders = defaultdict(set)
        for name in names:
            folders[posixpath.dirname(name)].add(name)
        found = set()
        for folder, wanted in folders.items():
            try:
                records = {n[:-len(RECORD_SUFFIX)] for n in self.list_names(folder) if n.endswith(RECORD_SUFFIX)}
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
                raise RemoteError(
                    f"store_remote {self.url}: cannot list {self.where(folder)}/ ({e}). Credentials and the endpoint "
                    "come from the environment or a profile (AWS_PROFILE, AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3 for a service other than AWS)") from e
            found |= wanted & records
        return found

    def items(self, folders=lambda kind_folder: True):
        """The item names in the remote, in the folders (`<kind>/<folder>`) that `folders` accepts: a
        LIST for the kinds, one per kind, and one per accepted folder."""
        for kind in self.list_names(""):
            if not kind.endswith("/"):
                continue
            for folder in self.list_names(kind):
                if folder.endswith("/") and folders(folder.rstrip("/")):
                    for n in self.list_names(folder):
                        if n.endswith(RECORD_SUFFIX):
                            yield n[:-len(RECORD_SUFFIX)]

    def record(self, name):
        """The item's record in the remote, or None if it has none (not complete there)."""
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=self.key(name + RECORD_SUFFIX))["Body"].read()
        except botocore.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        try:
            record = json.loads(body)
        except json.JSONDecodeError:
            raise DamagedObject(f"{self.where(name + RECORD_SUFFIX)}: not JSON; the remote's record of {name} "
                                "is damaged: delete it (the item is then not complete there) and push a good "
                                "copy again") from None
        if record.get("format") != store.RECORD_FORMAT:
            raise RemoteError(f"{self.where(name + RECORD_SUFFIX)}: format {record.get('format')!r}, expected "
                              f"{store.RECORD_FORMAT!r}: written by another version of the pipeline")
        return record

    # ---- pull --------------------------------------------------------------------------------

    def pull(self, files, record=None):
        """Download the item into the local files `files` (its record's names), each checked
        against the remote record's size and sha256, then write the local record. The caller holds
        the item's lock. A local copy with other bytes is replaced: the remote's copy wins."""
        files = [Path(f) for f in files]
        name = item_name(files)
        record = record or self.record(name)
        if record is None:
            raise RemoteError(f"{name}: not complete in the remote {self.url} (no record); rerun the workflow, "
                              "which plans the job that makes it")
        entries = {e["name"]: e for e in record["files"]}
        if not all(map(plain_name, [*name.split("/"), *entries])) or len(name.split("/")) != 3:
            raise RemoteError(f"{self.where(name + RECORD_SUFFIX)}: names files outside their folder; not pulled")
        if sorted(entries) != sorted(f.name for f in files):
            raise RemoteError(f"{self.where(name + RECORD_SUFFIX)}: records the files {sorted(entries)}, "
                              f"this item has {sorted(f.name for f in files)}")
        # incomplete until every file is in place, and never adopted half replaced (store.py)
        files[0].parent.mkdir(parents=True, exist_ok=True)
        store.remaking_path(files).touch()
        store.record_path(files).unlink(missing_ok=True)
        for f in files:
            entry = entries[f.name]
            obj = self.object_name(name, f.name, entry["sha256"])
            with atomic.atomic_path(f) as tmp:
                try:
                    self.s3.download_file(self.bucket, self.key(obj), str(tmp))
                except botocore.exceptions.ClientError as e:
                    if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                        raise DamagedObject(f"{self.where(obj)}: missing, though the record "
                                            f"{self.where(name + RECORD_SUFFIX)} names it; delete that record "
                                            "(the item is then not complete there) and push a good copy") from None
                    raise
                size, sha = os.path.getsize(tmp), atomic.sha256_file(tmp)
                if (size, sha) != (entry["bytes"], entry["sha256"]):
                    raise DamagedObject(
                        f"{self.where(obj)}: damaged: {size} bytes, sha256 {sha[:12]}..., the record says "
                        f"{entry['bytes']} bytes, sha256 {entry['sha256'][:12]}...; nothing of {name} was taken. "
                        f"Delete the record {self.where(name + RECORD_SUFFIX)} and that object, then push a "
                        "good copy (or let the workflow make it)")
        local = {**record, "pulled": {"from": self.url, "by": store.who(), "at": store.now()}}
        atomic.write_json(store.record_path(files), local)
        store.remaking_path(files).unlink(missing_ok=True)
        return local

    # ---- push --------------------------------------------------------------------------------

    def put_new(self, key, **kwargs):
        """put_object with If-None-Match: "*"; False if the object exists."""
        for attempt in range(5):
            try:
                self.s3.put_object(Bucket=self.bucket, Key=key, IfNoneMatch="*", **kwargs)
                return True
            except botocore.exceptions.ClientError as e:
                if precondition_failed(e):
                    return False
                if not conflicting_write(e) or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def upload_new(self, path, key, sha256):
        """Upload the file to `key` unless an object is there, checking that what is sent has the
        sha256 its record names (a local file damaged since it was recorded is not pushed)."""
        size = os.path.getsize(path)
        if size <= PART_BYTES:
            data = Path(path).read_bytes()
            if hashlib.sha256(data).hexdigest() != sha256:
                raise DamagedObject(f"{path}: does not match its record; not pushed ({store.remake_command(None)}, "
                                    "or verify it with the store command)")
            return self.put_new(key, Body=data)
        upload = self.s3.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        try:
            parts, digest = [], hashlib.sha256()
            with open(path, "rb") as f, ThreadPoolExecutor(PARTS_IN_FLIGHT) as pool:
                pending = []
                while block := f.read(PART_BYTES):
                    digest.update(block)
                    number = len(pending) + 1
                    pending.append(pool.submit(self.s3.upload_part, Bucket=self.bucket, Key=key, UploadId=upload,
                                               PartNumber=number, Body=block))
                    if number > PARTS_IN_FLIGHT:  # bounded memory: at most this many parts held at once
                        pending[number - 1 - PARTS_IN_FLIGHT].result()
                parts = [{"ETag": p.result()["ETag"], "PartNumber": i + 1} for i, p in enumerate(pending)]
            if digest.hexdigest() != sha256:
                raise DamagedObject(f"{path}: does not match its record; not pushed")
            for attempt in range(5):
                try:
                    self.s3.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload,
                                                      MultipartUpload={"Parts": parts}, IfNoneMatch="*")
                    return True
                except botocore.exceptions.ClientError as e:
                    if precondition_failed(e):
                        self.s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
                        return False
                    if not conflicting_write(e) or attempt == 4:
                        raise
                    time.sleep(0.2 * (attempt + 1))
        except BaseException:
            try:
                self.s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
            except botocore.exceptions.ClientError:
                pass
            raise

    def push(self, files, present=None):
        """Upload a complete local item: its files, then its record, each only if absent. Returns
        what happened, in words. `present`: the object names already in the item's folder, if the
        caller listed them (push_many); else they are listed here."""
        files = [str(f) for f in files]
        name = item_name(files)
        record = store.read_record(files)
        if record is None:
            raise RemoteError(f"{name}: not complete in the local store ({store.record_path(files)}); nothing pushed")
        shared = {k: v for k, v in record.items() if k != "pulled"}
        theirs = self.record(name)
        if theirs is None:
            if present is None:
                present = set(self.list_names(f"{posixpath.dirname(name)}/{OBJECTS}"))
            for f, entry in zip(files, record["files"], strict=True):
                obj = self.object_name(name, entry["name"], entry["sha256"])
                if obj not in present:
                    self.upload_new(f, self.key(obj), entry["sha256"])
            if self.put_new(self.key(name + RECORD_SUFFIX), Body=json.dumps(shared, indent=2, sort_keys=True).encode(),
                            ContentType="application/json"):
                return f"pushed {name}"
            theirs = self.record(name)
            if theirs == shared:  # a retried write whose first attempt had landed
                return f"pushed {name}"
        if [e["sha256"] for e in theirs["files"]] == [e["sha256"] for e in record["files"]]:
            return f"{name}: in the remote already"
        return (f"{name}: the remote holds another copy (made by {theirs['made']['by']} at {theirs['made']['at']}), "
                "which stays: the first complete copy wins. `pull` replaces the local copy with it")

    def push_many(self, items):
        """push() each item (a list of its files), listing each folder's objects once."""
        by_folder = defaultdict(list)
        for files in items:
            by_folder[posixpath.dirname(item_name(files))].append(files)
        for folder, group in by_folder.items():
            present = set(self.list_names(f"{folder}/{OBJECTS}"))
            for files in group:
                try:
                    yield files, self.push(files, present)
                except RemoteError as e:
                    yield files, e


def remote_complete(url, names, client=None):
    """For planning: the items among `names` (`<kind>/<folder>/<file>`, item_name) that are complete
    in the remote store `url`; one LIST request per folder and page of 1000."""
    return Remote(url, client).complete(names)
