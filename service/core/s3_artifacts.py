"""The artifact store on S3-compatible object storage (AWS S3, MinIO, Ceph radosgw, ...), for
workers and API replicas that share no disk: MODELSHRINK_ARTIFACT_URL=s3://bucket/prefix
(MODELSHRINK_S3_ENDPOINT_URL for a non-AWS endpoint; credentials from the usual AWS variables).

Objects are the truth; each process keeps a local cache under its artifact directory, because ONNX
Runtime, numpy and the HTTP file responses read files. Writes go to the cache atomically, then to the
bucket (boto3's transfer manager: streamed, multipart above 64 MiB) with the SHA-256 kept as object
metadata; a read of a key this process has not cached downloads it first (to a temp file, renamed).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from service.core.artifacts import ArtifactStore, sha256_of

MULTIPART_THRESHOLD = 64 * 1024 * 1024


def parse_url(url: str) -> tuple[str, str]:
    """s3://bucket/prefix -> (bucket, prefix without slashes at the ends)."""
    if not url.startswith("s3://") or len(url) <= 5:
        raise ValueError(f"artifact URL must look like s3://bucket/prefix, not {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix.strip("/")


class S3ArtifactStore(ArtifactStore):
    def __init__(self, url: str, cache_root: Path, endpoint_url: str | None = None, client: Any = None, public_endpoint_url: str | None = None) -> None:
        super().__init__(cache_root)
        import boto3
        from boto3.s3.transfer import TransferConfig

        self.bucket, self.prefix = parse_url(url)
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url)
        # Presigned URLs carry the host they were signed for: the one clients reach, if it differs.
        self.signer = boto3.client("s3", endpoint_url=public_endpoint_url) if public_endpoint_url else self.client
        self.transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)

    def object_key(self, key: str) -> str:
        self.local_path(key)  # the same key validation as the local store
        return f"{self.prefix}/{key}" if self.prefix else key

    def _upload(self, key: str, local: Path) -> None:
        self.client.upload_file(str(local), self.bucket, self.object_key(key), Config=self.transfer,
                                ExtraArgs={"Metadata": {"sha256": sha256_of(local)}})

    def path(self, key: str) -> Path:
        local = self.local_path(key)
        if not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=".tmp-", suffix=".part")
            os.close(fd)
            try:
                self.client.download_file(self.bucket, self.object_key(key), tmp, Config=self.transfer)
                os.replace(tmp, local)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return local

    def presigned_url(self, key: str, filename: str, expires_s: int) -> str:
        params = {"Bucket": self.bucket, "Key": self.object_key(key), "ResponseContentDisposition": f'attachment; filename="{filename}"'}
        return str(self.signer.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s))

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))
            return True
        except ClientError:
            return False

    @contextmanager
    def writer(self, key: str) -> Iterator[BinaryIO]:
        with super().writer(key) as fh:
            yield fh
        self._upload(key, self.local_path(key))

    def import_file(self, key: str, source: Path) -> None:
        super().import_file(key, source)
        self._upload(key, self.local_path(key))

    def delete_prefix(self, key: str) -> None:
        prefix = self.object_key(key)
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", []) if o["Key"] == prefix or o["Key"].startswith(prefix + "/")]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})
        super().delete_prefix(key)
