//! The mongodump archive format, as specified in mongo-tools `common/archive/spec.md`
//! (<https://github.com/mongodb/mongo-tools/blob/master/common/archive/spec.md>):
//!
//! ```text
//! archive   = magic (0x8199e26d, little-endian) , header , *collection-metadata , terminator ,
//!             *(namespace-segment | namespace-eof)
//! segment   = {db, collection, EOF: false, CRC: 0} , +document , terminator
//! eof       = {db, collection, EOF: true, CRC: crc64} , terminator
//! terminator = 0xffffffff
//! ```
//!
//! `CRC` is CRC-64 with the ECMA polynomial as Go's `hash/crc64` computes it (reflected,
//! init and final XOR all ones: the `CRC_64_XZ` of the `crc` crate) over the raw bytes of
//! every document of the namespace, stored as an int64. Segments of several namespaces
//! may interleave. Documents pass through as raw bytes: never decoded and re-encoded.
//!
//! Like mongodump (mongo-tools `common/archive/multiplexer.go`: a namespace's buffered
//! writer always flushes on close, so its header goes out even with no document), the
//! writer gives every namespace it ends at least one segment, empty if it has no document:
//! a view or an empty collection is `{db, collection, EOF: false, CRC: 0}`, terminator,
//! then its EOF marker. Stock mongorestore wants a namespace of the prelude seen and closed,
//! views included ("archive finished before all collections were seen" otherwise).

use std::collections::HashMap;
use std::io::{self, Read, Write};

use bson::{RawDocument, doc};
use crc::{CRC_64_XZ, Crc, Digest};

/// The archive's magic number.
pub const MAGIC: u32 = 0x8199_e26d;
/// The archive format version written (the only one that exists).
pub const FORMAT_VERSION: &str = "0.1";
const TERMINATOR: [u8; 4] = [0xff; 4];
/// Largest BSON document accepted when reading, bytes: MongoDB's 16 MiB limit plus room
/// for oplog entries, with margin. Anything larger is refused as malformed.
pub const MAX_DOCUMENT_BYTES: usize = 48 * 1024 * 1024;

/// Capacity reserved up front for one block, bytes; a larger block grows as it is read.
const INITIAL_BLOCK_CAPACITY: usize = 64 * 1024;

static CRC64: Crc<u64> = Crc::<u64>::new(&CRC_64_XZ);

/// The archive header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Collections dumped concurrently.
    pub concurrent_collections: i32,
    /// Format version, `0.1`.
    pub version: String,
    /// Source server version, e.g. `8.2.0`.
    pub server_version: String,
    /// Version of the tool that wrote the archive.
    pub tool_version: String,
}

/// One collection's entry in the prelude.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CollectionMetadata {
    /// Database name (empty for the oplog).
    pub db: String,
    /// Collection name.
    pub collection: String,
    /// Options, indexes, uuid, collectionName and type, as canonical Extended JSON v2
    /// (what mongodump writes to `<coll>.metadata.json`).
    pub metadata: String,
    /// Total uncompressed size of the collection's documents, bytes.
    pub size: i64,
    /// `collection`, `view` or `timeseries`.
    pub kind: String,
}

/// A namespace: (database, collection).
pub type Namespace = (String, String);

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn bson_bytes(d: &bson::Document) -> Vec<u8> {
    let mut out = Vec::new();
    d.to_writer(&mut out).expect("BSON to memory");
    out
}

/// Writes an archive: the prelude on creation, then segments and end markers.
pub struct ArchiveWriter<W: Write> {
    out: W,
    crcs: HashMap<Namespace, Digest<'static, u64>>,
}

impl<W: Write> ArchiveWriter<W> {
    /// Writes the magic number, `header` and the prelude of `collections`.
    ///
    /// # Errors
    /// From `out`.
    pub fn new(
        mut out: W,
        header: &Header,
        collections: &[CollectionMetadata],
    ) -> io::Result<Self> {
        out.write_all(&MAGIC.to_le_bytes())?;
        out.write_all(&bson_bytes(&doc! {
            "concurrent_collections": header.concurrent_collections,
            "version": &header.version,
            "server_version": &header.server_version,
            "tool_version": &header.tool_version,
        }))?;
        for c in collections {
            let size = match i32::try_from(c.size) {
                Ok(s) => bson::Bson::Int32(s),
                Err(_) => bson::Bson::Int64(c.size),
            };
            out.write_all(&bson_bytes(&doc! {
                "db": &c.db,
                "collection": &c.collection,
                "metadata": &c.metadata,
                "size": size,
                "type": &c.kind,
            }))?;
        }
        out.write_all(&TERMINATOR)?;
        Ok(Self {
            out,
            crcs: HashMap::new(),
        })
    }

