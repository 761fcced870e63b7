"""moto's standalone S3 server on loopback, in memory (what the S3 store is tested against)."""

from __future__ import annotations

from collections.abc import Sequence

from cvmfs_ml.testing.service import LOOPBACK, Service

__all__ = ["MotoS3"]


class MotoS3(Service):
    """moto's standalone S3 server (``moto_server``, the one s3fs tests against), in memory.

    ``url`` is the S3 endpoint and also the plain-HTTP root clients read buckets from
    (``{url}/BUCKET/KEY``, path-style). :meth:`s3_params` gives upstream's ``CVMFS_S3_*``
    settings for it; any access key is accepted.
    """

    binary = "moto_server"

    def s3_params(self, bucket: str) -> dict[str, str]:
        return {
            "CVMFS_S3_HOST": LOOPBACK,
            "CVMFS_S3_PORT": str(self.port),
            "CVMFS_S3_BUCKET": bucket,
            "CVMFS_S3_ACCESS_KEY": "testing",
            "CVMFS_S3_SECRET_KEY": "testing",
            "CVMFS_S3_DNS_BUCKETS": "false",
        }

    def create_bucket(self, bucket: str) -> None:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=bucket)

    def _prepare(self) -> None:
        pass

    def _command(self) -> Sequence[str]:
        return [self.binary_path, "-H", LOOPBACK, "-p", str(self.port)]
