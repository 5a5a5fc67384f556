#!/usr/bin/env python3
"""An independent checker of the mongodump archive format: not Ferry's reader.

Usage: check_mongo_archive.py ARCHIVE   (a path, or - for standard input)

Reads a decrypted, decompressed archive and checks it against the rules of the stock reader,
mongo-tools' `common/archive` package (github.com/mongodb/mongo-tools, read at commit
8fa3cfc8263b9cead37912d7b0447766143c3e3a), which `mongorestore --archive` runs:

- `spec.md`: magic number 0x8199e26d (little-endian), then the prelude, then blocks.
- `parser.go`: a block is a header BSON document, zero or more body documents and the
  terminator 0xffffffff; a document is 5 bytes to 16 MiB (`db.MaxBSONSize`) long and ends with
  a NUL byte; a terminator where a block header belongs ("consecutive terminators") and a
  truncated block are corruption.
- `prelude.go`: the prelude is one block: the archive header `{concurrent_collections int32,
  version, server_version, tool_version}` and one `{db, collection, metadata, size, type}`
  document per namespace, then the terminator.
- `archive.go`: a namespace header holds exactly `db` (string), `collection` (string), `EOF`
  (bool) and `CRC` (int64, read as the bits of a uint64); any other field is refused.
- `demultiplexer.go`: a header with an empty collection is refused; a namespace is opened by its
  first header and closed by its EOF header; a header for a namespace already closed is refused
  ("namespace header for already opened namespace"); body documents after an EOF header are
  refused; the CRC of the EOF header must equal the CRC of every document of the namespace;
  at the end no namespace may be left open ("contained files were unfinished") and every
  namespace of the prelude must have been closed ("archive finished before all collections
  were seen"). A time-series collection's data lives under `system.buckets.<name>` when the
  source server is older than 8.3.
- `multiplexer.go`: the CRC is Go's `crc64.New(crc64.MakeTable(crc64.ECMA))` fed every document
  of the namespace: CRC-64 with the reflected ECMA-182 polynomial 0xC96C5795D7870F42, the
  register inverted before and after (the CRC-64/XZ parameters; check value of "123456789" is
  0x995DC9BBDF1939FA).
- `mongodump/oplog_dump.go`: the oplog window is `ts >= start and ts <= end` and the start entry
  exists, so a dump's oplog namespace (db "", collection "oplog") is never empty; mongorestore
  --oplogReplay fails on an empty one. Each entry needs `ts` (timestamp), `op` and `ns`.
- `mongodump/metadata_dump.go` and `common/db/namespaces.go`: the metadata is canonical
  Extended JSON `{options, indexes, uuid, collectionName, type}`; `uuid` is the hex of the
  collection's UUID (binary subtype 4), which `mongorestore --preserveUUID` reads.

On success prints a JSON summary (namespaces with their document counts and metadata, the
oplog's entry count and first and last timestamps) and exits 0; on the first violation prints
what is wrong and where to stderr and exits 1. Needs pymongo's `bson` package only.
"""

import json
import re
import struct
import sys

import bson
from bson import json_util

MAGIC = 0x8199E26D
TERMINATOR = 0xFFFFFFFF
MIN_BSON = 5
MAX_BSON = 16 * 1024 * 1024
ECMA_REFLECTED = 0xC96C5795D7870F42
MASK = 0xFFFFFFFFFFFFFFFF


class ArchiveError(Exception):
    """A violation of the format, with where it was found."""


def _crc_table():
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ ECMA_REFLECTED if crc & 1 else crc >> 1
        table.append(crc)
    return table


CRC_TABLE = _crc_table()


class Crc64:
    """Go's hash/crc64 with the ECMA table: Write appends, Sum64 reads."""

    def __init__(self):
        self.crc = 0

    def write(self, data):
        crc = self.crc ^ MASK
        table = CRC_TABLE
        for b in data:
            crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
        self.crc = crc ^ MASK

    def sum64(self):
        return self.crc


class Reader:
    """Reads length-prefixed blocks as mongo-tools' parser does."""

    def __init__(self, data):
        self.data = data
        self.pos = 0

    def at_end(self):
        return self.pos == len(self.data)

    def bson_or_terminator(self, what):
        """Returns None for a terminator, else the raw document bytes."""
        at = self.pos
        if at + 4 > len(self.data):
            raise ArchiveError(f"truncated at byte {at}: no length or terminator for {what}")
        (size,) = struct.unpack_from("<I", self.data, at)
        if size == TERMINATOR:
            self.pos += 4
            return None
        if size < MIN_BSON or size > MAX_BSON:
            raise ArchiveError(
                f"byte {at}: {size} is neither a valid BSON length nor a terminator ({what})"
            )
        if at + size > len(self.data):
            raise ArchiveError(f"truncated at byte {at}: {what} claims {size} bytes")
        raw = self.data[at : at + size]
        if raw[-1] != 0:
            raise ArchiveError(f"byte {at}: {what} does not end with a NUL byte")
        self.pos += size
        return raw