    fn namespace_header(
        &mut self,
        db: &str,
        collection: &str,
        eof: bool,
        crc: i64,
    ) -> io::Result<()> {
        self.out.write_all(&bson_bytes(&doc! {
            "db": db, "collection": collection, "EOF": eof, "CRC": crc,
        }))
    }

    /// Writes one segment of `docs` (raw BSON documents) for a namespace. Does nothing for
    /// an empty slice.
    ///
    /// # Errors
    /// From `out`.
    pub fn write_segment<'a>(
        &mut self,
        db: &str,
        collection: &str,
        docs: impl IntoIterator<Item = &'a [u8]>,
    ) -> io::Result<()> {
        let mut docs = docs.into_iter().peekable();
        if docs.peek().is_none() {
            return Ok(());
        }
        self.namespace_header(db, collection, false, 0)?;
        let digest = self
            .crcs
            .entry((db.to_owned(), collection.to_owned()))
            .or_insert_with(|| CRC64.digest());
        for d in docs {
            digest.update(d);
            self.out.write_all(d)?;
        }
        self.out.write_all(&TERMINATOR)
    }

    /// Ends a namespace: an empty segment if it had none (a view, an empty collection), then
    /// its EOF marker with the CRC of all its documents.
    ///
    /// # Errors
    /// From `out`.
    pub fn end_namespace(&mut self, db: &str, collection: &str) -> io::Result<()> {
        let crc = match self.crcs.remove(&(db.to_owned(), collection.to_owned())) {
            Some(digest) => digest.finalize(),
            None => {
                self.namespace_header(db, collection, false, 0)?;
                self.out.write_all(&TERMINATOR)?;
                CRC64.digest().finalize()
            }
        };
        self.namespace_header(db, collection, true, crc as i64)?;
        self.out.write_all(&TERMINATOR)
    }

    /// The output, e.g. to take the bytes written so far out of a `Vec<u8>`.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// Returns the output.
    ///
    /// # Errors
    /// From flushing `out`.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// What the reader yields after the prelude.
#[derive(Debug, PartialEq, Eq)]
pub enum Item {
    /// One raw BSON document of a namespace.
    Document {
        /// Its namespace.
        ns: Namespace,
        /// The raw document bytes.
        bytes: Vec<u8>,
    },
    /// A namespace ended; its CRC matched.
    End(Namespace),
}

/// Reads and checks an archive: the prelude on creation, then documents and namespace
/// ends. A document longer than [`MAX_DOCUMENT_BYTES`], a CRC mismatch, a truncated
/// stream or a namespace left without its end marker is an `InvalidData` error.
pub struct ArchiveReader<R: Read> {
    input: R,
    /// The archive header.
    pub header: Header,
    /// The prelude, in archive order.
    pub collections: Vec<CollectionMetadata>,
    current: Option<Namespace>,
    crcs: HashMap<Namespace, Digest<'static, u64>>,
    ended: Vec<Namespace>,
}

/// Reads one length-prefixed BSON document, or `None` for a terminator; `Ok(None)` with
/// `eof_ok` and nothing left means the end of input (reported as `Err(UnexpectedEof)` if
/// not `eof_ok`).
fn read_block(input: &mut impl Read, at_end_ok: bool) -> io::Result<Option<Option<Vec<u8>>>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = input.read(&mut len[got..])?;
        if n == 0 {
            if got == 0 && at_end_ok {
                return Ok(None);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "archive is truncated",
            ));
        }
        got += n;
    }
    if len == TERMINATOR {
        return Ok(Some(None));
    }
    let size = u32::from_le_bytes(len) as usize;
    if !(5..=MAX_DOCUMENT_BYTES).contains(&size) {
        return Err(invalid(format!(
            "archive holds a BSON document of {size} bytes: malformed"
        )));
    }
    // The length prefix is untrusted: memory grows with the bytes actually read, so a
    // truncated or forged archive never makes the reader allocate what it claims.
    let mut buf = Vec::with_capacity(size.min(INITIAL_BLOCK_CAPACITY));
    buf.extend_from_slice(&len);
    let body = (size - 4) as u64;
    if input.by_ref().take(body).read_to_end(&mut buf)? as u64 != body {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "archive is truncated inside a document",
        ));
    }
    RawDocument::from_bytes(&buf)
        .map_err(|e| invalid(format!("malformed BSON document in archive: {e}")))?;
    Ok(Some(Some(buf)))
}

