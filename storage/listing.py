"""Every object under a folder of an object store, with its size, from concurrent listings.

A recursive listing of S3 is one request per 1,000 objects, each waiting for the one before (the
next page's token is in its answer): 10,000 jobs of about six objects each are 60 requests in a
row. Here a folder is split by the first character of the names under it and the parts are
listed at once (at most `CONCURRENCY` requests in flight). Job ids and claim names are hex, so
sixteen prefix listings (`…/0` … `…/f`) start straight away; beside them a delimiter listing of the
folder's direct names (one entry per job, no object sizes or dates) finds any name that starts
with another character, which is then listed too. So every object under the folder is listed
exactly once, whatever its name; nothing is inferred from a name's shape.

Only S3 (s3fs) is split; other filesystems (memory://, gcs://…) get one recursive `find`.
Imports the standard library and fsspec.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fsspec.asyn import sync

HEX = "0123456789abcdef"
CONCURRENCY = 16  # list requests in flight at once (botocore's pool holds 10 connections by default)
PAGE_SIZE = 1000  # S3's largest page


def list_objects(fs: Any, folders: list[str], page_size: int = PAGE_SIZE,
                 concurrency: int = CONCURRENCY) -> list[dict[str, int]]:
    """For each folder (a path of `fs`: `bucket/key` on S3): {path below the folder: size in bytes}
    of every object under it, at any depth; {} for a folder that holds nothing (or whose bucket
    does not exist). All folders are listed at once."""
    if _is_s3(fs):
        return sync(fs.loop, _list_s3, fs, folders, page_size, concurrency)
    return [_find(fs, folder) for folder in folders]


def is_folder_marker(key: str, size: int) -> bool:
    """An empty object whose key ends in "/" marks a folder, it is not a file: the S3 console's "Create
    folder" writes one, and SeaweedFS lists an emptied folder as one. A "…/" key holding bytes is a
    file (AWS S3 and moto store them), so it is listed, and `verify` reports it."""
    return key.endswith("/") and size == 0


def _is_s3(fs: Any) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "s3" in protocols and hasattr(fs, "_call_s3")


def _find(fs: Any, folder: str) -> dict[str, int]:
    try:
        found = fs.find(folder, detail=True)
    except FileNotFoundError:
        return {}
    prefix_len = len(fs._strip_protocol(folder).rstrip("/")) + 1
    return {fs._strip_protocol(path)[prefix_len:]: int(info.get("size") or 0) for path, info in found.items()}


async def _list_s3(fs: Any, folders: list[str], page_size: int, concurrency: int) -> list[dict[str, int]]:
    gate = asyncio.Semaphore(concurrency)

    async def listing(bucket: str, prefix: str, delimiter: str = "") -> tuple[dict[str, int], list[str]]:
        """({key: size}, [common prefix]) of every page of one listing, page after page."""
        objects: dict[str, int] = {}
        common: list[str] = []
        request: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
        if delimiter:
            request["Delimiter"] = delimiter
        while True:
            async with gate:
                answer = await fs._call_s3("list_objects_v2", **request)
            objects.update((item["Key"], int(item["Size"])) for item in answer.get("Contents", ()))
            common += [item["Prefix"] for item in answer.get("CommonPrefixes", ())]
            if not answer.get("IsTruncated"):
                return objects, common
            request["ContinuationToken"] = answer["NextContinuationToken"]

    async def one_folder(folder: str) -> dict[str, int]:
        bucket, key, _ = fs.split_path(folder)
        prefix = f"{key.strip('/')}/" if key.strip("/") else ""
        parts = [asyncio.ensure_future(listing(bucket, prefix, "/"))]  # the census of direct names
        parts += [asyncio.ensure_future(listing(bucket, prefix + c)) for c in HEX]
        try:
            direct, subfolders = await parts[0]
            names = [k[len(prefix):] for k in direct] + [p[len(prefix):] for p in subfolders]
            others = sorted({name[0] for name in names if name} - set(HEX))
            parts += [asyncio.ensure_future(listing(bucket, prefix + c)) for c in others]
            found = dict(direct)
            for part in parts[1:]:
                found.update((await part)[0])
        except FileNotFoundError:  # no such bucket
            return {}
        finally:
            for part in parts:
                part.cancel()  # a no-op on those done; stops the rest if one failed
        return {k[len(prefix):]: size for k, size in found.items() if len(k) > len(prefix) and not is_folder_marker(k, size)}

    return list(await asyncio.gather(*(one_folder(folder) for folder in folders)))
