#!/usr/bin/env python3
"""One timed transfer with the stock S3 client, boto3's managed transfers, for the s3-upload
benchmark.

Usage: s3-transfer.py ENDPOINT upload BUCKET KEY FILE|- [MAX_CONCURRENCY]
       s3-transfer.py ENDPOINT download BUCKET KEY FILE [MAX_CONCURRENCY]

upload: `upload_fileobj` of FILE (opened for reading) as KEY, or of `sys.stdin.buffer`
with `-` (the end of a pipeline: boto3 reads the stream as it comes and holds each part
in memory until it is sent). download: `download_fileobj` of KEY into FILE (opened for
writing; /dev/null to measure the transfer alone). Both with boto3's default
TransferConfig (8 MiB parts or ranges, 10 threads), or that with MAX_CONCURRENCY threads
(parts or ranges in flight) if given; the client addresses ENDPOINT path-style, region
us-east-1, everything else boto3's defaults. Credentials come from the standard
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).

Prints one JSON object on stdout: "seconds" (wall time of the transfer call alone, after the
interpreter started and the client was made), "bytes" (the bytes moved; null for an
upload of stdin, which is not counted) and "peak_rss_bytes" (this process's peak RSS,
getrusage's ru_maxrss). Exits 1 with the error on stderr if the transfer failed, 2 on a
usage error.
"""

import json
import os
import resource
import sys
import time

import boto3
import boto3.s3.transfer
import botocore.config


def main():
    if len(sys.argv) not in (6, 7) or sys.argv[2] not in ("upload", "download"):
        print(__doc__, file=sys.stderr)
        return 2
    endpoint, operation, bucket, key, path = sys.argv[1:6]
    config = boto3.s3.transfer.TransferConfig()
    if len(sys.argv) == 7:
        config = boto3.s3.transfer.TransferConfig(max_concurrency=int(sys.argv[6]))
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=botocore.config.Config(s3={"addressing_style": "path"}),
    )
    try:
        if operation == "upload" and path == "-":
            size = None
            started = time.monotonic()
            client.upload_fileobj(sys.stdin.buffer, bucket, key, Config=config)
            seconds = time.monotonic() - started
        elif operation == "upload":
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                started = time.monotonic()
                client.upload_fileobj(f, bucket, key, Config=config)
                seconds = time.monotonic() - started
        else:
            with open(path, "wb") as f:
                started = time.monotonic()
                client.download_fileobj(bucket, key, f, Config=config)
                seconds = time.monotonic() - started
            size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
    except Exception as e:  # noqa: BLE001 - any failure ends the benchmark, with its reason
        print(f"s3-transfer.py: {operation} of {key} against {endpoint} failed: {e}", file=sys.stderr)
        return 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "bytes": size, "peak_rss_bytes": peak}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