fn get_str(d: &RawDocument, key: &str, what: &str) -> io::Result<String> {
    d.get_str(key)
        .map(str::to_owned)
        .map_err(|_| invalid(format!("archive {what} has no string field {key:?}")))
}

fn get_int(d: &RawDocument, key: &str) -> Option<i64> {
    match d.get(key).ok().flatten()? {
        bson::RawBsonRef::Int32(n) => Some(n.into()),
        bson::RawBsonRef::Int64(n) => Some(n),
        _ => None,
    }
}

impl<R: Read> ArchiveReader<R> {
    /// Reads and checks the magic number, the header and the prelude.
    ///
    /// # Errors
    /// `InvalidData` if it is not a mongodump archive.
    pub fn new(mut input: R) -> io::Result<Self> {
        let mut magic = [0u8; 4];
        input
            .read_exact(&mut magic)
            .map_err(|_| invalid("not a mongodump archive: shorter than its magic number"))?;
        if u32::from_le_bytes(magic) != MAGIC {
            return Err(invalid("not a mongodump archive: wrong magic number"));
        }
        let header = read_block(&mut input, false)?
            .flatten()
            .ok_or_else(|| invalid("mongodump archive has no header"))?;
        let h = RawDocument::from_bytes(&header).map_err(|e| invalid(e.to_string()))?;
        let header = Header {
            concurrent_collections: get_int(h, "concurrent_collections").unwrap_or(1) as i32,
            version: get_str(h, "version", "header")?,
            server_version: get_str(h, "server_version", "header").unwrap_or_default(),
            tool_version: get_str(h, "tool_version", "header").unwrap_or_default(),
        };
        let mut collections = Vec::new();
        while let Some(d) = read_block(&mut input, false)?.flatten() {
            let d = RawDocument::from_bytes(&d).map_err(|e| invalid(e.to_string()))?;
            collections.push(CollectionMetadata {
                db: get_str(d, "db", "collection metadata")?,
                collection: get_str(d, "collection", "collection metadata")?,
                metadata: get_str(d, "metadata", "collection metadata").unwrap_or_default(),
                size: get_int(d, "size").unwrap_or(0),
                kind: get_str(d, "type", "collection metadata").unwrap_or_default(),
            });
        }
        Ok(Self {
            input,
            header,
            collections,
            current: None,
            crcs: HashMap::new(),
            ended: Vec::new(),
        })
    }

