"""The baseline's upload and download: one archive to or from S3, streamed with obstore.

    python3 bench/s3copy.py put FILE s3://BUCKET/KEY
    python3 bench/s3copy.py get s3://BUCKET/KEY FILE
"""

from __future__ import annotations

import sys
from datetime import timedelta

import obstore
from obstore.store import S3Store


def store(url: str) -> tuple[S3Store, str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return S3Store(bucket, client_options={"allow_http": True,
                                           "timeout": timedelta(seconds=300)}), key


def main() -> None:
    verb, a, b = sys.argv[1:4]
    if verb == "put":
        s, key = store(b)
        with open(a, "rb") as f:
            obstore.put(s, key, f, chunk_size=8 << 20, max_concurrency=4)
    else:
        s, key = store(a)
        with open(b, "wb") as f:
            for block in obstore.get(s, key).stream(min_chunk_size=1 << 20):
                f.write(block)


if __name__ == "__main__":
    main()