def decode(raw, what, at):
    try:
        return bson.decode(raw)
    except Exception as e:  # noqa: BLE001 - any decoding failure is the finding
        raise ArchiveError(f"byte {at}: {what} is not valid BSON: {e}") from e


def raw_fields(raw, at):
    """The (name, BSON type byte) pairs of a document's top level, walked on its bytes (the
    fields a namespace header may hold: strings, booleans, integers, doubles, documents)."""
    fixed = {0x01: 8, 0x08: 1, 0x0A: 0, 0x10: 4, 0x11: 8, 0x12: 8, 0x09: 8}
    fields = []
    pos = 4
    while raw[pos] != 0:
        type_byte = raw[pos]
        end = raw.index(b"\x00", pos + 1)
        name = raw[pos + 1 : end].decode()
        pos = end + 1
        if type_byte in fixed:
            pos += fixed[type_byte]
        elif type_byte == 0x02:
            pos += 4 + struct.unpack_from("<i", raw, pos)[0]
        elif type_byte in (0x03, 0x04):
            pos += struct.unpack_from("<i", raw, pos)[0]
        elif type_byte == 0x05:
            pos += 5 + struct.unpack_from("<i", raw, pos)[0]
        else:
            raise ArchiveError(
                f"byte {at}: namespace header field {name!r} has BSON type {type_byte:#x}"
            )
        fields.append((name, type_byte))
    return fields


def namespace_header(raw, at):
    """A namespace header as archive.go's NamespaceHeader.UnmarshalBSON reads it."""
    doc = decode(raw, "namespace header", at)
    types = {"db": 0x02, "collection": 0x02, "EOF": 0x08, "CRC": 0x12}
    names = {"db": "string", "collection": "string", "EOF": "bool", "CRC": "int64"}
    for name, type_byte in raw_fields(raw, at):
        if name not in types:
            raise ArchiveError(f"byte {at}: namespace header has unknown field {name!r}: {doc}")
        if type_byte != types[name]:
            raise ArchiveError(
                f"byte {at}: namespace header field {name!r} is BSON type {type_byte:#x}, "
                f"not {names[name]}: {doc}"
            )
    if not doc.get("collection"):
        raise ArchiveError(f"byte {at}: namespace header is missing a collection: {doc}")
    crc = int(doc.get("CRC", 0)) & MASK
    return doc.get("db", ""), doc["collection"], bool(doc.get("EOF", False)), crc


def server_before_8_3(version):
    m = re.match(r"^(\d+)\.(\d+)", version or "")
    return bool(m) and (int(m.group(1)), int(m.group(2))) < (8, 3)