    /// The next document or namespace end; `None` at the end of a complete archive.
    ///
    /// # Errors
    /// `InvalidData` or `UnexpectedEof` as described on [`ArchiveReader`].
    pub fn next_item(&mut self) -> io::Result<Option<Item>> {
        loop {
            if let Some(ns) = &self.current {
                match read_block(&mut self.input, false)? {
                    Some(Some(bytes)) => {
                        self.crcs.get_mut(ns).expect("digest").update(&bytes);
                        return Ok(Some(Item::Document {
                            ns: ns.clone(),
                            bytes,
                        }));
                    }
                    Some(None) => {
                        self.current = None;
                        continue;
                    }
                    None => unreachable!("end of input is an error inside a segment"),
                }
            }
            let Some(block) = read_block(&mut self.input, true)? else {
                let open: Vec<String> = self
                    .collections
                    .iter()
                    .filter(|c| !self.ended.contains(&(c.db.clone(), c.collection.clone())))
                    .filter(|c| c.kind != "view" && c.kind != "timeseries")
                    .map(|c| format!("{}.{}", c.db, c.collection))
                    .collect();
                if !open.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "archive is truncated: no end marker for {}",
                            open.join(", ")
                        ),
                    ));
                }
                return Ok(None);
            };
            let bytes = block.ok_or_else(|| {
                invalid("archive has a terminator where a namespace header belongs")
            })?;
            let h = RawDocument::from_bytes(&bytes).map_err(|e| invalid(e.to_string()))?;
            let ns = (
                get_str(h, "db", "namespace header")?,
                get_str(h, "collection", "namespace header")?,
            );
            let eof = h.get_bool("EOF").unwrap_or(false);
            if !eof {
                self.crcs
                    .entry(ns.clone())
                    .or_insert_with(|| CRC64.digest());
                self.current = Some(ns);
                continue;
            }
            let expected = get_int(h, "CRC").unwrap_or(0);
            let found = self
                .crcs
                .remove(&ns)
                .map(|d| d.finalize() as i64)
                .unwrap_or(0);
            if expected != found {
                return Err(invalid(format!(
                    "CRC of namespace {}.{} is {found:#x}, its end marker says {expected:#x}: the archive is damaged",
                    ns.0, ns.1
                )));
            }
            match read_block(&mut self.input, false)? {
                Some(None) => {}
                _ => return Err(invalid("archive has no terminator after an end marker")),
            }
            self.ended.push(ns.clone());
            return Ok(Some(Item::End(ns)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            concurrent_collections: 1,
            version: FORMAT_VERSION.into(),
            server_version: "8.2.0".into(),
            tool_version: "ferry test".into(),
        }
    }

    fn meta(db: &str, c: &str) -> CollectionMetadata {
        CollectionMetadata {
            db: db.into(),
            collection: c.into(),
            metadata: r#"{"indexes":[],"collectionName":"c","type":"collection","options":{}}"#
                .into(),
            size: 0,
            kind: "collection".into(),
        }
    }

    /// Check values worked out independently of this module: the CRC-64/XZ check value of
    /// "123456789" is 0x995dc9bbdf1939fa (the catalogue of CRC parameters), which is also
    /// what Go's crc64.Checksum([]byte("123456789"), crc64.MakeTable(crc64.ECMA)) returns.
    #[test]
    fn crc_is_gos_crc64_ecma() {
        assert_eq!(CRC64.checksum(b"123456789"), 0x995d_c9bb_df19_39fa);
    }

    /// A small archive checked byte by byte against the specification.
    #[test]
    fn hand_checked_small_archive() {
        let d1 = bson_bytes(&doc! {"_id": 1});
        let mut w = ArchiveWriter::new(Vec::new(), &header(), &[meta("app", "c")]).unwrap();
        w.write_segment("app", "c", [d1.as_slice()]).unwrap();
        w.end_namespace("app", "c").unwrap();
        let bytes = w.finish().unwrap();

        // Magic number, little-endian.
        assert_eq!(&bytes[..4], &[0x6d, 0xe2, 0x99, 0x81]);
        // Header document: its length prefix, then fields in order.
        let hlen = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
        let h = RawDocument::from_bytes(&bytes[4..4 + hlen]).unwrap();
        assert_eq!(h.get_str("version").unwrap(), "0.1");
        assert_eq!(h.get_i32("concurrent_collections").unwrap(), 1);
        let mut at = 4 + hlen;
        let mlen = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let m = RawDocument::from_bytes(&bytes[at..at + mlen]).unwrap();
        assert_eq!(
            (m.get_str("db").unwrap(), m.get_str("collection").unwrap()),
            ("app", "c")
        );
        at += mlen;
        assert_eq!(
            &bytes[at..at + 4],
            &TERMINATOR,
            "terminator after the prelude"
        );
        at += 4;
        let slen = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let s = RawDocument::from_bytes(&bytes[at..at + slen]).unwrap();
        assert!(!s.get_bool("EOF").unwrap());
        assert_eq!(s.get_i64("CRC").unwrap(), 0);
        at += slen;
        assert_eq!(
            &bytes[at..at + d1.len()],
            d1.as_slice(),
            "the document, raw"
        );
        at += d1.len();
        assert_eq!(&bytes[at..at + 4], &TERMINATOR);
        at += 4;
        let elen = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let e = RawDocument::from_bytes(&bytes[at..at + elen]).unwrap();
        assert!(e.get_bool("EOF").unwrap());
        assert_eq!(e.get_i64("CRC").unwrap(), CRC64.checksum(&d1) as i64);
        at += elen;
        assert_eq!(
            &bytes[at..],
            &TERMINATOR,
            "ends with the end marker's terminator"
        );
        // {"_id": 1} is 14 bytes: 0e000000 10 5f696400 01000000 00.
        assert_eq!(
            d1,
            [0x0e, 0, 0, 0, 0x10, b'_', b'i', b'd', 0, 1, 0, 0, 0, 0]
        );
    }

    /// mongodump's shape for a namespace without documents (a view, an empty collection):
    /// an empty segment, then the EOF marker with the CRC of nothing (0).
    #[test]
    fn a_namespace_without_documents_gets_an_empty_segment_then_its_eof() {
        let mut view = meta("app", "v");
        view.kind = "view".into();
        let mut w = ArchiveWriter::new(Vec::new(), &header(), &[view]).unwrap();
        let prelude_len = w.get_mut().len();
        w.end_namespace("app", "v").unwrap();
        let bytes = w.finish().unwrap();
        let segment = bson_bytes(&doc! {"db": "app", "collection": "v", "EOF": false, "CRC": 0i64});
        let eof = bson_bytes(&doc! {"db": "app", "collection": "v", "EOF": true, "CRC": 0i64});
        let expected = [&segment[..], &TERMINATOR, &eof, &TERMINATOR].concat();
        assert_eq!(&bytes[prelude_len..], &expected[..]);
        let mut r = ArchiveReader::new(&bytes[..]).unwrap();
        assert_eq!(
            r.next_item().unwrap(),
            Some(Item::End(("app".into(), "v".into())))
        );
        assert_eq!(r.next_item().unwrap(), None);
    }

    #[test]
    fn interleaved_namespaces_round_trip() {
        let docs: Vec<Vec<u8>> = (0..5)
            .map(|i| bson_bytes(&doc! {"_id": i, "s": "x".repeat(i as usize)}))
            .collect();
        let mut w = ArchiveWriter::new(
            Vec::new(),
            &header(),
            &[meta("a", "x"), meta("b", "y"), meta("b", "empty")],
        )
        .unwrap();
        w.write_segment("a", "x", docs[..2].iter().map(Vec::as_slice))
            .unwrap();
        w.write_segment("b", "y", docs[2..3].iter().map(Vec::as_slice))
            .unwrap();
        w.write_segment("a", "x", docs[3..].iter().map(Vec::as_slice))
            .unwrap();
        w.end_namespace("a", "x").unwrap();
        w.end_namespace("b", "y").unwrap();
        w.end_namespace("b", "empty").unwrap();
        let bytes = w.finish().unwrap();
        let mut r = ArchiveReader::new(&bytes[..]).unwrap();
        assert_eq!(r.header, header());
        assert_eq!(r.collections.len(), 3);
        let mut got = Vec::new();
        while let Some(item) = r.next_item().unwrap() {
            got.push(item);
        }
        let x_docs: Vec<&Vec<u8>> = got
            .iter()
            .filter_map(|i| match i {
                Item::Document { ns, bytes } if ns.1 == "x" => Some(bytes),
                _ => None,
            })
            .collect();
        assert_eq!(x_docs, vec![&docs[0], &docs[1], &docs[3], &docs[4]]);
        assert_eq!(got.iter().filter(|i| matches!(i, Item::End(_))).count(), 3);
    }

    #[test]
    fn truncated_or_altered_archives_are_refused() {
        let d = bson_bytes(&doc! {"_id": 1, "v": "hello"});
        let mut w = ArchiveWriter::new(Vec::new(), &header(), &[meta("a", "x")]).unwrap();
        w.write_segment("a", "x", [d.as_slice()]).unwrap();
        w.end_namespace("a", "x").unwrap();
        let bytes = w.finish().unwrap();
        let read_all = |b: &[u8]| -> io::Result<usize> {
            let mut r = ArchiveReader::new(b)?;
            let mut n = 0;
            while r.next_item()?.is_some() {
                n += 1;
            }
            Ok(n)
        };
        assert_eq!(read_all(&bytes).unwrap(), 2);
        for cut in [3, 10, bytes.len() - 30, bytes.len() - 1] {
            assert!(
                read_all(&bytes[..cut]).is_err(),
                "truncated at {cut} accepted"
            );
        }
        // Flip a byte inside the document's string: the CRC no longer matches.
        let mut altered = bytes.clone();
        let pos = altered.windows(5).position(|w| w == b"hello").unwrap();
        altered[pos] = b'j';
        let e = read_all(&altered).unwrap_err();
        assert!(e.to_string().contains("CRC"), "{e}");
        // An absurd length is refused before allocating it.
        let mut huge = bytes.clone();
        huge[4..8].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        assert!(read_all(&huge).is_err());
    }

    /// A header claiming the largest accepted document (48 MiB) followed by a few bytes used
    /// to make the reader allocate the 48 MiB before finding the archive truncated (the
    /// fuzz target `mongo_archive` checks this for any input). Memory now grows with the
    /// bytes actually read.
    #[test]
    fn a_forged_document_length_does_not_allocate_what_it_claims() {
        struct Probe<'a> {
            data: &'a [u8],
            largest_read: usize,
        }
        impl Read for Probe<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.largest_read = self.largest_read.max(buf.len());
                self.data.read(buf)
            }
        }
        let mut forged = MAGIC.to_le_bytes().to_vec();
        forged.extend_from_slice(&(MAX_DOCUMENT_BYTES as u32).to_le_bytes());
        forged.extend_from_slice(b"\x02version\0");
        let mut probe = Probe {
            data: &forged,
            largest_read: 0,
        };
        let e = ArchiveReader::new(&mut probe)
            .err()
            .expect("truncated archive");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        assert!(
            probe.largest_read <= INITIAL_BLOCK_CAPACITY,
            "read into a buffer of {} bytes",
            probe.largest_read
        );
    }
}
