#!/usr/bin/env python3
"""One S3 call with the stock boto3 client (Debian's python3-boto3), for the tests.

Usage: s3.py ENDPOINT OPERATION [JSON_PARAMETERS]

ENDPOINT is the S3 endpoint URL (path-style addressing, region us-east-1); OPERATION is a
boto3 client method name (put_object, get_object_retention, ...); JSON_PARAMETERS is an
object of its keyword arguments, as boto3 documents them (timestamps as ISO 8601 strings).
One extra parameter: "BodyFile": a path whose bytes become "Body".

Credentials come from the standard environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).

Prints one JSON object on stdout: {"ok": RESPONSE}, timestamps in RFC 3339 and a streamed
"Body" read and given as "Body" (text, undecodable bytes replaced), "BodyLength" and
"BodySha256"; or {"error": {"Code": ..., "Message": ..., "HTTPStatusCode": ...}} when the
server refused the call. Exits 0 in both cases; exits 2 on a usage error or when the server
cannot be reached.
"""

import hashlib
import json
import sys

import boto3
import botocore.config
import botocore.exceptions


def as_json(value):
    """Timestamps as RFC 3339 (boto3 gives datetimes), anything else as its str()."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def main():
    if len(sys.argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    endpoint, operation = sys.argv[1], sys.argv[2]
    params = json.loads(sys.argv[3]) if len(sys.argv) == 4 else {}
    if "BodyFile" in params:
        with open(params.pop("BodyFile"), "rb") as f:
            params["Body"] = f.read()
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=botocore.config.Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
        ),
    )
    try:
        response = getattr(client, operation)(**params)
    except botocore.exceptions.ClientError as e:
        error = e.response.get("Error", {})
        meta = e.response.get("ResponseMetadata", {})
        out = {
            "Code": error.get("Code"),
            "Message": error.get("Message"),
            "HTTPStatusCode": meta.get("HTTPStatusCode"),
        }
        print(json.dumps({"error": out}))
        return 0
    except botocore.exceptions.BotoCoreError as e:
        print(f"s3.py: {operation} against {endpoint} failed: {e}", file=sys.stderr)
        return 2
    response.pop("ResponseMetadata", None)
    body = response.get("Body")
    if body is not None and hasattr(body, "read"):
        data = body.read()
        response["Body"] = data.decode("utf-8", errors="replace")
        response["BodyLength"] = len(data)
        response["BodySha256"] = hashlib.sha256(data).hexdigest()
    print(json.dumps({"ok": response}, default=as_json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