def check_metadata(c, at):
    """The prelude's metadata string, as mongorestore parses it."""
    ns = f"{c['db']}.{c['collection']}"
    if c["metadata"] == "":
        return {}
    try:
        meta = json_util.loads(c["metadata"])
    except Exception as e:  # noqa: BLE001
        raise ArchiveError(f"byte {at}: metadata of {ns} is not Extended JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ArchiveError(f"byte {at}: metadata of {ns} is not a document")
    if meta.get("collectionName", c["collection"]) != c["collection"]:
        raise ArchiveError(f"byte {at}: metadata of {ns} names {meta.get('collectionName')!r}")
    if not isinstance(meta.get("indexes", []), list):
        raise ArchiveError(f"byte {at}: metadata of {ns}: indexes is not an array")
    if "options" in meta and not isinstance(meta["options"], dict):
        raise ArchiveError(f"byte {at}: metadata of {ns}: options is not a document")
    uuid = meta.get("uuid")
    if uuid is not None and not re.fullmatch(r"[0-9a-f]{32}", str(uuid)):
        raise ArchiveError(f"byte {at}: metadata of {ns}: uuid {uuid!r} is not 32 hex digits")
    return meta


def check(data):
    r = Reader(data)
    if len(data) < 4 or struct.unpack_from("<I", data, 0)[0] != MAGIC:
        raise ArchiveError("not a mongodump archive: the magic number 0x8199e26d is missing")
    r.pos = 4

    # The prelude: one block.
    at = r.pos
    raw = r.bson_or_terminator("the archive header")
    if raw is None:
        raise ArchiveError(f"byte {at}: a terminator where the archive header belongs")
    header = decode(raw, "archive header", at)
    if not isinstance(header.get("concurrent_collections"), int) or isinstance(
        header.get("concurrent_collections"), bson.Int64
    ):
        raise ArchiveError(f"byte {at}: header concurrent_collections is not an int32: {header}")
    if header.get("version") != "0.1":
        raise ArchiveError(f"byte {at}: archive format version {header.get('version')!r}, not 0.1")
    for f in ("server_version", "tool_version"):
        if not isinstance(header.get(f, ""), str):
            raise ArchiveError(f"byte {at}: header {f} is not a string")
    prelude = []
    while True:
        at = r.pos
        raw = r.bson_or_terminator("collection metadata")
        if raw is None:
            break
        c = decode(raw, "collection metadata", at)
        for f in ("db", "collection", "metadata", "type"):
            if not isinstance(c.get(f, ""), str):
                raise ArchiveError(f"byte {at}: collection metadata {f} is not a string: {c}")
        if not c.get("collection"):
            raise ArchiveError(f"byte {at}: collection metadata without a collection: {c}")
        if not isinstance(c.get("size", 0), int):
            raise ArchiveError(f"byte {at}: collection metadata size is not an integer: {c}")
        c.setdefault("db", "")
        c.setdefault("metadata", "")
        c.setdefault("type", "")
        c["meta"] = check_metadata(c, at)
        prelude.append(c)

    # What the demultiplexer expects: one namespace per prelude entry.
    old_server = server_before_8_3(header.get("server_version", ""))
    expected = {}
    for c in prelude:
        coll = c["collection"]
        if c["type"] == "timeseries" and old_server:
            coll = "system.buckets." + coll
        ns = f"{c['db']}.{coll}"
        if ns in expected:
            raise ArchiveError(f"the prelude lists {ns} twice")
        expected[ns] = c

    status = {}  # ns -> "open" | "closed"
    crcs = {}
    counts = {}
    oplog = []
    while not r.at_end():
        at = r.pos
        raw = r.bson_or_terminator("a block header")
        if raw is None:
            raise ArchiveError(f"byte {at}: consecutive terminators / a headerless block")
        db, coll, eof, crc = namespace_header(raw, at)
        ns = f"{db}.{coll}"
        if ns not in expected:
            raise ArchiveError(f"byte {at}: a block for {ns}, which the prelude does not list")
        if status.get(ns) == "closed":
            raise ArchiveError(f"byte {at}: a header for {ns} after its EOF")
        status[ns] = "open"
        crcs.setdefault(ns, Crc64())
        counts.setdefault(ns, 0)
        if eof:
            found = crcs[ns].sum64()
            if found != crc:
                raise ArchiveError(
                    f"byte {at}: CRC mismatch for {ns}: its documents give {found:#018x}, "
                    f"its EOF header says {crc:#018x}"
                )
            status[ns] = "closed"
            after = r.pos
            if r.bson_or_terminator(f"the terminator after the EOF of {ns}") is not None:
                raise ArchiveError(f"byte {after}: data for {ns} after its EOF header")
            continue
        while True:
            doc_at = r.pos
            body = r.bson_or_terminator(f"a document of {ns}")
            if body is None:
                break
            doc = decode(body, f"a document of {ns}", doc_at)
            crcs[ns].write(body)
            counts[ns] += 1
            if ns == ".oplog":
                for f, t in (("ts", bson.Timestamp), ("op", str), ("ns", str)):
                    if not isinstance(doc.get(f), t):
                        raise ArchiveError(f"byte {doc_at}: oplog entry without {f}: {doc}")
                if oplog and doc["ts"] < oplog[-1]:
                    raise ArchiveError(f"byte {doc_at}: oplog entries out of ts order: {doc}")
                oplog.append(doc["ts"])

    unfinished = sorted(ns for ns, s in status.items() if s == "open")
    if unfinished:
        raise ArchiveError(f"archive finished but contained files were unfinished: {unfinished}")
    unseen = sorted(ns for ns in expected if status.get(ns) != "closed")
    if unseen:
        raise ArchiveError(f"archive finished before all collections were seen: {unseen}")
    if ".oplog" in expected and not oplog:
        raise ArchiveError(
            "the oplog namespace holds no entry: a dump's window starts at the entry at its "
            "start (ts >= start), so mongorestore --oplogReplay fails on an empty one"
        )

    summary = {
        "header": {k: header.get(k) for k in ("version", "server_version", "tool_version")},
        "namespaces": {
            ns: {
                "type": c["type"],
                "documents": counts.get(ns, 0),
                "uuid": c["meta"].get("uuid"),
                "options": json.loads(json_util.dumps(c["meta"].get("options", {}))),
                "indexes": [i.get("name") for i in c["meta"].get("indexes", [])],
            }
            for ns, c in expected.items()
        },
        "oplog": None
        if ".oplog" not in expected
        else {
            "entries": len(oplog),
            "first": [oplog[0].time, oplog[0].inc],
            "last": [oplog[-1].time, oplog[-1].inc],
        },
    }
    return summary


def main(argv):
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    data = sys.stdin.buffer.read() if argv[1] == "-" else open(argv[1], "rb").read()
    try:
        summary = check(data)
    except ArchiveError as e:
        print(f"{argv[1]}: not an archive stock mongorestore accepts: {e}", file=sys.stderr)
        return 1
    json.dump(summary, sys.stdout, indent=1, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
